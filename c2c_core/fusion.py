"""Apply a projector bank, a layer map, a strength and a schedule to one layer's K or V.

This is the per-layer, per-step path, so it stays cheap: strengths are Python floats, a
zero strength returns the receiver's tensor object untouched without running the projector, and
nothing here reads a GPU tensor to make a decision. A compiled receiver traces it (docs/compile.md): the
only decision that looks at memory, whether the blend may overwrite the projector's output, is an eager-mode
optimisation and is skipped while torch.compile traces (the compiler plans its own buffers).

``fuse`` is what every host's runtime (c2c_core.runtime.FusionRun) blends with; ``check_fusion`` is the
check FusionRun makes before a run. Bidirectional fusion is two one-way runs, each with its own bank
(c2c_core/lockstep.py).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from .errors import FusionError, LayerMapError
from .mapping import LayerMap
from .projectors import ProjectorBank

__all__ = ["fuse", "lerp", "check_fusion", "FusionError"]


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
    return lerp(projected, receiver, s, inplace=inplace, protect=protect)


def lerp(projected: Tensor, receiver: Tensor, weight, *, inplace: bool = False, protect: Sequence[Tensor] = ()) -> Tensor:
    """:func:`fuse`'s blend without its checks and shortcuts: ``torch.lerp(receiver, projected, weight)`` in the
    receiver's dtype, written into ``projected`` under the same conditions. ``weight`` is a checked Python float,
    or, where torch.compile traces, a 0-d tensor holding it (a graph input: a new strength is no recompile)."""
    projected = projected.to(receiver.dtype)
    if inplace and projected.is_contiguous() and _owned(projected, (receiver, *protect)):
        return torch.lerp(receiver, projected, weight, out=projected)
    return torch.lerp(receiver, projected, weight)


def _owned(t: Tensor, others: Sequence[Tensor]) -> bool:
    """True when ``t`` may be overwritten: no storage shared with ``others``, no autograd recording.

    Never while torch.compile traces: storage pointers cannot be traced (a graph break per layer), and a
    compiled graph reuses buffers on its own, so writing into ``t`` would only add a mutation to the graph.
    """
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (t.requires_grad or any(o.requires_grad for o in others)):
        return False
    ptr = t.untyped_storage().data_ptr()
    return all(o.untyped_storage().data_ptr() != ptr for o in others)


def check_fusion(bank: ProjectorBank, layer_map: LayerMap, strength: Any) -> float:
    """Refuse a fusion that cannot run: a strength that is no finite float >= 0, or a layer map that does not
    fit the bank (other models, or receiver layers without projectors). Returns the strength as a float."""
    s = _strength(strength)
    if s < 0:
        raise FusionError(f"FusionRun strength={strength}; expected >= 0.")
    try:
        layer_map.validate(bank.sharer, bank.receiver)
    except LayerMapError as exc:
        raise FusionError(f"FusionRun: layer map does not fit the projector bank: {exc}") from None
    missing = [i for i in layer_map.layers if i not in bank.layers]
    if missing:
        raise FusionError(
            f"FusionRun: the layer map fuses receiver layers {missing} but the projector bank has "
            f"no projectors for them (bank layers {bank.layers}). Restrict the map to the bank's layers."
        )
    return s
