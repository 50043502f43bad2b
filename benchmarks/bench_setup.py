"""What the benchmarks share: ComfyUI booted on a chosen device, and Wan2.1 T2V models at any shape.

bench_bridge.py writes its random models to safetensors files; gpu_check.py draws them on the device.
Both build the model from one constructor (:func:`wan_model`), so a shape means the same thing in both.
Importing this module puts tests/, tools/ and the repository on sys.path (the scripts' harness).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT / "tests"), str(ROOT / "tools"), str(ROOT)) if p not in sys.path]

HEAD_DIM = 128        # Wan2.1's head width: heads = dim / 128
TEXT_DIM = 4096       # umT5-XXL width, fixed by ComfyUI's Wan detection
GB = 1024 ** 3


def setup_host(device: str, tmp: Path):
    """ComfyUI in this process: the tests' CPU setup, or the same folders with ComfyUI's own device choice."""
    import host
    if device == "cpu":
        return host.setup_comfy_in_process(tmp / "models", tmp)
    import comfy_host
    tree = comfy_host.boot(host.comfyui_path(), cpu=False)          # picks the GPU (no --cpu)
    dirs = comfy_host.use_folders(tmp, tmp / "models")
    host._in_process = host.ComfyHost(tree, tmp / "models", dirs["input"], dirs["output"], dirs["temp"], dirs["user"])
    return host._in_process


def wan_model(dim: int, ffn: int, layers: int, device, dtype):
    """An uninitialised ComfyUI Wan2.1 T2V model at this shape (torch.empty tensors on ``device``; "meta": none)."""
    import torch
    import comfy.ldm.wan.model
    import comfy.ops
    return comfy.ldm.wan.model.WanModel(
        model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=dim, ffn_dim=ffn, freq_dim=256, text_dim=TEXT_DIM,
        out_dim=16, num_heads=dim // HEAD_DIM, num_layers=layers, qk_norm=True, cross_attn_norm=True, eps=1e-6,
        device=torch.device(device), dtype=dtype, operations=comfy.ops.disable_weight_init)


def wan_params(dim: int, ffn: int, layers: int) -> int:
    """Parameters of a Wan2.1 T2V model at this shape (built on the meta device: nothing allocated)."""
    import torch
    return sum(p.numel() for p in wan_model(dim, ffn, layers, "meta", torch.bfloat16).parameters())


def random_wan_state_dict(dim: int, ffn: int, layers: int, seed: int, device: str, dtype) -> dict:
    """Random Wan2.1 T2V weights drawn where they will run, in their run dtype: no fp32 or host copy, no file.

    The same rules as the tiny test models (tools/make_tiny_models.initialise), drawn from one generator on
    the device instead of one per parameter on the host: linear weights std 1/sqrt(fan_in) so activations
    keep unit scale through 40 blocks, norms one/zero, ``modulation`` std 0.5, biases std 0.02.
    """
    import torch
    model = wan_model(dim, ffn, layers, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            is_norm = "Norm" in type(module).__name__
            for name, param in module.named_parameters(recurse=False):
                if is_norm:
                    param.fill_(1.0 if name == "weight" else 0.0)
                elif name == "modulation":
                    param.normal_(0.0, 0.5, generator=gen)
                elif name == "weight" and param.dim() >= 2:
                    param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()), generator=gen)
                else:
                    param.normal_(0.0, 0.02, generator=gen)
    return model.state_dict()


def load_random_wan(dim: int, ffn: int, layers: int, seed: int, device: str, dtype):
    """A ComfyUI ModelPatcher of random weights, through ComfyUI's own loader (``load_diffusion_model_state_dict``).

    The loader builds the model on ComfyUI's offload device (the host) and copies the weights there, as it
    does for a checkpoint file; the device copy drawn here is freed on return.
    """
    import comfy.sd
    state_dict = random_wan_state_dict(dim, ffn, layers, seed, device, dtype)
    patcher = comfy.sd.load_diffusion_model_state_dict(state_dict, model_options={"dtype": dtype})
    if patcher is None:
        raise RuntimeError(f"ComfyUI did not detect a Wan model in the random weights (dim {dim}, {layers} layers)")
    return patcher
