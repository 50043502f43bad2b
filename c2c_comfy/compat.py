"""The one module that knows ComfyUI's Wan internals.

Everything else in the pack talks to Wan models through these functions. They rely only on
what ComfyUI documents as patch points (``patches_replace["dit"][("double_block", i)]``,
``transformer_options["optimized_attention_override"]``, ``rope_options``) and read, never
write, the model's modules. If ComfyUI changes Wan's internals, this is the file to update.
"""
from __future__ import annotations

import math
from typing import Callable

import comfy.ldm.wan.model as wan_model

from ..c2c_core import ModelSignature, RopeSpec, TokenGrid

# Wan patchifies latents with (t, h, w) = (1, 2, 2); ComfyUI rounds odd sizes up.
PATCH_SIZE = (1, 2, 2)

# (layer, q, k, v, heads, transformer_options) -> (k, v); tensors are (B, N, H*D), k RoPE-rotated.
SelfAttentionHook = Callable[..., tuple]


class NotAWanModel(TypeError):
    """Raised when a MODEL input is not a Wan2.1-architecture diffusion model."""


def diffusion_model(patcher):
    return patcher.model.diffusion_model


def is_wan(patcher) -> bool:
    return isinstance(getattr(getattr(patcher, "model", None), "diffusion_model", None), wan_model.WanModel)


def wan_signature(patcher, name: str = "") -> ModelSignature:
    """Layers, heads and head_dim of a Wan model, read from its modules (weights stay untouched)."""
    if not is_wan(patcher):
        found = type(getattr(getattr(patcher, "model", None), "diffusion_model", patcher)).__name__
        raise NotAWanModel(f"expected a Wan2.1-architecture model (WanModel), found {found}")
    dm = diffusion_model(patcher)
    return ModelSignature(num_layers=len(dm.blocks), num_heads=dm.num_heads, head_dim=dm.dim // dm.num_heads,
                          name=name or type(patcher.model).__name__)


def is_image_to_video(patcher) -> bool:
    """True for I2V/ChronoEdit-style models, which take 20 extra concat channels."""
    return diffusion_model(patcher).patch_embedding.weight.shape[1] != patcher.model.latent_format.latent_channels


def token_grid(latent_shape) -> TokenGrid:
    """Token grid Wan builds from a latent (B, C, T, H, W)."""
    t, h, w = latent_shape[-3:]
    return TokenGrid(frames=math.ceil(t / PATCH_SIZE[0]), height=math.ceil(h / PATCH_SIZE[1]),
                     width=math.ceil(w / PATCH_SIZE[2]))


def rope_spec(patcher) -> RopeSpec:
    """How the model places RoPE positions: theta plus ComfyUI's ScaleROPE options, if any."""
    options = patcher.model_options.get("transformer_options", {}).get("rope_options")
    return RopeSpec.from_rope_options(options, theta=float(diffusion_model(patcher).rope_embedder.theta))


def hook_self_attention(patcher, layers, hook: SelfAttentionHook) -> None:
    """Route the K/V of ``layers``' self-attention through ``hook`` on this (cloned) patcher.

    A per-block ``double_block`` patch gives the block's attention calls a private copy of
    transformer_options holding an attention override. The first attention call of a Wan block
    whose q and k have the same token count is its self-attention (cross-attention follows and
    attends to text/image tokens). An override or block patch installed earlier (another pack, or
    a second bridge) is chained, not replaced.
    """
    existing = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for layer in layers:
        previous_patch = existing.get(("double_block", layer))
        patcher.set_model_patch_replace(_block_patch(layer, hook, previous_patch), "dit", "double_block", layer)


def _block_patch(layer: int, hook: SelfAttentionHook, previous_patch):
    def block_patch(args, extra):
        options = dict(args["transformer_options"])
        options["optimized_attention_override"] = _self_attention_override(
            layer, hook, options.get("optimized_attention_override"))
        args = {**args, "transformer_options": options}
        if previous_patch is not None:
            return previous_patch(args, extra)
        return extra["original_block"](args)
    return block_patch


def _self_attention_override(layer: int, hook: SelfAttentionHook, chained):
    pending = [True]

    def override(func, q, k, v, *args, heads, transformer_options=None, **kwargs):
        if pending[0] and q.shape[1] == k.shape[1]:
            pending[0] = False
            k, v = hook(layer, q, k, v, heads, transformer_options)
        if chained is not None:
            return chained(func, q, k, v, *args, heads=heads, transformer_options=transformer_options, **kwargs)
        return func(q, k, v, *args, heads=heads, transformer_options=transformer_options, **kwargs)
    return override
