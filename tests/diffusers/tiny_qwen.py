"""Tiny random Qwen-Image pieces for the text-encoder bridge's tests (test_text_encoder.py, test_text_training.py).

A transformers Qwen2.5-VL receiver and Qwen3-VL sharer built from configs (hidden 64, 2 layers, 4 query heads over
2 K/V heads of 16) with the Qwen tokenizer files ComfyUI ships, a tiny Qwen-Image DiT and VAE: no downloads.
"""
import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessor,
                          Qwen2VLProcessor, Qwen2VLVideoProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLProcessor, Qwen3VLVideoProcessor)

from c2c_core import LayerMap, ProjectorBank
from c2c_core.bundle import ProjectorBundle
from c2c_diffusers.text_encoder import encoder_signature
from c2c_diffusers.text_training import PromptBatch
from host import require_comfyui

TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=151936)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
PROMPTS = ["a red cat on a blue chair", "the sign reads OPEN"]


def seeded(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))
    return model.eval()


def qwen25(seed=0):
    config = Qwen2_5_VLConfig(text_config=dict(TEXT, rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3],
                                                                           rope_theta=1e6)),
                              vision_config=dict(VISION, fullatt_block_indexes=[0]))
    return seeded(Qwen2_5_VLForConditionalGeneration(config), seed)


def qwen3(seed=1):
    config = Qwen3VLConfig(text_config=dict(TEXT, head_dim=16, rope_parameters=dict(
                               rope_type="default", mrope_section=[2, 3, 3], mrope_interleaved=True, rope_theta=5e6)),
                           vision_config=dict(VISION, deepstack_visual_indexes=[0], num_position_embeddings=64))
    return seeded(Qwen3VLForConditionalGeneration(config), seed)


def tokenizer():
    return Qwen2Tokenizer.from_pretrained(require_comfyui() / "comfy" / "text_encoders" / "qwen25_tokenizer")


def receiver_processor(tok):
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor())


def sharer_processor(tok):
    image = Qwen2VLImageProcessor(patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=Qwen3VLVideoProcessor())


def dit(text_width=64, seed=0):
    """A tiny Qwen-Image DiT: 4-channel latents packed 2 × 2 (16 in), reading ``text_width``-wide embeddings."""
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=text_width,
                                       guidance_embeds=False, axes_dims_rope=(8, 4, 4)).eval()


def vae():
    return AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                  latents_std=[1.0] * 4).eval()


def bundle_for(sharer_model, receiver_model, kind="identity", **hparams) -> ProjectorBundle:
    s, r = encoder_signature(sharer_model), encoder_signature(receiver_model)
    layer_map = LayerMap.build("terminal", s.num_layers, r.num_layers)
    torch.manual_seed(0)
    bank = ProjectorBank.build(kind, s, r, layer_map.layers, **hparams).eval()
    return ProjectorBundle(bank=bank, layer_map=layer_map, sharer=s, receiver=r)


def encode(pipe, prompt=PROMPTS[0], **kwargs):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device="cpu", **kwargs)[0]


def prompt_batch(seed, prompt=PROMPTS[1]):
    """A text-to-image PromptBatch of random 8 × 8 latents (16 packed tokens of 16 channels)."""
    g = torch.Generator().manual_seed(seed)
    return PromptBatch(x0=torch.randn(1, 16, 16, generator=g), noise=torch.randn(1, 16, 16, generator=g),
                       sigma=0.3 + 0.4 * (seed % 2), img_shapes=[[(1, 4, 4)]], prompt=[prompt])
