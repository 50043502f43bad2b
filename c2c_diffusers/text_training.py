"""Train a text-encoder projector (Qwen3-VL -> Qwen2.5-VL) with diffusers' Qwen-Image pipelines.

The projector learns from the frozen Qwen-Image DiT's flow-matching loss: the pipeline's own ``encode_prompt``
runs with the :class:`~c2c_diffusers.text_encoder.TextEncoderBridge` fusing (the same hooks and ``FusionRun``
as inference, so what is trained is what runs), both encoders and the DiT frozen, the bank the only thing
with gradients. Samples are ``c2c_core.samples`` files of this host (``PROMPT_SAMPLES``): the clean latent in
the pipeline's latent space and what the encoders read (the prompt, the edit image); the encoders run at
training time. The loop is ``c2c_core.train.run_training`` (tools/train_projector_diffusers.py --pair text)::

    bridge = TextEncoderBridge(sharer, sharer_processor, bundle).attach(pipe)
    result = run_training(bundle.bank, bundle.layer_map, prompt_batches(open_prompt_set(folder)),
                          velocity_loss(bridged_prompt_velocity(bridge, pipe)), TrainConfig(steps=1000))

ComfyUI's host has the same names in c2c_comfy/text_training.py, for its own samples.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from c2c_core.samples import SIGMA_RANGE, Conditioning, SampleDraws, SampleHost, TrainingDataError, TrainingSet, \
    save_sample

from .errors import BridgeSetupError
from .text_encoder import TextEncoderBridge

__all__ = ["PROMPT_SAMPLES", "PromptBatch", "bridged_prompt_velocity", "save_prompt_sample", "open_prompt_set",
           "check_prompt_set", "prompt_batches"]


@dataclass
class PromptBatch:
    """One training batch for a text-encoder projector: packed clean latents x0 and noise (B, tokens, channels, as
    ``pipe.transformer`` takes them), sigma in (0, 1], ``img_shapes`` as the pipeline builds them, the prompt
    (one string per row) and, for an Edit pipeline, the edit image the encoders read and its packed VAE latents
    (``image_latents``, appended to the DiT's tokens as the Edit pipelines do; ``img_shapes`` then lists both)."""

    x0: Tensor
    noise: Tensor
    sigma: float
    img_shapes: list
    prompt: list
    image: object = None
    image_latents: Optional[Tensor] = None


def bridged_prompt_velocity(bridge: TextEncoderBridge, pipe):
    """``predict(bank, batch) -> (DiT velocity, noise − x0)`` for ``c2c_core.train.velocity_loss``: the pipeline's
    own ``encode_prompt`` runs with the bridge fusing (in training mode, so gradients reach the bank), and the
    frozen DiT predicts the velocity at x_t = (1 − σ)·x0 + σ·noise from those embeddings."""
    if bridge.encoder is None or bridge.encoder is not getattr(pipe, "text_encoder", None):
        raise BridgeSetupError("the bridge is not attached to this pipeline's text encoder; call bridge.attach(pipe).")

    edits = "image" in inspect.signature(pipe.encode_prompt).parameters

    def predict(bank, batch: PromptBatch):
        if bank is not bridge.bundle.bank:
            raise BridgeSetupError("train the bank of the bridge's own bundle (bridge.bundle.bank).")
        first = next(iter(bank.parameters()), None)
        if first is not None and first.device != batch.x0.device:
            raise BridgeSetupError(f"the projector bank is on {first.device} and the latents on {batch.x0.device}; "
                                   f"expected one device. Move the bank there first (bundle.bank.to(device)).")
        if (batch.image is None) != (batch.image_latents is None):
            raise BridgeSetupError("PromptBatch: an edit sample needs both the image (for the encoders) and its "
                                   "image_latents (for the DiT); give both, or neither for text-to-image.")
        if batch.image is not None and not edits:
            raise BridgeSetupError(f"an edit sample (prompt {batch.prompt[0][:60]!r} with an edit image) for "
                                   f"{type(pipe).__name__}, which encodes text only; train edit samples with a "
                                   f"QwenImageEditPipeline, or save text-to-image samples for this one.")
        extra = {} if batch.image is None else {"image": batch.image}
        with bridge.training():
            embeds, mask = pipe.encode_prompt(batch.prompt, device=batch.x0.device, **extra)
        x_t = (1.0 - batch.sigma) * batch.x0 + batch.sigma * batch.noise
        tokens = x_t if batch.image_latents is None else torch.cat([x_t, batch.image_latents.to(x_t)], dim=1)
        dit = pipe.transformer
        velocity = dit(hidden_states=tokens.to(dit.dtype), timestep=torch.full((x_t.shape[0],), batch.sigma,
                                                                                 device=x_t.device),
                       encoder_hidden_states=embeds.to(dit.dtype), encoder_hidden_states_mask=mask,
                       img_shapes=batch.img_shapes, return_dict=False)[0]
        return velocity[:, : x_t.shape[1]], batch.noise - batch.x0

    return predict


#: the samples a text-encoder projector trains on: a clean latent and what both encoders read (the prompt, the edit
#: image); the encoders run at training time, so nothing of theirs is stored
PROMPT_SAMPLES = SampleHost("diffusers-qwen-image", ("receiver_positive",),
                            "c2c_diffusers.text_training.save_prompt_sample")


def save_prompt_sample(folder, x0: Tensor, prompt: str, image=None, image_latents: Optional[Tensor] = None) -> Path:
    """Write one training sample as the next ``sample_NNNNN.safetensors`` in ``folder`` (c2c_core.samples): x0
    (1, C, 1, H, W), the VAE latents normalised as the Qwen-Image pipelines normalise them; the prompt; for an
    edit sample the edit image as the encoders read it (PIL or (H, W, 3) uint8) and its latents (1, C, 1, h, w)."""
    if not isinstance(prompt, str) or not prompt:
        raise BridgeSetupError(f"save_prompt_sample: prompt is {type(prompt).__name__}; expected the caption text.")
    for name, t in (("x0", x0), ("image_latents", image_latents)):
        if t is not None and (t.dim() != 5 or t.shape[0] != 1 or t.shape[2] != 1):
            raise BridgeSetupError(f"save_prompt_sample: {name} has shape {tuple(t.shape)}; expected one image latent "
                                   f"(1, C, 1, H, W) as the Qwen-Image VAE makes it.")
    if (image is None) != (image_latents is None):
        raise BridgeSetupError("save_prompt_sample: an edit sample needs both the image and its image_latents.")
    tensors = {}
    if image is not None:
        pixels = torch.from_numpy(np.array(image.convert("RGB") if hasattr(image, "convert") else image))
        if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[-1] != 3:
            raise BridgeSetupError(f"save_prompt_sample: image of shape {tuple(pixels.shape)} and dtype "
                                   f"{pixels.dtype}; expected a PIL image or (H, W, 3) uint8 pixels.")
        tensors = {"image": pixels.float() / 255.0, "image_latents": image_latents}
    return save_sample(folder, PROMPT_SAMPLES, x0, {"receiver_positive": Conditioning(tensors, {"prompt": prompt})})


def open_prompt_set(folder) -> TrainingSet:
    """The samples ``save_prompt_sample`` wrote into ``folder``, checked from their headers."""
    return TrainingSet.open(folder, PROMPT_SAMPLES)


def check_prompt_set(dataset: TrainingSet, pipe) -> None:
    """Refuse samples the pipeline's DiT cannot train on before any step runs: one image latent (T = 1) of the
    channels its transformer unpacks (``in_channels`` / 4: 2 × 2 patches) and even height and width. Raises
    TrainingDataError naming the sample's index, file and the fix."""
    dit = pipe.transformer
    channels = dit.config.in_channels // 4
    for index, path in enumerate(dataset.paths):
        _, c, t, h, w = dataset.latent_shape(index)
        where = f"sample index {index} ({path.name}) in {dataset.folder}"
        fix = (f"save samples for this pipeline with {PROMPT_SAMPLES.writer} (x0 from its own VAE, normalised as the "
               f"pipeline normalises it), or pick the dataset made for {type(dit).__name__} with {channels}-channel "
               f"latents")
        if c != channels:
            raise TrainingDataError(f"{where}: the latent has {c} channels",
                                    f"the {channels}-channel latent this pipeline's transformer takes "
                                    f"({dit.config.in_channels} packed channels)", fix)
        if t != 1 or h % 2 or w % 2:
            raise TrainingDataError(f"{where}: the latent is (1, {c}, {t}, {h}, {w})",
                                    "one image latent (1, C, 1, H, W) with even H and W (packed in 2 × 2 patches)",
                                    fix)


def _packed(latent: Tensor) -> Tensor:
    """(1, C, 1, H, W) -> (1, H/2 · W/2, 4C): the 2 × 2 patches the Qwen-Image pipelines pack latents into."""
    from diffusers import QwenImagePipeline
    _, c, _, h, w = latent.shape
    return QwenImagePipeline._pack_latents(latent, 1, c, h, w)


def prompt_batches(dataset: TrainingSet, seed: int = 0, device="cpu", sigma_range=SIGMA_RANGE, rank: int = 0,
                   world: int = 1):
    """``batches(step) -> PromptBatch``: one sample per step, drawn by ``c2c_core.samples.SampleDraws`` (a pure
    function of seed and step: a resumed run sees the same batches); sigma uniform in ``sigma_range``. Under
    torchrun each of the ``world`` processes passes its ``rank`` and draws its own share of every step."""
    from PIL import Image
    lo, hi = sigma_range
    draws = SampleDraws(dataset, seed, rank=rank, world=world)

    def batches(step: int) -> PromptBatch:
        (draw,) = draws(step)
        sample = dataset[draw.index]
        role = sample.roles["receiver_positive"]
        shapes = [(1, sample.latent.shape[-2] // 2, sample.latent.shape[-1] // 2)]
        image = latents = None
        if "image" in role.tensors:
            pixels = (role.tensors["image"] * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
            image, latents = Image.fromarray(pixels), _packed(role.tensors["image_latents"]).to(device)
            h, w = role.tensors["image_latents"].shape[-2:]
            shapes.append((1, h // 2, w // 2))
        return PromptBatch(x0=_packed(sample.latent).to(device), noise=_packed(draw.noise).to(device),
                           sigma=lo + (hi - lo) * draw.t, img_shapes=[shapes], prompt=[role.values["prompt"]],
                           image=image, image_latents=latents)
    return batches


