"""Tiny, seeded Qwen text encoders and a tiny Qwen-Image DiT, built with ComfyUI's own classes.

Three files in a ComfyUI models root:

- ``text_encoders/tiny_qwen25_vl.safetensors``: Qwen-Image's encoder (Qwen2.5-VL, ``llama.Qwen25_7BVLI``), key
  layout of Comfy-Org's ``qwen_2.5_vl_7b.safetensors``; ComfyUI's text-encoder detection reads it as QWEN25_7B
  (``model.layers.0.self_attn.k_proj.bias`` of width 512 = 4 K/V heads × 128).
- ``text_encoders/tiny_qwen3_vl.safetensors``: a Qwen3-VL encoder (``qwen3vl.Qwen3VL``, interleaved M-RoPE,
  DeepStack), key layout of the transformers checkpoint (``model.language_model.…``, ``model.visual.…``), which
  hosts with ``comfy/text_encoders/qwen3vl.py`` (0.33.0) detect as QWEN3VL_8B. Written only on such hosts.
- ``diffusion_models/tiny_qwen_image.safetensors``: ``QwenImageTransformer2DModel`` keys; the detection reads
  Qwen-Image from ``txt_norm.weight``, in_channels and the block count.

Why a loader beside the stock ones: ComfyUI reads only the file's *family* from these checkpoints; widths and
depths come from fixed config classes (Qwen2.5-VL-7B: hidden 3584, 28 layers, a 32-block vision tower; Qwen-Image:
3072-wide blocks). At those widths no model is tiny. So the tests load the tiny files through the stock
functions with ComfyUI's own override hooks: ``comfy.sd.load_clip(model_options={"<name>_model_config": …,
"<name>_class": …})`` (sd1_clip reads both) and the host's ``supported_models.QwenImage`` config with the
widths from the file's metadata. The ``_class`` hook swaps in a subclass of the host's encoder class that only
passes smaller sizes to the host's own vision class; every forward is ComfyUI's. The stock CLIPLoader and
UNETLoader nodes load real checkpoints; the tests substitute :func:`load_tiny_clip` / :func:`load_tiny_qwen_image`.

    python tools/make_tiny_qwen.py [--out /tmp/21b/models] [--force]

Called by tools/make_tiny_models.py. Idempotent like it: a file whose metadata matches its spec is skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_tiny_models as wan_tiny  # noqa: E402  (the shared helpers: metadata reader, parameter seeds)

METADATA_KEY = "dit_cache_bridge.tiny_qwen"
INIT_VERSION = 1

RECEIVER = "tiny_qwen25_vl.safetensors"     # Qwen2.5-VL, Qwen-Image's encoder
SHARER = "tiny_qwen3_vl.safetensors"        # Qwen3-VL (hosts with comfy/text_encoders/qwen3vl.py)
DIT = "tiny_qwen_image.safetensors"         # Qwen-Image DiT

# ComfyUI's names of the two encoders (SD1ClipModel.clip: the key of "<name>_model_config" / "<name>_class")
QWEN25_NAME = "qwen25_7b"
QWEN3VL_NAME = "qwen3vl_8b"

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "depth": 2}
SPECS: dict[str, dict] = {
    RECEIVER: {"kind": "qwen25_vl", "folder": "text_encoders", "seed": 2101, "vision": VISION,
               "config": {"vocab_size": 152064, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                          "num_attention_heads": 8, "num_key_value_heads": 4}},
    SHARER: {"kind": "qwen3_vl", "folder": "text_encoders", "seed": 2102, "vision": {**VISION, "deepstack": [0, 1]},
             "config": {"vocab_size": 151936, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "lm_head": False}},
    DIT: {"kind": "qwen_image", "folder": "diffusion_models", "seed": 2103,
          "config": {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
                     "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 32,
                     "axes_dims_rope": [8, 12, 12]}},
}


def log(message: str) -> None:
    print(f"[make_tiny_qwen] {message}", flush=True)


def expected_metadata(name: str) -> dict[str, str]:
    return {METADATA_KEY: json.dumps({"name": name, **SPECS[name], "init_version": INIT_VERSION}, sort_keys=True)}


def spec_of(path: Path) -> dict:
    """The spec a tiny file was written from (its safetensors metadata), or a clear error."""
    metadata = wan_tiny.read_safetensors_metadata(Path(path)) or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} is not a tiny Qwen model from tools/make_tiny_qwen.py")
    return json.loads(metadata[METADATA_KEY])


def has_qwen3vl() -> bool:
    import importlib.util

    return importlib.util.find_spec("comfy.text_encoders.qwen3vl") is not None


# ------------------------------------------------------------------------------------------------
# The host's classes at tiny sizes (constructors only; every forward is ComfyUI's)
# ------------------------------------------------------------------------------------------------
def tiny_qwen25_clip_class(vision: dict):
    """An SDClipModel for Qwen-Image's encoder whose model is ``llama.Qwen25_7BVLI`` with a small vision tower."""
    import torch
    from comfy import sd1_clip
    from comfy.text_encoders import llama, qwen_vl

    class TinyQwen25VL(llama.Qwen25_7BVLI):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = llama.Qwen25_7BVLI_Config(**config_dict)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.visual = qwen_vl.Qwen2VLVisionTransformer(
                hidden_size=vision["hidden_size"], output_hidden_size=config.hidden_size,
                intermediate_size=vision["intermediate_size"], num_heads=vision["num_heads"],
                num_layers=vision["depth"], device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    class TinyQwen25VLModel(sd1_clip.SDClipModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True,
                     model_options={}):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
                             special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=TinyQwen25VL,
                             enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                             model_options=model_options)

    return TinyQwen25VLModel


