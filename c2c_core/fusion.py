"""Apply a projector bank, a layer map, a strength and a schedule to one layer's K or V.

This is the per-layer, per-step path, so it stays cheap: strengths are Python floats, a
zero strength returns the receiver's tensor object untouched without running the projector, and
nothing here reads a GPU tensor to make a decision.

``fuse`` is what every host's runtime (c2c_core.runtime.FusionRun) blends with; ``LayerFuser`` is the
simple per-layer reference the runtime checks its layer map with. Bidirectional fusion is two one-way
runs, each with its own bank (c2c_comfy/lockstep.py, c2c_diffusers/lockstep.py).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from .errors import FusionError, LayerMapError
from .mapping import LayerMap
from .projectors import ProjectorBank
from .schedule import FusionSchedule

__all__ = ["fuse", "LayerFuser", "FusionError"]


def _strength(value: Any, what: str = "strength") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FusionError(
            f"{what}={value!r} ({type(value).__name__}); expected a finite Python float. A tensor "
            f"strength would force a GPU read per layer; convert it once with float()."
        )
    return float(value)


def fuse(projected: Tensor, receiver: Tensor, strength: float, *, inplace: bool = False,
         protect: Sequence[Tensor] = ()) -> Tensor:
    """Blend ``receiver`` toward ``projected`` (same shape): ``receiver + strength * (projected - receiver)``.

    strength 0 returns ``receiver`` itself; strength 1 returns ``projected`` itself. With
    ``inplace=True`` the blend is written into ``projected`` (the projector's fresh output, handed over
    by the caller) instead of a new K/V-sized tensor, unless ``projected`` shares memory with
    ``receiver`` or with a tensor in ``protect`` (an identity projector returns the sharer's own K),
    or autograd records the call. Same lerp kernel either way: bit-identical results.
    """
    s = _strength(strength)
    if s == 0.0:
        return receiver
    if s == 1.0:
        return projected
    if projected.shape != receiver.shape:
        raise FusionError(
            f"fuse: projected {tuple(projected.shape)} vs receiver {tuple(receiver.shape)}; expected "
            f"equal shapes (project the sharer into the receiver's space first)."
        )
    projected = projected.to(receiver.dtype)
    if inplace and projected.is_contiguous() and _owned(projected, (receiver, *protect)):
        return torch.lerp(receiver, projected, s, out=projected)
    return torch.lerp(receiver, projected, s)


def _owned(t: Tensor, others: Sequence[Tensor]) -> bool:
    """True when ``t`` may be overwritten: no storage shared with ``others``, no autograd recording."""
    if torch.is_grad_enabled() and (t.requires_grad or any(o.requires_grad for o in others)):
        return False
    ptr = t.untyped_storage().data_ptr()
    return all(o.untyped_storage().data_ptr() != ptr for o in others)


class LayerFuser:
    """One-way fusion sharer -> receiver over the layers of a map.

    Effective strength of receiver layer l at progress p:
    ``strength * layer_map.strength(l) * schedule ramp(p)`` (0 outside the window).
    """

    def __init__(self, bank: ProjectorBank, layer_map: LayerMap, schedule: FusionSchedule, strength: float):
        self.bank = bank
        self.layer_map = layer_map
        self.schedule = schedule
        self.strength = _strength(strength)
        if self.strength < 0:
            raise FusionError(f"LayerFuser strength={strength}; expected >= 0.")
        try:
            layer_map.validate(bank.sharer, bank.receiver)
        except LayerMapError as exc:
            raise FusionError(f"LayerFuser: layer map does not fit the projector bank: {exc}") from None
        missing = [i for i in layer_map.layers if i not in bank.layers]
        if missing:
            raise FusionError(
                f"LayerFuser: the layer map fuses receiver layers {missing} but the projector bank has "
                f"no projectors for them (bank layers {bank.layers}). Restrict the map to the bank's layers."
            )

    @property
    def layers(self) -> list[int]:
        return self.layer_map.layers

    def sharer_layer(self, layer: int) -> int:
        return self.layer_map.sharer_layer(layer)

    def strength_at(self, layer: int, progress: float) -> float:
        return self.schedule.strength_at(progress, self.strength * self.layer_map.strength(layer))

    def fuse_layer(self, layer: int, which: str, sharer_t: Tensor, receiver_t: Tensor, progress: float) -> Tensor:
        """sharer_t (B, N, Hs, Ds), receiver_t (B, N, Ht, Dt) -> fused (B, N, Ht, Dt).

        Returns ``receiver_t`` itself, without running the projector, where the strength is 0.
        """
        if layer not in self.layer_map.pairs:
            raise FusionError(f"LayerFuser.fuse_layer: receiver layer {layer} is not fused; fused layers are {self.layers}.")
        s = self.strength_at(layer, progress)
        if s == 0.0:
            return receiver_t
        projected = self.bank.project(layer, which, sharer_t, receiver_t)
        return fuse(projected, receiver_t, s, inplace=True, protect=(sharer_t,))
