"""Wan transformer weights between ComfyUI's key layout and diffusers', both ways.

ComfyUI (and the original Wan release) name keys ``blocks.0.self_attn.q.weight``; diffusers names them
``blocks.0.attn1.to_q.weight``. diffusers ships ComfyUI -> diffusers
(``convert_wan_transformer_to_diffusers``); :func:`to_comfy` is its inverse for the Wan2.1/2.2 and
ChronoEdit transformers (text-to-video and image-to-video). Keys of other variants (VACE, Animate,
S2V) are refused by name rather than written into a file no loader reads.

:func:`diffusers_config` reads a diffusers ``WanTransformer3DModel`` config from ComfyUI weights the
way ComfyUI's own detection does (dim, layers, ffn, in/out channels from shapes; head_dim 128).
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch
from torch import Tensor

from .errors import BridgeSetupError

__all__ = ["to_comfy", "to_diffusers", "diffusers_config", "from_comfy", "is_comfy_layout"]

HEAD_DIM = 128      # ComfyUI's Wan detection: num_heads = dim // 128

_TO_COMFY = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.", r"blocks.\1.self_attn."),
    (r"^blocks\.(\d+)\.attn2\.", r"blocks.\1.cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."),
    (r"\.add_v_proj\.", ".v_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),       # diffusers' norm2 is the cross-attention norm
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]
_KNOWN_COMFY = re.compile(
    r"^(patch_embedding|time_embedding\.[02]|text_embedding\.[02]|time_projection\.1|img_emb\.proj\.[0134]|head\.head)"
    r"\.(weight|bias)$|^head\.modulation$|^blocks\.\d+\.(modulation|norm3\.(weight|bias)|ffn\.[02]\.(weight|bias)|"
    r"(self_attn|cross_attn)\.(q|k|v|o|k_img|v_img|norm_q|norm_k|norm_k_img)\.(weight|bias))$")


def is_comfy_layout(state_dict: Mapping[str, Tensor]) -> bool:
    return any(".self_attn." in k for k in state_dict)


def to_comfy(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers Wan/ChronoEdit transformer keys -> ComfyUI's (tensors shared, not copied)."""
    out = {}
    for key, tensor in state_dict.items():
        new = key
        for pattern, repl in _TO_COMFY:
            new = re.sub(pattern, repl, new)
        if not _KNOWN_COMFY.match(new):
            raise BridgeSetupError(
                f"diffusers key {key!r} has no ComfyUI Wan counterpart (became {new!r}); expected the keys of a "
                f"Wan2.1/2.2 or ChronoEdit transformer. VACE, Animate and S2V transformers are not converted.")
        out[new] = tensor
    return out


def to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ComfyUI (or original Wan) keys -> diffusers', with diffusers' own converter (input is not modified)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    return convert_wan_transformer_to_diffusers(dict(state_dict))


def diffusers_config(state_dict: Mapping[str, Tensor]) -> dict:
    """A ``WanTransformer3DModel`` config for ComfyUI-layout weights, read from their shapes."""
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in state_dict.items()}
    if "patch_embedding.weight" not in sd:
        raise BridgeSetupError("weights have no 'patch_embedding.weight'; expected a ComfyUI/original Wan transformer.")
    patch = sd["patch_embedding.weight"]
    dim, in_channels = patch.shape[:2]
    patch_size = tuple(patch.shape[2:])
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    image = "img_emb.proj.0.weight" in sd
    return dict(
        patch_size=patch_size, num_attention_heads=dim // HEAD_DIM, attention_head_dim=HEAD_DIM,
        in_channels=in_channels, out_channels=sd["head.head.weight"].shape[0] // math.prod(patch_size),
        text_dim=sd["text_embedding.0.weight"].shape[1], freq_dim=sd["time_embedding.0.weight"].shape[1],
        ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], num_layers=layers, cross_attn_norm="blocks.0.norm3.weight" in sd,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=sd["img_emb.proj.0.weight"].shape[0] if image else None,
        added_kv_proj_dim=dim if "blocks.0.cross_attn.k_img.weight" in sd else None, rope_max_seq_len=1024)


def from_comfy(state_dict: Mapping[str, Tensor], cls=None, dtype: torch.dtype | None = None):
    """A diffusers transformer (``cls``, default WanTransformer3DModel) holding ComfyUI-layout weights.

    Built on the meta device and given the weights' own tensors (no random init, no copy). For
    released checkpoints diffusers' ``WanTransformer3DModel.from_single_file`` does the same from a file.
    """
    if cls is None:
        from diffusers import WanTransformer3DModel as cls
    with torch.device("meta"):
        model = cls(**diffusers_config(state_dict))
    model.load_state_dict(to_diffusers(state_dict), strict=True, assign=True)
    model.rope = type(model.rope)(**_rope_args(model))     # RoPE tables are buffers, not weights: build them
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _rope_args(model) -> dict:
    config = model.config
    args = dict(attention_head_dim=config.attention_head_dim, patch_size=config.patch_size,
                max_seq_len=config.rope_max_seq_len)
    if "rope_temporal_skip_len" in config:
        args["temporal_skip_len"] = config.rope_temporal_skip_len
    return args
