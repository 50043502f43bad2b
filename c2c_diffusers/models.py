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
from c2c_core.arch import ArchTag

from .errors import BridgeSetupError

__all__ = ["blocks", "signature", "arch_tag", "token_grid", "rope_positions_of", "rope_spec", "is_image_to_video"]


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
                          head_dim=attn.inner_dim // attn.heads, name=name or type(transformer).__name__,
                          arch=arch_tag(transformer))


def arch_tag(transformer) -> ArchTag:
    """The host-neutral architecture tag (c2c_core.arch) from the transformer's config: equal to the tag
    ComfyUI gives the same network, so a bundle trained in one host is accepted in the other."""
    config = transformer.config
    attn = blocks(transformer)[0].attn1
    head_dim = attn.inner_dim // attn.heads
    rope = getattr(transformer, "rope", None)
    axes = [getattr(rope, f"{a}_dim", None) for a in "thw"]
    return ArchTag.from_config(dim=attn.inner_dim, ffn_dim=config.ffn_dim, num_heads=attn.heads,
                               num_layers=len(blocks(transformer)), in_channels=config.in_channels,
                               out_channels=config.out_channels, text_dim=config.text_dim,
                               image_embedding=getattr(config, "image_dim", None) is not None,
                               patch_size=config.patch_size,
                               rope_axes=axes if None not in axes else wan_rope_axes(head_dim))


def is_image_to_video(transformer) -> bool:
    """True for I2V/ChronoEdit transformers: 20 condition channels beside the 16 latent ones."""
    return transformer.config.in_channels != transformer.config.out_channels


def token_grid(transformer, latent_shape) -> TokenGrid:
    """The token grid diffusers' Wan patchifies a latent (B, C, T, H, W) into (floor division)."""
    pt, ph, pw = transformer.config.patch_size
    t, h, w = latent_shape[-3:]
    return TokenGrid(frames=t // pt, height=h // ph, width=w // pw)


def rope_positions_of(transformer, latent_shape) -> torch.Tensor:
    """(N, 3) integer (t, y, x) positions the model's RoPE uses for this latent, read from its tables.

    Per axis, the slowest rotary pair (whose angle never wraps) gives a first estimate; the integer
    position near it that best reproduces all of the axis' pairs is taken, so tables kept in bf16 (a
    transformer cast with ``.to(torch.bfloat16)``) are read right too. The whole table is then checked
    against Wan's RoPE at those positions.
    """
    grid = token_grid(transformer, latent_shape)
    probe = torch.empty((1, 1, *latent_shape[-3:]), device="meta")
    cos, sin = transformer.rope(probe)
    head_dim = cos.shape[-1]
    table_dtype = cos.dtype
    cos = cos.reshape(*grid.shape, head_dim)[..., 0::2].detach().to("cpu", torch.float64)
    sin = sin.reshape(*grid.shape, head_dim)[..., 1::2].detach().to("cpu", torch.float64)
    omega, axis = rope_frequencies(head_dim)
    lines = []
    for a in range(3):
        pairs = (axis == a).nonzero().flatten()
        index = [0, 0, 0]
        index[a] = slice(None)
        c, s_ = cos[tuple(index)][:, pairs], sin[tuple(index)][:, pairs]          # (L, pairs of this axis)
        slow = int(pairs[-1] - pairs[0])
        rough = torch.round(torch.atan2(s_[:, slow], c[:, slow]) / omega[pairs[-1]])
        candidates = rough[:, None] + torch.arange(-16, 17, dtype=torch.float64)    # (L, 33)
        angle = candidates[..., None] * omega[pairs]                                 # (L, 33, pairs)
        err = ((torch.cos(angle) - c[:, None]) ** 2 + (torch.sin(angle) - s_[:, None]) ** 2).sum(-1)
        lines.append(candidates.gather(1, err.argmin(1, keepdim=True)).flatten())
    t, y, x = torch.meshgrid(*lines, indexing="ij")
    positions = torch.stack([t, y, x], dim=-1).reshape(-1, 3)
    expected = positions[:, axis] * omega
    tol = max(1e-5, 8 * torch.finfo(table_dtype).eps)
    if not (torch.allclose(torch.cos(expected), cos.reshape(-1, head_dim // 2), atol=tol)
            and torch.allclose(torch.sin(expected), sin.reshape(-1, head_dim // 2), atol=tol)):
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
