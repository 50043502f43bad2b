"""Train a projector with diffusers models through the same trainer (``c2c_core.train.train_bank``).

Both transformers stay frozen; only the bank learns, with the receiver's flow-matching objective: the
bridged receiver's velocity at x_t = (1 − σ)·x0 + σ·noise against noise − x0. The bridge fuses through
``FusionRun`` exactly as at inference, in a training session (``Bridge.session(training=True)``): the bank
is always used in place (float32 master weights also for a bf16 receiver; never a placed copy that
gradients would not reach), so what is trained is what runs. Sample files and their seeded draws are
``c2c_core.samples`` (one format for both hosts); this module converts diffusers tensors to and from them.

    bridge = Bridge(LiveSharer(sharer, inputs), bundle).attach(receiver)
    result = train_bank(bundle.bank, bundle.layer_map, batches, velocity_loss(bridged_velocity(bridge, receiver)),
                        TrainConfig(steps=1000, lr=1e-4))
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from c2c_core.samples import (CLIP_VISION, CROSS_ATTN, SIGMA_RANGE, Conditioning, SampleDraws, SampleHost, TrainingSet,
                              save_sample)

from .errors import BridgeSetupError
from .live import LiveSharer, SharerInputs

__all__ = ["TrainingBatch", "bridged_velocity", "save_training_sample", "open_training_set", "sample_batches"]

SAMPLES = SampleHost("diffusers", ("receiver_positive", "sharer_positive"), "c2c_diffusers.training.save_training_sample")


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
# Sample files (c2c_core.samples): diffusers tensors <-> a sample's named conditioning tensors
# ------------------------------------------------------------------------------------------------
def _conditioning(prompt_embeds: Tensor, image_embeds: Optional[Tensor], condition: Optional[Tensor]) -> Conditioning:
    """Text embeddings and image-encoder features under the names both hosts use (CROSS_ATTN, CLIP_VISION); the
    I2V image latents (mask + latent, model space, diffusers' own) as ``condition``."""
    named = {CROSS_ATTN: prompt_embeds, CLIP_VISION: image_embeds, "condition": condition}
    return Conditioning({name: t for name, t in named.items() if t is not None})


def save_training_sample(folder, x0: Tensor, prompt_embeds: Tensor, sharer: SharerInputs,
                         receiver_condition: Optional[Tensor] = None,
                         receiver_image_embeds: Optional[Tensor] = None) -> Path:
    """Write one training sample into ``folder`` as the next ``sample_NNNNN.safetensors`` (never replacing a file):
    the clean latent x0 (1, 16, T, H, W, as the pipeline's latents are) and the conditioning of both models
    (the sharer's "cond" branch). Returns the path."""
    if x0.dim() != 5 or x0.shape[0] != 1:
        raise BridgeSetupError(f"x0 has shape {tuple(x0.shape)}; expected one video latent (1, C, T, H, W).")
    return save_sample(folder, SAMPLES, x0, {
        "receiver_positive": _conditioning(prompt_embeds, receiver_image_embeds, receiver_condition),
        "sharer_positive": _conditioning(sharer.prompt_embeds, sharer.image_embeds, sharer.condition)})


def open_training_set(folder) -> TrainingSet:
    """The samples ``save_training_sample`` wrote into ``folder``, validated from their headers (every x0
    checked for NaN/Inf now; the other tensors when a sample is loaded)."""
    return TrainingSet.open(folder, SAMPLES)


def sample_batches(dataset: TrainingSet, seed: int = 0, device="cpu", sigma_range=SIGMA_RANGE, rank: int = 0,
                   world: int = 1):
    """``batches(step) -> TrainingBatch``: one sample per step, drawn by ``c2c_core.samples.SampleDraws`` (a pure
    function of seed and step: a resumed run sees the same batches); sigma uniform in ``sigma_range``. Under
    torchrun each of the ``world`` processes passes its ``rank`` and draws its own share of every step."""
    lo, hi = sigma_range
    draws = SampleDraws(dataset, seed, rank=rank, world=world)

    def batches(step: int) -> TrainingBatch:
        (draw,) = draws(step)
        sample = dataset[draw.index]
        r, s = (sample.roles[role].tensors for role in ("receiver_positive", "sharer_positive"))
        on = lambda t: None if t is None else t.to(device)  # noqa: E731
        sharer = SharerInputs(on(s[CROSS_ATTN]), image_embeds=on(s.get(CLIP_VISION)),
                              condition=on(s.get("condition")))
        return TrainingBatch(x0=on(sample.latent), noise=on(draw.noise), sigma=lo + (hi - lo) * draw.t,
                             prompt_embeds=on(r[CROSS_ATTN]), sharer=sharer,
                             receiver_condition=on(r.get("condition")),
                             receiver_image_embeds=on(r.get(CLIP_VISION)))
    return batches
