"""Tiny random diffusers Wan-family models and pipelines, built from configs (no downloads).

Shapes follow the ComfyUI tiny models (tools/make_tiny_models.py): dim 256 = 2 heads × 128, 2 layers,
ffn 512, text_dim 4096, so weights convert between the two hosts. Prompt embeddings are passed
directly (no text encoder); latents are tiny (2 frames × 4 × 4 -> 8 tokens) to keep CPU time low.
"""
from __future__ import annotations

import torch
from diffusers import (AutoencoderKLWan, ChronoEditTransformer3DModel, FlowMatchEulerDiscreteScheduler,
                       WanPipeline, WanTransformer3DModel)

from c2c_core import LayerMap, ModelSignature, ProjectorBank
from c2c_core.bundle import ProjectorBundle

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=512, num_layers=2, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
I2V = dict(CONFIG, in_channels=36, image_dim=1280, added_kv_proj_dim=256)
TEXT_TOKENS = 8
HEIGHT = WIDTH = 32          # latent 4 × 4 -> 2 × 2 tokens per frame
FRAMES = 5                   # latent frames 2


def seeded(module, seed: int):
    """Fill every parameter from a seed (unit-gain weights; modulation tables large enough to matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 if "patch_embedding" not in name
                        else torch.randn(p.shape, generator=g) / (p[0].numel()) ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval()


def wan(seed: int = 1, **overrides) -> WanTransformer3DModel:
    return seeded(WanTransformer3DModel(**{**CONFIG, **overrides}), seed)


def chronoedit(seed: int = 3, **overrides) -> ChronoEditTransformer3DModel:
    return seeded(ChronoEditTransformer3DModel(**{**I2V, **overrides}), seed)


def vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def wan_pipe(transformer=None, transformer_2=None, boundary_ratio=None) -> WanPipeline:
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                       transformer=transformer if transformer is not None else wan(), transformer_2=transformer_2,
                       boundary_ratio=boundary_ratio)


def embeds(seed: int, rows: int = 1, tokens: int = TEXT_TOKENS, dim: int = 4096) -> torch.Tensor:
    return torch.randn(rows, tokens, dim, generator=torch.Generator().manual_seed(seed))


def latent(seed: int = 0, channels: int = 16, frames: int = 2, size: int = 4) -> torch.Tensor:
    return torch.randn(1, channels, frames, size, size, generator=torch.Generator().manual_seed(seed))


def run_pipe(pipe, steps: int = 3, guidance: float = 4.0, seed: int = 0, **kwargs) -> torch.Tensor:
    kwargs.setdefault("prompt_embeds", embeds(10))
    kwargs.setdefault("negative_prompt_embeds", embeds(11))
    return pipe(height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=steps, guidance_scale=guidance,
                output_type="latent", generator=torch.Generator().manual_seed(seed), **kwargs).frames


def bundle(kind: str = "identity", layers=(0, 1), sharer_layers: int = 2, receiver_layers: int = 2, seed=None,
           **hparams) -> ProjectorBundle:
    sharer = ModelSignature(sharer_layers, 2, 128, "sharer")
    receiver = ModelSignature(receiver_layers, 2, 128, "receiver")
    layer_map = LayerMap.build("terminal", sharer_layers, receiver_layers, layers=list(layers))
    bank = ProjectorBank.build(kind, sharer, receiver, layer_map.layers, **hparams).eval()
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in bank.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return ProjectorBundle(bank=bank, layer_map=layer_map, sharer=sharer, receiver=receiver)


def clip_vision():
    """A tiny CLIP vision tower (hidden 1280 like ViT-H, 2 layers, 32 px, 16 px patches -> 5 tokens) and its processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=16)).eval()
    return model, CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def chronoedit_pipe(transformer=None):
    from diffusers import ChronoEditPipeline
    encoder, processor = clip_vision()
    return ChronoEditPipeline(tokenizer=None, text_encoder=None, image_encoder=encoder, image_processor=processor,
                              transformer=transformer if transformer is not None else chronoedit(),
                              vae=vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))


def image(seed: int = 0):
    import numpy as np
    from PIL import Image
    return Image.fromarray((np.random.RandomState(seed).rand(HEIGHT, WIDTH, 3) * 255).astype("uint8"))


def wan_i2v_pipe(transformer=None):
    from diffusers import WanImageToVideoPipeline
    encoder, processor = clip_vision()
    return WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae(),
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), image_processor=processor,
                                   image_encoder=encoder,
                                   transformer=transformer if transformer is not None else wan(3, **I2V_WAN))


I2V_WAN = dict(in_channels=36, image_dim=1280, added_kv_proj_dim=256)
