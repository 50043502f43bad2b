"""What the bridge needs to know about a diffusers Wan-family transformer, read from the model itself.

Duck-typed: ``WanTransformer3DModel``, ``ChronoEditTransformer3DModel`` (its own copies of the Wan
classes) and anything else with ``blocks[i].attn1``, ``config.patch_size`` and a ``rope`` module that
returns Wan's (cos, sin) tables. RoPE positions are not assumed: they are read back from the tables
the model's own ``rope`` produces for a latent shape, so ChronoEdit's temporal positions [0, 7] for
2-frame latents (and any future variant) are found, and a table that is not Wan's RoPE is refused
instead of silently mis-rotating keys.
"""
from __future__ import annotations

import math

import torch

from c2c_core import ModelSignature, RopeSpec, TokenGrid, rope_frequencies, wan_rope_axes

from .errors import BridgeSetupError

__all__ = ["blocks", "signature", "token_grid", "rope_positions_of", "rope_spec", "is_image_to_video"]


def blocks(transformer) -> list:
    found = getattr(transformer, "blocks", None)
    if found is None or not len(found) or not hasattr(found[0], "attn1"):
        raise BridgeSetupError(
            f"expected a Wan-family diffusers transformer (blocks[i].attn1, e.g. WanTransformer3DModel or "
            f"ChronoEditTransformer3DModel); got {type(transformer).__name__}. Pass pipe.transformer of a Wan, "
            f"Wan2.2 or ChronoEdit pipeline.")
    return list(found)


def signature(transformer, name: str = "") -> ModelSignature:
    """Layers, heads and head_dim of the self-attention, read from the modules."""
    attn = blocks(transformer)[0].attn1
    return ModelSignature(num_layers=len(blocks(transformer)), num_heads=attn.heads,
                          head_dim=attn.inner_dim // attn.heads, name=name or type(transformer).__name__)


def is_image_to_video(transformer) -> bool:
    """True for I2V/ChronoEdit transformers: 20 condition channels beside the 16 latent ones."""
    return transformer.config.in_channels != transformer.config.out_channels


def token_grid(transformer, latent_shape) -> TokenGrid:
    """The token grid diffusers' Wan patchifies a latent (B, C, T, H, W) into (floor division)."""
    pt, ph, pw = transformer.config.patch_size
    t, h, w = latent_shape[-3:]
    return TokenGrid(frames=t // pt, height=h // ph, width=w // pw)


def rope_positions_of(transformer, latent_shape) -> torch.Tensor:
    """(N, 3) integer (t, y, x) positions the model's RoPE uses for this latent, read from its tables."""
    probe = torch.empty((1, 1, *latent_shape[-3:]), device="meta")
    cos, sin = transformer.rope(probe)
    head_dim = cos.shape[-1]
    cos = cos.reshape(-1, head_dim)[:, 0::2].detach().to("cpu", torch.float64)
    sin = sin.reshape(-1, head_dim)[:, 1::2].detach().to("cpu", torch.float64)
    omega, axis = rope_frequencies(head_dim)
    positions = []
    for a in range(3):
        pair = int((axis == a).nonzero()[-1])    # the slowest pair of the axis: its angle never wraps
        angle = torch.atan2(sin[:, pair], cos[:, pair])
        positions.append(torch.round(angle / omega[pair]))
    positions = torch.stack(positions, dim=-1)
    expected = positions[:, axis] * omega
    if not (torch.allclose(torch.cos(expected), cos, atol=1e-5) and torch.allclose(torch.sin(expected), sin, atol=1e-5)):
        raise BridgeSetupError(
            f"{type(transformer).__name__}.rope does not produce Wan's RoPE (theta 10000, axes "
            f"{wan_rope_axes(head_dim)}); the bridge cannot re-rotate its keys. Use a Wan-family transformer.")
    return positions


def rope_spec(transformer, latent_shape) -> RopeSpec:
    """The RopeSpec (per-axis scale and shift) that reproduces the model's positions for this latent."""
    grid = token_grid(transformer, latent_shape)
    positions = rope_positions_of(transformer, latent_shape).reshape(*grid.shape, 3)
    scale, shift = [], []
    for a, length in enumerate(grid.shape):
        line = positions.select(3, a).movedim(a, 0).reshape(length, -1)[:, 0]
        step = float(line[1] - line[0]) if length > 1 else 1.0
        scale.append(step)
        shift.append(float(line[0]))
    spec = RopeSpec(theta=10000.0, scale=tuple(scale), shift=tuple(shift))
    if not torch.equal(spec.positions(grid, dtype=torch.float64), positions.reshape(-1, 3)):
        raise BridgeSetupError(
            f"{type(transformer).__name__}: RoPE positions for latent {tuple(latent_shape[-3:])} are not evenly "
            f"spaced per axis; expected a scaled/shifted grid as Wan and ChronoEdit use.")
    if not all(math.isfinite(v) for v in (*scale, *shift)):
        raise BridgeSetupError(f"{type(transformer).__name__}: could not read RoPE positions.")
    return spec
