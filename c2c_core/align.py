"""Put a sharer's K/V on the receiver's token grid and RoPE positions.

Two mismatches break a naive fusion. (1) Token grids: a sharer run at another resolution or
length has a different (frames, height, width) grid; tokens are resampled on that 3-D grid, never on
the flat sequence (which would mix rows). (2) RoPE positions: Wan rotates keys by their
(t, y, x) position before attention, and ChronoEdit's workflow scales temporal positions
(ScaleROPE scale_t=7); a sharer key at position p must be rotated to the receiver's position q.
RoPE is a rotation per frequency pair, so R(q) R(p)^-1 = R(q - p): one rotation by the difference.
Values carry no RoPE and need no rotation.

The RoPE here reproduces ComfyUI 0.3.75's Wan (comfy/ldm/wan/model.py ``rope_encode``,
comfy/ldm/flux ``rope``/``apply_rope1``): head_dim D splits into axes (D - 4(D//6), 2(D//6),
2(D//6)) = (44, 42, 42) for 128; per axis of size d, omega = 1 / theta ** linspace(0, (d-2)/d,
d/2) in float64; angle = position * omega in float64, cos/sin cast to float32; rotation of the
ADJACENT pair (x[2i], x[2i+1]) by [[cos, -sin], [sin, cos]], computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .arch import wan_rope_axes
from .errors import KVShapeError
from .signature import TokenGrid

__all__ = [
    "GRID_ALIGNMENTS",
    "resample_tokens",
    "rope_frequencies",
    "rope_positions",
    "rope_rotate",
    "rerotate_keys",
    "RopeSpec",
    "RopeRerotation",
    "align_kv",
]

RESAMPLE_MODES = ("nearest", "trilinear")
# What a bridge may do when the two models' token grids differ: refuse, or resample with one of the modes.
GRID_ALIGNMENTS = ("refuse",) + RESAMPLE_MODES


def _check_tokens(x: Tensor, grid: TokenGrid, what: str) -> None:
    if x.dim() != 4:
        raise KVShapeError(f"{what}: expected (B, N, H, D); got shape {tuple(x.shape)}.")
    if x.shape[1] != grid.numel:
        raise KVShapeError(
            f"{what}: tensor has N={x.shape[1]} tokens but grid {grid.shape} has {grid.numel}; "
            f"expected equal. Pass the grid of the latent these K/V were computed on."
        )


def _nearest_index(src: int, dst: int, device) -> Tensor:
    """Source index for each destination index, PyTorch 'nearest' rule floor(i * src / dst)."""
    return torch.div(torch.arange(dst, device=device) * src, dst, rounding_mode="floor")


def resample_tokens(x: Tensor, src: TokenGrid, dst: TokenGrid, mode: str = "nearest") -> Tensor:
    """Resample (B, N_src, H, D) on the (frames, height, width) grid to (B, N_dst, H, D).

    Equal grids return ``x`` itself. ``nearest`` gathers exact values (any dtype);
    ``trilinear`` interpolates in float32 with aligned corners, so the first and last frame, row and
    column map onto each other, as RoPE's linspace positions do, and linear ramps stay exact.
    """
    if mode not in RESAMPLE_MODES:
        raise KVShapeError(f"resample_tokens mode={mode!r}; expected one of {RESAMPLE_MODES}.")
    _check_tokens(x, src, "resample_tokens")
    if src == dst:
        return x
    t, h, w = src.shape
    if mode == "nearest":
        grid = rearrange(x, "b (t h w) n d -> b t h w n d", t=t, h=h, w=w)
        for axis, (a, b) in enumerate(zip(src.shape, dst.shape), start=1):
            if a != b:
                grid = grid.index_select(axis, _nearest_index(a, b, x.device))
        return rearrange(grid, "b t h w n d -> b (t h w) n d")
    heads = x.shape[2]
    volume = rearrange(x.float(), "b (t h w) n d -> b (n d) t h w", t=t, h=h, w=w)
    out = F.interpolate(volume, size=dst.shape, mode="trilinear", align_corners=True)
    return rearrange(out, "b (n d) t h w -> b (t h w) n d", n=heads).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# RoPE


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """(omega, axis) for the D/2 rotary pairs: float64 frequencies and the axis (0=t,1=y,2=x) of each."""
    omegas, axes = [], []
    for axis, d in enumerate(wan_rope_axes(head_dim)):
        scale = torch.linspace(0, (d - 2) / d, steps=d // 2, dtype=torch.float64)
        omegas.append(1.0 / (theta**scale))
        axes.append(torch.full((d // 2,), axis, dtype=torch.long))
    return torch.cat(omegas), torch.cat(axes)


def rope_positions(
    grid: TokenGrid,
    scale: Sequence[float] = (1.0, 1.0, 1.0),
    shift: Sequence[float] = (0.0, 0.0, 0.0),
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """(N, 3) positions (t, y, x) of the grid's tokens as ComfyUI's Wan ``rope_encode`` makes them.

    Per axis of length L: ``linspace(shift, shift + (L-1)*scale, steps=L)``, tokens frames-major.
    ComfyUI builds these in the model's dtype; pass ``dtype`` to reproduce a bf16 model exactly.
    """
    axes = []
    for length, s, o in zip(grid.shape, scale, shift):
        span = (length - 1.0) * s + 1.0  # ComfyUI's "t_len = (t_len - 1.0) * scale_t + 1.0"
        axes.append(torch.linspace(o, o + (span - 1), steps=length, dtype=dtype, device=device))
    t, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([t, y, x], dim=-1).reshape(-1, 3)


def _rotation_table(positions: Tensor, head_dim: int, theta: float) -> Tensor:
    """(N, D/2, 2, 2) float32 rotation matrices, laid out as ComfyUI's ``rope`` output."""
    omega, axis = rope_frequencies(head_dim, theta)
    pos = positions.detach().to(device="cpu", dtype=torch.float64)
    angle = pos[:, axis] * omega  # (N, D/2), float64 as in ComfyUI's einsum
    cos, sin = torch.cos(angle), torch.sin(angle)
    table = torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*angle.shape, 2, 2)
    return table.to(torch.float32)