def tiny_qwen3vl_clip_class(vision: dict):
    """An SDClipModel for Qwen3-VL whose model is ``qwen3vl.Qwen3VL`` with a small vision tower."""
    import torch
    from comfy import sd1_clip
    from comfy.text_encoders import llama, qwen3vl

    class TinyQwen3VL(qwen3vl.Qwen3VL):
        model_type = QWEN3VL_NAME

        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = qwen3vl.QWEN3VL_CONFIGS[self.model_type](**config_dict)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            vision_config = {**qwen3vl.QWEN3VL_VISION_COMMON, "hidden_size": vision["hidden_size"],
                             "intermediate_size": vision["intermediate_size"], "depth": vision["depth"],
                             "num_heads": vision["num_heads"], "deepstack_visual_indexes": vision["deepstack"],
                             "out_hidden_size": config.hidden_size}
            self.visual = qwen3vl.Qwen3VLVisionModel(vision_config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    class TinyQwen3VLModel(qwen3vl.Qwen3VLClipModel):
        def __init__(self, device="cpu", layer="hidden", layer_idx=-1, dtype=None, attention_mask=True,
                     model_options={}):
            sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
                special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=TinyQwen3VL,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                model_options=model_options)

    return TinyQwen3VLModel


def clip_model_options(spec: dict) -> dict:
    """ComfyUI's own overrides (sd1_clip: "<name>_model_config", "<name>_class") for a tiny encoder's spec."""
    if spec["kind"] == "qwen25_vl":
        name, clip_class = QWEN25_NAME, tiny_qwen25_clip_class(spec["vision"])
    else:
        name, clip_class = QWEN3VL_NAME, tiny_qwen3vl_clip_class(spec["vision"])
    return {f"{name}_model_config": dict(spec["config"]), f"{name}_class": clip_class}


def load_tiny_clip(path, clip_type: str = "qwen_image"):
    """A tiny encoder as CLIPLoader would give it: ``comfy.sd.load_clip`` with the file's sizes."""
    import comfy.sd
    import folder_paths

    return comfy.sd.load_clip(ckpt_paths=[str(path)], embedding_directory=folder_paths.get_folder_paths("embeddings"),
                              clip_type=getattr(comfy.sd.CLIPType, clip_type.upper()),
                              model_options=clip_model_options(spec_of(path)))


