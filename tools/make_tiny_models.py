"""Write tiny, seeded Wan2.1-architecture checkpoints for the tests and the demo.

The models are built with ComfyUI's own ``comfy.ldm.wan.model.WanModel`` (so their keys and shapes
are exactly what the stock UNETLoader detects), filled with a seeded initialisation and saved as
``.safetensors`` with unprefixed keys (``blocks.0.self_attn.k.weight`` …), the layout of the
repackaged Wan diffusion models that ``comfy.sd.load_diffusion_model`` reads.

ComfyUI derives the architecture from the weights: dim, ffn_dim, num_layers, in_dim and out_dim;
num_heads is dim // 128 and text_dim is 4096. A model is detected as WAN21_I2V only with in_dim 36
*and* the ``img_emb`` keys. The output folder is a ComfyUI models root: the files land in
``<out>/diffusion_models/``.

    python tools/make_tiny_models.py [--out .models] [--force] [--only NAME ...]

Idempotent: each file's safetensors header records the spec it was made from; a file whose spec
matches is skipped without importing torch. Same spec, same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / ".models"
SUBFOLDER = "diffusion_models"

# Bump when the initialisation below changes, so existing files are rewritten.
INIT_VERSION = 1
METADATA_KEY = "dit_cache_bridge.tiny_model"

# name -> spec. Shared keys: model_type ('t2v' | 'i2v'), dim, ffn_dim, num_layers, in_dim, seed;
# optional out_dim (default OUT_DIM, the 16 latent channels of Wan2.1).
TINY_MODELS: dict[str, dict] = {
    # The receiver / sharer pair with the same architecture (different weights).
    "tiny_wan_t2v_a": {"model_type": "t2v", "dim": 256, "ffn_dim": 512, "num_layers": 2, "in_dim": 16, "seed": 1001},
    "tiny_wan_t2v_b": {"model_type": "t2v", "dim": 256, "ffn_dim": 512, "num_layers": 2, "in_dim": 16, "seed": 2002},
    # ChronoEdit-like image-to-video model: 16 noise + 4 mask + 16 image-latent channels, CLIP-vision branch.
    "tiny_wan_i2v": {"model_type": "i2v", "dim": 256, "ffn_dim": 512, "num_layers": 2, "in_dim": 36, "seed": 3003},
    # Mismatched with tiny_wan_t2v_a: 4 heads instead of 2, 3 layers instead of 2.
    "tiny_wan_t2v_wide": {"model_type": "t2v", "dim": 512, "ffn_dim": 1024, "num_layers": 3, "in_dim": 16, "seed": 4004},
    # Wan2.2-TI2V-5B layout: 48-channel latent in and out (ComfyUI detects WAN22_T2V by out_dim 48).
    "tiny_wan22_ti2v": {"model_type": "t2v", "dim": 256, "ffn_dim": 512, "num_layers": 2, "in_dim": 48,
                        "out_dim": 48, "seed": 5005},
}

# Fixed by ComfyUI's Wan detection; recorded in the metadata for readers of the files.
HEAD_DIM = 128
TEXT_DIM = 4096
CLIP_DIM = 1280
OUT_DIM = 16


# File names of the tiny models, as UNETLoader's ``unet_name`` takes them.
T2V_A = "tiny_wan_t2v_a.safetensors"
T2V_B = "tiny_wan_t2v_b.safetensors"
I2V = "tiny_wan_i2v.safetensors"
T2V_WIDE = "tiny_wan_t2v_wide.safetensors"
TI2V = "tiny_wan22_ti2v.safetensors"    # Wan2.2-TI2V-5B layout: 48-channel latent
TINY_MODEL_FILES = (T2V_A, T2V_B, I2V, T2V_WIDE, TI2V)


def log(message: str) -> None:
    print(f"[make_tiny_models] {message}", flush=True)


def file_name(name: str) -> str:
    return f"{name}.safetensors"


def expected_metadata(name: str) -> dict[str, str]:
    spec = dict(TINY_MODELS[name])
    spec.setdefault("out_dim", OUT_DIM)
    spec.update(num_heads=spec["dim"] // HEAD_DIM, head_dim=HEAD_DIM, text_dim=TEXT_DIM, init_version=INIT_VERSION)
    return {METADATA_KEY: json.dumps({"name": name, **spec}, sort_keys=True)}


def read_safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file, read from its header alone (no torch)."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return None
    metadata = header.get("__metadata__")
    return metadata if isinstance(metadata, dict) else None


def is_up_to_date(path: Path, name: str) -> bool:
    return path.is_file() and read_safetensors_metadata(path) == expected_metadata(name)


def import_comfy():
    """ComfyUI booted on the CPU in this process (tools/comfy_host.py), then its Wan model and ops."""
    import comfy_host

    comfy_host.boot(cpu=True)
    import comfy.ldm.wan.model
    import comfy.ops

    return comfy.ldm.wan.model.WanModel, comfy.ops.disable_weight_init


def parameter_seed(seed: int, name: str) -> int:
    """A seed per parameter, so that one tensor's values do not depend on the creation order of the others."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def initialise(model, seed: int) -> None:
    """Fill every parameter: unit-gain normal for Linear/Conv weights, ones/zeros for norms.

    ``disable_weight_init`` leaves all tensors as torch.empty. Weights get std 1/sqrt(fan_in), so
    activations keep unit scale through the stack (text_embedding has fan_in 4096); biases std 0.02;
    norm weights one and norm biases zero; the blocks' and the head's ``modulation`` (the learned
    shift/scale/gate offsets) std 0.5, so the gates are far enough from zero that every block, and so
    any change to its self-attention K/V, visibly moves the output.
    """
    import torch

    for module_name, module in sorted(model.named_modules()):
        is_norm = "Norm" in type(module).__name__
        for param_name, param in sorted(module.named_parameters(recurse=False)):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            gen = torch.Generator().manual_seed(parameter_seed(seed, full_name))
            with torch.no_grad():
                if is_norm:
                    param.fill_(1.0 if param_name == "weight" else 0.0)
                elif param_name == "modulation":
                    param.normal_(0.0, 0.5, generator=gen)
                elif param_name == "weight" and param.dim() >= 2:
                    fan_in = param[0].numel()
                    param.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
                elif param_name == "bias":
                    param.normal_(0.0, 0.02, generator=gen)
                else:
                    raise ValueError(f"no initialisation rule for parameter {full_name!r} {tuple(param.shape)}")


