"""Train a projector with diffusers models through the same trainer (``c2c_core.train.train_bank``).

Both transformers stay frozen; only the bank learns, with the receiver's flow-matching objective: the
bridged receiver's velocity at x_t = (1 − σ)·x0 + σ·noise against noise − x0. The bridge fuses through
``FusionRun`` exactly as at inference (the bank is used in place when it already sits on the latents'
device and dtype), so what is trained is what runs.

    bridge = Bridge(bundle, LiveSharer(sharer, inputs)).attach(receiver)
    result = train_bank(bundle.bank, bundle.layer_map, batches, velocity_loss(bridged_velocity(bridge, receiver)),
                        TrainConfig(steps=1000, lr=1e-4))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .errors import BridgeSetupError
from .live import LiveSharer, SharerInputs

__all__ = ["TrainingBatch", "bridged_velocity"]


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
        x_t = (1.0 - batch.sigma) * batch.x0 + batch.sigma * batch.noise
        hidden = x_t if batch.receiver_condition is None else torch.cat([x_t, batch.receiver_condition], dim=1)
        bridge.source.inputs = batch.sharer
        timestep = torch.full((x_t.shape[0],), batch.sigma * 1000.0, device=x_t.device)
        with bridge.session(), receiver.cache_context("cond", sigma=float(batch.sigma)):
            velocity = receiver(hidden_states=hidden.to(receiver.dtype), timestep=timestep,
                                encoder_hidden_states=batch.prompt_embeds,
                                encoder_hidden_states_image=batch.receiver_image_embeds, return_dict=False)[0]
        return velocity, batch.noise - batch.x0

    return predict
