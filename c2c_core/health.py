"""Run health without host syncs: non-finite fused K/V are noted on the device and read once.

A NaN in one fused layer turns the whole picture black, yet checking each layer with ``.item()``
would stall the GPU every layer of every step. :class:`FiniteWatch` keeps one device
flag per layer, updated with a min/max reduction (NaN and Inf survive it; no temporary the size
of the tensor), and is read back once, when the run closes. :func:`strict_json` makes reports safe
for browsers, whose JSON has no NaN or Infinity.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["FiniteWatch", "note_finite", "strict_json", "nonfinite_hint"]


class FiniteWatch:
    """Per-layer "every value so far was finite" flags, kept as device tensors until :meth:`bad_layers`.

    A layer's flag is one tensor for the whole run, updated in place (:func:`note_finite`), so a compiled
    receiver's graph takes it as an input instead of storing a new tensor per layer into Python state.
    """

    def __init__(self):
        self._flags: dict[int, Tensor] = {}

    def flag(self, layer: int, device) -> Tensor:
        """The layer's flag (a 0-d bool tensor on ``device``, True until a non-finite value is noted into it)."""
        flag = self._flags.get(layer)
        if flag is None:
            flag = self._flags[layer] = torch.ones((), dtype=torch.bool, device=device)
        return flag

    def observe(self, layer: int, *tensors: Tensor) -> None:
        if tensors:
            note_finite(self.flag(layer, tensors[0].device), *tensors)

    def bad_layers(self) -> list[int]:
        """Layers that saw NaN or Inf; the one host read of the run."""
        if not self._flags:
            return []
        layers = sorted(self._flags)
        flags = torch.stack([self._flags[i].to("cpu") for i in layers]).tolist()
        return [layer for layer, ok in zip(layers, flags) if not ok]

    def reset(self) -> None:
        self._flags = {}


def note_finite(flag: Tensor, *tensors: Tensor) -> None:
    """AND into ``flag`` whether every value of ``tensors`` is finite: a min/max reduction on the device, no read."""
    with torch.no_grad():
        for t in tensors:
            if t.numel() == 0 or not t.is_floating_point():
                continue
            lo, hi = torch.aminmax(t)
            flag.logical_and_(torch.isfinite(lo) & torch.isfinite(hi))


def nonfinite_hint(layers: list[int]) -> str:
    """What a user can do about NaN/Inf in the fused K/V of ``layers``."""
    shown = layers[:8] + (["…"] if len(layers) > 8 else [])
    return (f"the fused K/V of receiver layers {shown} held NaN or Inf values, so the sampled latent is "
            f"garbage (black). Likely causes: a strength or layer strength far above 1, a projector whose "
            f"training diverged, a recording with NaN K/V, or fp16 overflow. Lower the strength, use another "
            f"projector or recording, or run the models in bf16/fp32")


def strict_json(value):
    """``value`` with every non-finite float replaced by None (``json.dumps(allow_nan=False)`` then works)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value