def load_tiny_qwen_image(path):
    """The tiny DiT as UNETLoader would give it: the host's Qwen-Image model config with the file's widths."""
    import torch

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    spec = spec_of(path)
    state = comfy.utils.load_torch_file(str(path))
    config = {**spec["config"], "axes_dims_rope": tuple(spec["config"]["axes_dims_rope"]), "image_model": "qwen_image"}
    model_config = comfy.supported_models.QwenImage(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(state, "")
    model.load_model_weights(state, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


# ------------------------------------------------------------------------------------------------
# Building the files
# ------------------------------------------------------------------------------------------------
def initialise(module, seed: int) -> None:
    """Seeded: norms one (bias zero), weights std 1/sqrt(fan_in), biases and embeddings small normals.

    Qwen-Image's modulation layers (``img_mod``/``txt_mod``) get std 0.5/sqrt(fan_in) like the rest: its gates
    then sit far enough from zero that the text conditioning visibly moves the picture.
    """
    import torch

    for module_name, sub in sorted(module.named_modules()):
        is_norm = "Norm" in type(sub).__name__
        for param_name, param in sorted(sub.named_parameters(recurse=False)):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            gen = torch.Generator().manual_seed(wan_tiny.parameter_seed(seed, full_name))
            with torch.no_grad():
                if is_norm:
                    param.fill_(1.0 if param_name == "weight" else 0.0)
                elif "Embedding" in type(sub).__name__:
                    param.normal_(0.0, 1.0, generator=gen)
                elif param.dim() >= 2:
                    param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()), generator=gen)
                else:
                    param.normal_(0.0, 0.02, generator=gen)


def build_state_dict(name: str) -> dict:
    import torch

    import comfy.ops

    spec = SPECS[name]
    ops = comfy.ops.disable_weight_init
    if spec["kind"] == "qwen_image":
        from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

        config = {**spec["config"], "axes_dims_rope": tuple(spec["config"]["axes_dims_rope"])}
        model = QwenImageTransformer2DModel(**config, dtype=torch.float32, device="cpu", operations=ops)
        initialise(model, spec["seed"])
        state = model.state_dict()
    else:
        clip = clip_model_options(spec)
        clip_class = next(v for k, v in clip.items() if k.endswith("_class"))
        options = {k: v for k, v in clip.items() if k.endswith("_model_config")}
        options["model_name"] = QWEN25_NAME if spec["kind"] == "qwen25_vl" else QWEN3VL_NAME
        options["custom_operations"] = ops
        model = clip_class(device="cpu", dtype=torch.float32, model_options=options).transformer
        initialise(model, spec["seed"])
        state = model.state_dict()
        if spec["kind"] == "qwen3_vl":   # the transformers layout, which ComfyUI maps back to model./visual.
            state = {("model.language_model." + k[len("model."):]) if k.startswith("model.")
                     else ("model." + k): v for k, v in state.items()}
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise RuntimeError(f"{name}: {key} is not finite after initialisation")
    return state


def make_models(out: Path, force: bool = False) -> dict[str, Path]:
    """Write the tiny Qwen files under ``out`` (text_encoders/, diffusion_models/); skips up-to-date files.

    Boots ComfyUI in this process when a file must be written (tools/comfy_host.py); the Qwen3-VL encoder is
    written only on a host that has it."""
    names = [n for n in SPECS if n != SHARER or _host_has_qwen3vl()]
    paths = {n: out / SPECS[n]["folder"] / n for n in names}
    todo = [n for n in names if force or not (paths[n].is_file() and
                                              wan_tiny.read_safetensors_metadata(paths[n]) == expected_metadata(n))]
    for name in names:
        if name not in todo:
            log(f"up to date: {paths[name]}")
    if todo:
        import comfy_host

        comfy_host.boot(cpu=True)
        from safetensors.torch import save_file

        for name in todo:
            state = build_state_dict(name)
            paths[name].parent.mkdir(parents=True, exist_ok=True)
            tmp = paths[name].with_name(f".{name}.{os.getpid()}.tmp")
            save_file(state, str(tmp), metadata=expected_metadata(name))
            os.replace(tmp, paths[name])
            params = sum(t.numel() for t in state.values())
            log(f"wrote {paths[name]} ({params / 1e6:.2f} M params, {paths[name].stat().st_size / 1e6:.1f} MB)")
    return paths


def ensure_models(root: Path, timeout: float = 300) -> Path:
    """Run this maker in a subprocess (ComfyUI may already be booted here with other settings); fast when up to
    date. Returns the models root."""
    import subprocess

    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--out", str(root)],
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"make_tiny_qwen.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return Path(root).resolve()


def _host_has_qwen3vl() -> bool:
    """Whether the host this maker boots (COMFYUI_PATH, else .host/ComfyUI) has Qwen3-VL, read from its tree."""
    import install_host

    return (install_host.comfyui_path() / "comfy" / "text_encoders" / "qwen3vl.py").is_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=wan_tiny.DEFAULT_OUT, help="models root")
    parser.add_argument("--force", action="store_true", help="rewrite files even when they are up to date")
    args = parser.parse_args(argv)
    started = time.monotonic()
    make_models(args.out.resolve(), args.force)
    log(f"done in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
