"""Train a projector with diffusers models through the same trainer (``c2c_core.train.train_bank``).

Both transformers stay frozen; only the bank learns, with the receiver's flow-matching objective: the
bridged receiver's velocity at x_t = (1 − σ)·x0 + σ·noise against noise − x0. The bridge fuses through
``FusionRun`` exactly as at inference, in a training session (``Bridge.session(training=True)``): the bank
is always used in place (float32 master weights also for a bf16 receiver; never a placed copy that
gradients would not reach), so what is trained is what runs.

    bridge = Bridge(LiveSharer(sharer, inputs), bundle).attach(receiver)
    result = train_bank(bundle.bank, bundle.layer_map, batches, velocity_loss(bridged_velocity(bridge, receiver)),
                        TrainConfig(steps=1000, lr=1e-4))
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from c2c_core.bundle import load_tensors, read_header, read_meta, save_tensors_with_meta

from .errors import BridgeSetupError
from .live import LiveSharer, SharerInputs

__all__ = ["TrainingBatch", "bridged_velocity", "save_training_sample", "TrainingSet", "sample_batches"]

SAMPLE_KEY = "c2c_diffusers_training_sample"
SAMPLE_VERSION = 1


@dataclass
class TrainingBatch:
    """One training batch: clean latents, their noise and sigma, and both models' conditioning.

    x0, noise: (B, 16, T, H, W). sigma: a float in (0, 1]. prompt_embeds: the receiver's text embeddings;
    receiver_condition / receiver_image_embeds: for an image-to-video receiver. sharer: the sharer's inputs
    for this batch (its "cond" branch is used).
    """

    x0: Tensor
    noise: Tensor
    sigma: float
    prompt_embeds: Tensor
    sharer: SharerInputs
    receiver_condition: Optional[Tensor] = None
    receiver_image_embeds: Optional[Tensor] = None


def bridged_velocity(bridge, receiver):
    """``predict(bank, batch) -> (bridged velocity, noise − x0)`` for ``c2c_core.train.velocity_loss``."""
    if not isinstance(bridge.source, LiveSharer):
        raise BridgeSetupError("training needs a LiveSharer (the sharer runs on each batch's x_t); got "
                               f"{type(bridge.source).__name__}.")
    if not any(t is receiver for t in bridge.receivers):
        raise BridgeSetupError("the bridge is not attached to this receiver; call bridge.attach(receiver) first.")

    def predict(bank, batch: TrainingBatch):
        if bank is not bridge.bundle.bank:
            raise BridgeSetupError("train the bank of the bridge's own bundle (bridge.bundle.bank).")
        first = next(iter(bank.parameters()), None)
        if first is not None and first.device != batch.x0.device:
            raise BridgeSetupError(f"the projector bank is on {first.device} and the latents on {batch.x0.device}; "
                                   f"expected one device. Move the bank there first (bundle.bank.to(device)).")
        x_t = (1.0 - batch.sigma) * batch.x0 + batch.sigma * batch.noise
        hidden = x_t if batch.receiver_condition is None else torch.cat([x_t, batch.receiver_condition], dim=1)
        bridge.source.inputs = batch.sharer
        timestep = torch.full((x_t.shape[0],), batch.sigma * 1000.0, device=x_t.device)
        with bridge.session(training=True), receiver.cache_context("cond", sigma=float(batch.sigma)):
            image = batch.receiver_image_embeds
            velocity = receiver(hidden_states=hidden.to(receiver.dtype), timestep=timestep,
                                encoder_hidden_states=batch.prompt_embeds.to(receiver.dtype),
                                encoder_hidden_states_image=None if image is None else image.to(receiver.dtype),
                                return_dict=False)[0]
        return velocity, batch.noise - batch.x0

    return predict


# ------------------------------------------------------------------------------------------------
# Sample files: one .safetensors per clean latent with both models' conditioning; nothing pickled
# ------------------------------------------------------------------------------------------------
def save_training_sample(path, x0: Tensor, prompt_embeds: Tensor, sharer: SharerInputs,
                         receiver_condition: Optional[Tensor] = None,
                         receiver_image_embeds: Optional[Tensor] = None) -> Path:
    """Write one training sample: the clean latent x0 (1, 16, T, H, W, as the pipeline's latents are) and the
    conditioning of both models (the sharer's "cond" branch)."""
    tensors = {"x0": x0, "prompt_embeds": prompt_embeds, "sharer_prompt_embeds": sharer.prompt_embeds}
    optional = {"receiver_condition": receiver_condition, "receiver_image_embeds": receiver_image_embeds,
                "sharer_image_embeds": sharer.image_embeds, "sharer_condition": sharer.condition}
    tensors.update({k: v for k, v in optional.items() if v is not None})
    if x0.dim() != 5 or x0.shape[0] != 1:
        raise BridgeSetupError(f"x0 has shape {tuple(x0.shape)}; expected one video latent (1, C, T, H, W).")
    save_tensors_with_meta(path, {k: v.float() for k, v in tensors.items()},
                           {"format_version": SAMPLE_VERSION, "tensors": sorted(tensors)}, SAMPLE_KEY)
    return Path(path)


class TrainingSet:
    """The sample files of a folder, validated from their headers; tensors are read per step.

    Samples holding NaN/Inf are refused with their index, file and the fix: every x0 when the folder is
    opened (before any training step), the other tensors when a sample is loaded.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.paths = sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else []
        if not self.paths:
            raise BridgeSetupError(f"{self.folder}: no .safetensors training samples; expected files written by "
                                   f"c2c_diffusers.training.save_training_sample.")
        for path in self.paths:
            meta = read_meta(path, SAMPLE_KEY)
            _, entries = read_header(path)
            if meta.get("format_version") != SAMPLE_VERSION or sorted(entries) != sorted(meta.get("tensors", [])):
                raise BridgeSetupError(f"{path}: not a version-{SAMPLE_VERSION} training sample with the tensors its "
                                       f"metadata lists; re-write it with save_training_sample.")
        for index, path in enumerate(self.paths):
            self._check_finite(index, load_tensors(path, ["x0"]))

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, device="cpu") -> dict:
        path = self.paths[index]
        _, entries = read_header(path)
        return self._check_finite(index, load_tensors(path, list(entries), device=device))

    def _check_finite(self, index: int, tensors: dict) -> dict:
        bad = [name for name, t in sorted(tensors.items()) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            name = self.paths[index].name
            raise BridgeSetupError(f"training sample index {index} ({name}): {', '.join(bad)} hold NaN or Inf values; "
                                   f"expected finite values. Delete {name} from {self.folder} or write it again with "
                                   f"save_training_sample from finite latents and embeddings.")
        return tensors


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


def sample_batches(dataset: TrainingSet, seed: int = 0, device="cpu", sigma_range=(0.05, 0.95)):
    """``batches(step) -> TrainingBatch``, deterministic in (seed, step): sample, noise and sigma are drawn
    from a generator seeded by both, so a resumed run sees the same batches."""
    lo, hi = sigma_range

    def batches(step: int) -> TrainingBatch:
        g = torch.Generator().manual_seed(_seed(seed, step))
        index = int(torch.randint(len(dataset), (1,), generator=g))
        t = dataset.load(index, device)
        noise = torch.randn(t["x0"].shape, generator=g).to(device)
        sigma = lo + (hi - lo) * float(torch.rand((), generator=g))
        sharer = SharerInputs(t["sharer_prompt_embeds"], image_embeds=t.get("sharer_image_embeds"),
                              condition=t.get("sharer_condition"))
        return TrainingBatch(x0=t["x0"], noise=noise, sigma=sigma, prompt_embeds=t["prompt_embeds"], sharer=sharer,
                             receiver_condition=t.get("receiver_condition"),
                             receiver_image_embeds=t.get("receiver_image_embeds"))
    return batches
