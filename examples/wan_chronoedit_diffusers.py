"""Wan2.1 generates while ChronoEdit shares its K/V — in diffusers, with c2c_diffusers.

Real models (a GPU with room for both 14B transformers in live mode, or use --mode recorded)::

    python examples/wan_chronoedit_diffusers.py --image input.png --prompt "the cat turns its head" \\
        --projector models/c2c_projectors/wan_chronoedit_c2c.safetensors --out out/fused.mp4

Offline smoke run, no downloads: the repository's tiny ComfyUI Wan models (``make models``) converted to
diffusers, a tiny VAE and CLIP vision tower built from configs, random prompt embeddings::

    python examples/wan_chronoedit_diffusers.py --tiny

Without --projector an untrained ``weighted`` projector (a plain blend, no training needed) is used.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wan_chronoedit import WanChronoEditBridge, WanChronoEditConfig  # noqa: E402  (pip install ".[diffusers]")

WAN_ID = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
CHRONOEDIT_ID = "nvidia/ChronoEdit-14B-Diffusers"


def real_pipelines(dtype):
    from diffusers import ChronoEditPipeline, WanPipeline
    wan = WanPipeline.from_pretrained(WAN_ID, torch_dtype=dtype)
    chronoedit = ChronoEditPipeline.from_pretrained(CHRONOEDIT_ID, torch_dtype=dtype)
    chronoedit.text_encoder, chronoedit.tokenizer = wan.text_encoder, wan.tokenizer    # the same umT5: load once
    return wan, chronoedit


def tiny_pipelines():
    """The tiny seeded ComfyUI models of tests/ and the demo, converted; VAE and CLIP from configs."""
    from diffusers import (AutoencoderKLWan, ChronoEditPipeline, ChronoEditTransformer3DModel,
                           FlowMatchEulerDiscreteScheduler, WanPipeline)
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from c2c_diffusers import convert

    folder = ROOT / ".models" / "diffusion_models"
    if not (folder / "tiny_wan_i2v.safetensors").is_file():
        sys.exit(f"no tiny models in {folder}; run `make models` first")
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=16)).eval()
    wan = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                      transformer=convert.from_comfy(load_file(folder / "tiny_wan_t2v_a.safetensors")))
    chronoedit = ChronoEditPipeline(
        tokenizer=None, text_encoder=None, image_encoder=clip,
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        transformer=convert.from_comfy(load_file(folder / "tiny_wan_i2v.safetensors"), cls=ChronoEditTransformer3DModel),
        vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    return wan, chronoedit


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="offline smoke run with the repository's tiny models")
    parser.add_argument("--image", type=Path, help="the image ChronoEdit (the sharer) sees")
    parser.add_argument("--prompt", default="", help="the prompt both models get")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--projector", type=Path, help="a projector bundle (.safetensors); default: untrained weighted")
    parser.add_argument("--mode", choices=("live", "recorded"), default="live")
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--end", type=float, default=1.0, help="fuse until this percent of the noise schedule")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "diffusers_example" / "fused.mp4")
    args = parser.parse_args(argv)

    config = WanChronoEditConfig(projector=str(args.projector) if args.projector else None, projector_type="weighted",
                                 fusion_direction="chrono_to_wan", mode=args.mode, fusion_alpha=args.strength,
                                 end=args.end)
    if args.tiny:
        from PIL import Image
        wan, chronoedit = tiny_pipelines()
        image = Image.new("RGB", (32, 32), (200, 40, 40))
        g = torch.Generator().manual_seed(1)
        text = dict(prompt_embeds=torch.randn(1, 512, 4096, generator=g),
                    negative_prompt_embeds=torch.randn(1, 512, 4096, generator=g))
        size = dict(height=32, width=32, num_inference_steps=min(args.steps, 4), output_type="latent")
    else:
        if args.image is None:
            parser.error("--image is required (or use --tiny)")
        from diffusers.utils import load_image
        wan, chronoedit = real_pipelines(torch.bfloat16)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        wan.to(device)
        chronoedit.to(device)
        image = load_image(str(args.image))
        text = dict(prompt=args.prompt, negative_prompt=args.negative_prompt)
        size = dict(height=480, width=832, num_inference_steps=args.steps, output_type="np")

    bridge = WanChronoEditBridge(config=config, wan_model=wan, chronoedit_model=chronoedit)
    result = bridge.generate_with_fusion(image, num_frames=5, guidance_scale=4.0,
                                         generator=torch.Generator().manual_seed(args.seed), **text, **size)
    report = bridge.last_report
    print(f"fused layers {report.layers}: strength {report.strength}, K change {report.k_change}, "
          f"sharer forwards {report.sharer_forwards}, receiver calls {report.model_calls}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        from safetensors.torch import save_file
        out = args.out.with_suffix(".safetensors")
        save_file({"latents": result.frames.contiguous()}, str(out))
    else:
        from diffusers.utils import export_to_video
        out = args.out
        export_to_video(result.frames[0], str(out), fps=16)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