def build_state_dict(name: str, WanModel, operations) -> dict:
    import torch

    spec = TINY_MODELS[name]
    model = WanModel(
        model_type=spec["model_type"],
        patch_size=(1, 2, 2),
        in_dim=spec["in_dim"],
        dim=spec["dim"],
        ffn_dim=spec["ffn_dim"],
        freq_dim=256,
        text_dim=TEXT_DIM,
        out_dim=spec.get("out_dim", OUT_DIM),
        num_heads=spec["dim"] // HEAD_DIM,
        num_layers=spec["num_layers"],
        qk_norm=True,
        cross_attn_norm=True,
        eps=1e-6,
        device=torch.device("cpu"),
        dtype=torch.float32,
        operations=operations,
    )
    initialise(model, spec["seed"])
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise RuntimeError(f"{name}: {key} is not finite after initialisation")
    return state


def write_model(name: str, path: Path, WanModel, operations) -> None:
    from safetensors.torch import save_file

    state = build_state_dict(name, WanModel, operations)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata=expected_metadata(name))
    os.replace(tmp, path)
    params = sum(t.numel() for t in state.values())
    log(f"wrote {path} ({params / 1e6:.2f} M params, {path.stat().st_size / 1e6:.1f} MB)")


def make_models(out: Path, names: list[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Write the tiny models into ``out/diffusion_models``; returns name -> path. Skips up-to-date files."""
    names = list(TINY_MODELS) if not names else names
    unknown = [n for n in names if n not in TINY_MODELS]
    if unknown:
        raise SystemExit(f"unknown tiny model(s) {unknown}; known: {sorted(TINY_MODELS)}")
    folder = out / SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / file_name(name) for name in names}
    todo = [n for n in names if force or not is_up_to_date(paths[n], n)]
    for name in names:
        if name not in todo:
            log(f"up to date: {paths[name]}")
    if todo:
        WanModel, operations = import_comfy()
        for name in todo:
            write_model(name, paths[name], WanModel, operations)
    return paths


@dataclass(frozen=True)
class TinyModels:
    """A ComfyUI models root holding the tiny Wan checkpoints in ``diffusion_models/``."""

    root: Path

    @property
    def diffusion_models(self) -> Path:
        return self.root / SUBFOLDER

    def path(self, name: str) -> Path:
        """Absolute path of a tiny model by file or model name: ``path(T2V_A)``, ``path("tiny_wan_t2v_a")``."""
        name = name if name.endswith(".safetensors") else file_name(name)
        if name.removesuffix(".safetensors") not in TINY_MODELS:
            raise KeyError(f"no tiny model {name!r}; known: {sorted(TINY_MODELS)}")
        return self.diffusion_models / name

    __getitem__ = path  # tiny_models["tiny_wan_t2v_a"] -> Path

    @staticmethod
    def spec(name: str) -> dict:
        """The spec of a tiny model (file or model name): model_type, dim, ffn_dim, num_layers, in_dim, seed, num_heads."""
        spec = dict(TINY_MODELS[name.removesuffix(".safetensors")])
        spec["num_heads"] = spec["dim"] // HEAD_DIM
        return spec


def ensure_tiny_models(root: Path | None = None, timeout: float = 300) -> TinyModels:
    """Run this maker in a subprocess (so the caller stays free of ComfyUI imports); fast when up to date."""
    root = Path(root) if root is not None else DEFAULT_OUT
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--out", str(root)],
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"make_tiny_models.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return TinyModels(root.resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"models root; files go to OUT/{SUBFOLDER}/ (default: {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rewrite files even when they are up to date")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"only these of {', '.join(TINY_MODELS)}")
    args = parser.parse_args(argv)
    started = time.monotonic()
    make_models(args.out.resolve(), args.only, args.force)
    __import__("make_tiny_qwen").make_models(args.out.resolve(), args.force)   # tiny Qwen encoders and DiT (issue 21)
    log(f"done in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
