"""M-RoPE of the Qwen vision-language text encoders: positions (3, N), rotation, re-rotation of sharer keys.

Why: a causal text encoder rotates each key by its position before attention. When a sharer's keys are
fused into a receiver, each aligned sharer key must sit at the receiver token's position, or the
receiver's queries would read it at the wrong relative distance. RoPE is a rotation per frequency pair,
so moving a key from position p to q is one rotation by q - p.

M-RoPE (multimodal RoPE) gives each token three positions, (t, h, w): text tokens have t = h = w =
their sequence position; an image's merged vision tokens share one t and take their row and column
on the image grid. Each of the D/2 rotary frequency pairs reads one of the three axes:

* Qwen2.5-VL (``sections=(16, 24, 24)``, not interleaved): pairs 0-15 read t, 16-39 h, 40-63 w;
* Qwen3-VL (``sections=(24, 20, 20)``, interleaved): pair i reads h when i % 3 == 1, w when
  i % 3 == 2 (for i < 3 * sections), t otherwise.

Rotation pairs dimension i with i + D/2 ("rotate half", not Wan's adjacent pairs). :func:`mrope_rotate`
reproduces ComfyUI's ``precompute_freqs_cis`` + ``apply_rope`` (comfy/text_encoders/llama.py, 0.3.75 and
0.33.0) bit for bit: float32 inverse frequencies ``1 / theta ** (arange(0, D, 2) / D)``, float32 angles,
float32 cos/sin, the product in float32, cast back to the key's dtype. Re-rotation
(:class:`MRopeRerotation`) uses the same float32 frequencies with float64 angle differences; against
rotating at the target directly it agrees to float tolerance (tests/core/test_mrope.py), not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .errors import KVShapeError

__all__ = ["MRopeSpec", "QWEN25_VL_MROPE", "QWEN3_VL_MROPE", "VisionGrid", "mrope_positions", "mrope_rotate",
           "MRopeRerotation"]


@dataclass(frozen=True)
class MRopeSpec:
    """How one model rotates its keys: head_dim, theta, rotary pairs per axis (t, h, w), interleaved or not."""

    head_dim: int
    theta: float
    sections: tuple = (16, 24, 24)
    interleaved: bool = False

    def __post_init__(self) -> None:
        if type(self.head_dim) is not int or self.head_dim < 2 or self.head_dim % 2:
            raise KVShapeError(f"MRopeSpec head_dim is {self.head_dim!r}; expected an even integer >= 2.")
        if not (isinstance(self.theta, (int, float)) and not isinstance(self.theta, bool) and self.theta > 1):
            raise KVShapeError(f"MRopeSpec theta is {self.theta!r}; expected a number > 1 (Qwen2.5-VL 1e6, Qwen3-VL 5e6).")
        s = tuple(self.sections)
        if len(s) != 3 or any(type(n) is not int or n < 0 for n in s) or sum(s) != self.head_dim // 2:
            raise KVShapeError(f"MRopeSpec sections {self.sections!r}; expected three counts (t, h, w) of rotary "
                               f"pairs summing to head_dim / 2 = {self.head_dim // 2}.")
        object.__setattr__(self, "sections", s)
        object.__setattr__(self, "theta", float(self.theta))

    def inv_freq(self) -> Tensor:
        """(D/2,) float32 inverse frequencies, computed as the host computes them."""
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))

    def pair_axes(self) -> Tensor:
        """(D/2,) long: the position axis (0 = t, 1 = h, 2 = w) each rotary pair reads."""
        half = self.head_dim // 2
        if self.interleaved:
            axes = torch.zeros(half, dtype=torch.long)
            for axis in (1, 2):
                axes[slice(axis, 3 * self.sections[axis], 3)] = axis
            return axes
        return torch.cat([torch.full((n,), axis, dtype=torch.long) for axis, n in enumerate(self.sections)])

    def to_dict(self) -> dict:
        return {"head_dim": self.head_dim, "theta": self.theta, "sections": list(self.sections),
                "interleaved": self.interleaved}


#: Qwen2.5-VL-7B (Qwen-Image's text encoder) and Qwen3-VL 4B/8B, as ComfyUI's configs give them
QWEN25_VL_MROPE = MRopeSpec(head_dim=128, theta=1_000_000.0, sections=(16, 24, 24), interleaved=False)
QWEN3_VL_MROPE = MRopeSpec(head_dim=128, theta=5_000_000.0, sections=(24, 20, 20), interleaved=True)


@dataclass(frozen=True)
class VisionGrid:
    """One image's vision tokens in a sequence: the index of the first, and the merged grid (t, h, w).

    Merged = after the vision tower's 2x2 patch merge (Qwen2.5-VL: 28 px per token, Qwen3-VL: 32 px);
    the block holds t * h * w tokens, row-major, as both hosts lay them out.
    """

    start: int
    grid: tuple

    def __post_init__(self) -> None:
        g = tuple(self.grid)
        if type(self.start) is not int or self.start < 0 or len(g) != 3 or any(type(n) is not int or n < 1 for n in g):
            raise KVShapeError(f"VisionGrid(start={self.start!r}, grid={self.grid!r}); expected a token index >= 0 "
                               f"and a merged grid of three positive integers (t, h, w).")
        if g[0] != 1:
            raise KVShapeError(f"VisionGrid grid {g}: {g[0]} frames; the Qwen text encoders here take images (t = 1), "
                               f"not video.")
        object.__setattr__(self, "grid", g)

    @classmethod
    def from_patch_grid(cls, start: int, grid_thw, merge: int = 2) -> "VisionGrid":
        """From a vision tower's patch grid (t, h, w) before the merge, as both hosts hand it over (ComfyUI's
        ``embeds_info[i]["extra"]``, transformers' ``image_grid_thw`` row): images are one temporal patch."""
        thw = [int(n) for n in torch.as_tensor(grid_thw).reshape(-1).tolist()]
        if len(thw) != 3 or thw[1] % merge or thw[2] % merge:
            raise KVShapeError(f"VisionGrid.from_patch_grid: patch grid {thw} is not (t, h, w) with h and w "
                               f"multiples of the {merge}x{merge} merge; expected the grid the vision tower reports.")
        return cls(int(start), (thw[0], thw[1] // merge, thw[2] // merge))

    @property
    def size(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def end(self) -> int:
        return self.start + self.size


def mrope_positions(num_tokens: int, vision: Sequence[VisionGrid] = (), device=None) -> Tensor:
    """(3, N) long M-RoPE positions of a sequence of N tokens holding ``vision`` blocks, as the hosts make them.

    Text runs sequentially; an image block starting at position p gets t = p, h = p + row, w = p + column,
    and the text after it resumes at p + max(h, w) (ComfyUI's ``qwen2vl_mrope_position_ids`` and
    Qwen2.5-VL's forward, transformers' ``get_rope_index``). Without images every axis is the token index.
    Padding is not skipped here: a host that pads inside a prompt passes its own positions.
    """
    blocks = sorted(vision, key=lambda b: b.start)
    pos = torch.zeros(3, num_tokens, dtype=torch.long, device=device)
    cursor, next_pos = 0, 0
    for b in blocks:
        if b.start < cursor or b.end > num_tokens:
            raise KVShapeError(f"mrope_positions: vision block at {b.start}..{b.end} overlaps another or runs past "
                               f"the {num_tokens} tokens; expected disjoint blocks inside the sequence.")
        n = b.start - cursor
        pos[:, cursor:b.start] = torch.arange(next_pos, next_pos + n, device=device)
        p = next_pos + n
        _, h, w = b.grid
        pos[0, b.start:b.end] = p
        pos[1, b.start:b.end] = p + torch.arange(h, device=device).repeat_interleave(w)
        pos[2, b.start:b.end] = p + torch.arange(w, device=device).repeat(h)
        cursor, next_pos = b.end, p + max(h, w)
    pos[:, cursor:] = torch.arange(next_pos, next_pos + num_tokens - cursor, device=device)
    return pos


def _check(x: Tensor, positions: Tensor, spec: MRopeSpec, what: str) -> None:
    if x.dim() != 4 or x.shape[-1] != spec.head_dim:
        raise KVShapeError(f"{what}: keys have shape {tuple(x.shape)}; expected (B, N, H, {spec.head_dim}).")
    if positions.dim() != 2 or positions.shape != (3, x.shape[1]):
        raise KVShapeError(f"{what}: positions have shape {tuple(positions.shape)}; expected (3, {x.shape[1]}) = "
                           f"([t, h, w], N). Build them with mrope_positions.")


def _cos_sin(angle: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin over the full head_dim (each pair's angle twice: i and i + D/2), float32."""
    emb = torch.cat((angle, angle), dim=-1)
    return emb.cos().to(torch.float32), emb.sin().to(torch.float32)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, N, H, D) rotated by (N, D) cos/sin, in the host's order of float32 operations; x's dtype back."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], -sin[..., :half])
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out.to(x.dtype)


def mrope_rotate(x: Tensor, positions: Tensor, spec: MRopeSpec) -> Tensor:
    """Rotate x (B, N, H, D) by M-RoPE at ``positions`` (3, N): bit-identical to ComfyUI's rotation."""
    _check(x, positions, spec, "mrope_rotate")
    inv = spec.inv_freq().to(x.device)
    freqs = positions.to(device=x.device).float()[:, :, None] * inv       # (3, N, D/2), float32 as the host
    angle = freqs.gather(0, spec.pair_axes().to(x.device)[None, None, :].expand(1, *freqs.shape[1:]))[0]
    return _rotate(x, *_cos_sin(angle))


class MRopeRerotation:
    """Moves keys from ``src`` to ``dst`` positions (3, N each) under one model's M-RoPE, built once per run.

    Identical positions make it a no-op returning the key object itself. Angles are the float32
    frequencies times the float64 position difference; the rotation runs in float32.
    """

    def __init__(self, src: Tensor, dst: Tensor, spec: MRopeSpec):
        if src.shape != dst.shape or src.dim() != 2 or src.shape[0] != 3:
            raise KVShapeError(f"MRopeRerotation: source positions {tuple(src.shape)} and target {tuple(dst.shape)}; "
                               f"expected two (3, N) tensors for the same N.")
        self.spec, self.num_tokens = spec, src.shape[1]
        src, dst = src.detach().to("cpu", torch.float64), dst.detach().to("cpu", torch.float64)
        self.is_identity = bool(torch.equal(src, dst))
        self._table: Optional[tuple[Tensor, Tensor]] = None
        if not self.is_identity:
            delta = (dst - src)[spec.pair_axes()].T                           # (N, D/2): each pair's own axis
            self._table = _cos_sin(delta * spec.inv_freq().double())
        self._on_device: dict = {}

    def apply(self, k: Tensor) -> Tensor:
        if self.is_identity:
            return k
        if k.dim() != 4 or k.shape[1] != self.num_tokens or k.shape[-1] != self.spec.head_dim:
            raise KVShapeError(f"MRopeRerotation.apply: key shape {tuple(k.shape)}; expected (B, {self.num_tokens}, "
                               f"H, {self.spec.head_dim}) as the rotation was built for.")
        table = self._on_device.get(k.device)
        if table is None:
            table = self._on_device[k.device] = tuple(t.to(k.device) for t in self._table)
        return _rotate(k, *table)