#: float32 working memory of one chunk when rotating half-precision keys (bytes)
ROTATE_CHUNK_BYTES = 64 * 2**20


def _rotate_f32(x: Tensor, table: Tensor) -> Tensor:
    """The rotation itself, in float32: (B, n, H, D) by an (n, 1, D/2, 2, 2) table; returns float32."""
    pairs = x.to(torch.float32).reshape(*x.shape[:-1], -1, 1, 2)
    out = table[..., 0] * pairs[..., 0]
    out.addcmul_(table[..., 1], pairs[..., 1])
    return out.reshape(x.shape)


def _apply_table(x: Tensor, table: Tensor, chunk_bytes: int | None = None) -> Tensor:
    """Rotate adjacent pairs of (B, N, H, D) by a (N, D/2, 2, 2) table, in float32, as ComfyUI does.

    float32 keys are rotated in one pass. Half-precision keys are rotated a chunk of tokens at a time
    into an output of their own dtype, so no float32 copy of the whole key exists (a bf16 K of a
    real Wan layer is ~0.3 GB; its float32 copy and product twice that each). Every element goes
    through the same float32 operations either way, so the result is bit-identical to one pass.
    """
    table = table.to(x.device).unsqueeze(1)  # (N, 1, D/2, 2, 2): broadcast over heads
    if x.dtype == torch.float32:
        return _rotate_f32(x, table)
    per_token = max(1, x.shape[0] * x.shape[2] * x.shape[3] * 4)
    step = max(1, (ROTATE_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // per_token)
    if step >= x.shape[1]:
        return _rotate_f32(x, table).to(x.dtype)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for i in range(0, x.shape[1], step):
        out[:, i:i + step] = _rotate_f32(x[:, i:i + step], table[i:i + step])
    return out


def _check_positions(x: Tensor, positions: Tensor, what: str) -> None:
    if x.dim() != 4:
        raise KVShapeError(f"{what}: expected keys (B, N, H, D); got shape {tuple(x.shape)}.")
    if positions.dim() != 2 or positions.shape != (x.shape[1], 3):
        raise KVShapeError(
            f"{what}: positions have shape {tuple(positions.shape)}; expected ({x.shape[1]}, 3) = "
            f"(N, [t, y, x]) for N={x.shape[1]} tokens. Build them with rope_positions(grid)."
        )


def rope_rotate(x: Tensor, positions: Tensor, theta: float = 10000.0) -> Tensor:
    """Apply Wan's RoPE at ``positions`` (N, 3) to x (B, N, H, D); returns x's dtype."""
    _check_positions(x, positions, "rope_rotate")
    return _apply_table(x, _rotation_table(positions, x.shape[-1], theta))


class RopeRerotation:
    """Precomputed rotation from one position set to another, reused across layers and steps.

    Built once per run (positions are small, on the CPU); ``apply`` then costs two multiplies
    and an add per element, uploads its table once per device, and never reads the GPU. Identical positions make it a no-op that
    returns the key object itself.
    """

    def __init__(self, src_positions: Tensor, dst_positions: Tensor, head_dim: int, theta: float = 10000.0):
        if src_positions.shape != dst_positions.shape or src_positions.dim() != 2 or src_positions.shape[-1] != 3:
            raise KVShapeError(
                f"RopeRerotation: source positions {tuple(src_positions.shape)} and target "
                f"{tuple(dst_positions.shape)}; expected two (N, 3) tensors for the same N. "
                f"Resample tokens to the receiver's grid first."
            )
        src = src_positions.detach().to("cpu", torch.float64)
        dst = dst_positions.detach().to("cpu", torch.float64)
        self.num_tokens = src.shape[0]
        self.head_dim = head_dim
        self.is_identity = bool(torch.equal(src, dst))
        self._table = None if self.is_identity else _rotation_table(dst - src, head_dim, theta)
        self._on_device: dict[torch.device, Tensor] = {}

    def apply(self, k: Tensor) -> Tensor:
        """k (B, N, H, D) rotated from the source to the target positions."""
        if self.is_identity:
            return k
        if k.dim() != 4 or k.shape[1] != self.num_tokens or k.shape[-1] != self.head_dim:
            raise KVShapeError(
                f"RopeRerotation.apply: key shape {tuple(k.shape)}; expected (B, {self.num_tokens}, "
                f"H, {self.head_dim}) as the rotation was built for."
            )
        table = self._on_device.get(k.device)
        if table is None:
            table = self._on_device[k.device] = self._table.to(k.device)
        return _apply_table(k, table)


def rerotate_keys(k: Tensor, src_positions: Tensor, dst_positions: Tensor, theta: float = 10000.0) -> Tensor:
    """Re-rotate RoPE'd keys (B, N, H, D) from ``src_positions`` to ``dst_positions`` (N, 3 each).

    One rotation by the difference (float64 angles, float32 rotation). Against rotating the
    un-rotated key directly at the target it agrees to ~1e-5 absolute in float32 for unit-scale
    keys (tests/core/test_align.py). Identical positions return ``k`` itself. For repeated use
    (every layer, every step) build a :class:`RopeRerotation` once instead.
    """
    _check_positions(k, src_positions, "rerotate_keys (source)")
    _check_positions(k, dst_positions, "rerotate_keys (target)")
    if src_positions is dst_positions:
        return k
    return RopeRerotation(src_positions, dst_positions, k.shape[-1], theta).apply(k)


@dataclass(frozen=True)
class RopeSpec:
    """How a model's RoPE positions are made: theta plus ComfyUI ScaleROPE scale/shift per (t, y, x)."""

    theta: float = 10000.0
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    shift: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def positions(self, grid: TokenGrid, dtype: torch.dtype = torch.float32) -> Tensor:
        return rope_positions(grid, self.scale, self.shift, dtype=dtype)

    @classmethod
    def from_rope_options(cls, options: Optional[Mapping], theta: float = 10000.0) -> "RopeSpec":
        """From ComfyUI's ``transformer_options["rope_options"]`` (keys scale_t/y/x, shift_t/y/x)."""
        o = options or {}
        return cls(
            theta=theta,
            scale=(float(o.get("scale_t", 1.0)), float(o.get("scale_y", 1.0)), float(o.get("scale_x", 1.0))),
            shift=(float(o.get("shift_t", 0.0)), float(o.get("shift_y", 0.0)), float(o.get("shift_x", 0.0))),
        )

    def to_dict(self) -> dict:
        return {"theta": self.theta, "scale": list(self.scale), "shift": list(self.shift)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RopeSpec":
        return cls(float(d.get("theta", 10000.0)), tuple(d.get("scale", (1.0, 1.0, 1.0))), tuple(d.get("shift", (0.0, 0.0, 0.0))))


def align_kv(
    k: Tensor,
    v: Tensor,
    src_grid: TokenGrid,
    dst_grid: TokenGrid,
    src_rope: RopeSpec = RopeSpec(),
    dst_rope: RopeSpec = RopeSpec(),
    mode: str = "nearest",
) -> tuple[Tensor, Tensor]:
    """Bring a sharer's (k, v) onto the receiver's grid and RoPE positions.

    Same grid: one re-rotation of k. Different grids: un-rotate k at its own positions, resample
    k and v on the grid, rotate k at the receiver's positions (rotated keys must not be
    interpolated, their phases would mix). Inputs already aligned come back as the same objects.
    """
    if src_rope.theta != dst_rope.theta:
        raise KVShapeError(
            f"align_kv: RoPE theta {src_rope.theta} vs {dst_rope.theta}; expected equal (Wan uses 10000)."
        )
    if src_grid == dst_grid:
        if src_rope == dst_rope:
            return k, v
        src_pos, dst_pos = src_rope.positions(src_grid), dst_rope.positions(dst_grid)
        return rerotate_keys(k, src_pos, dst_pos, src_rope.theta), v
    src_pos = src_rope.positions(src_grid)
    plain = rerotate_keys(k, src_pos, torch.zeros_like(src_pos), src_rope.theta)
    k_dst = resample_tokens(plain, src_grid, dst_grid, mode)
    v_dst = resample_tokens(v, src_grid, dst_grid, mode)
    return rope_rotate(k_dst, dst_rope.positions(dst_grid), dst_rope.theta), v_dst
