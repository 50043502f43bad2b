"""Write tiny GGUF copies of the tiny Wan models, as city96/ComfyUI-GGUF's Unet Loader (GGUF) reads them.

Users run Wan as community GGUF conversions (Q8_0, Q4_0, F16 …); the tests load these through
ComfyUI-GGUF's own loader (tools/install_host.py installs it into the test hosts) to keep the bridge working
with its quantized ops. Written with the ``gguf`` package (llama.cpp's gguf-py): architecture ``wan``, the
safetensors keys unchanged, the transformer blocks' Linear weights (self- and cross-attention, FFN) stored in
the file's type, everything else float32 as conversions keep the small embedding and head layers precise
(and ComfyUI-GGUF dequantizes every quantized weight in every forward: fewer keeps the tests fast). The
patch embedding's 5-D Conv3d weight is stored flattened to 2-D (GGUF holds at most four dimensions) with its
shape under ``comfy.gguf.orig_shape.<name>``, the key ComfyUI-GGUF restores it from.

    python tools/make_tiny_gguf.py [--out .models] [--force]

Called by tools/make_tiny_models.py after the safetensors models. Idempotent: each file records the spec it
was made from (source model, type, the source's own spec) under ``dit_cache_bridge.tiny_model``; a file
whose spec matches is skipped. Without the ``gguf`` package (``make host`` installs it) nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
if str(TOOLS_DIR) not in sys.path:
    sys.path.append(str(TOOLS_DIR))

REPO_ROOT = TOOLS_DIR.parent
DEFAULT_OUT = REPO_ROOT / ".models"
SUBFOLDER = "diffusion_models"
METADATA_KEY = "dit_cache_bridge.tiny_model"
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
# Bump when the conversion below changes, so existing files are rewritten.
CONVERT_VERSION = 1
BLOCK = 32      # values per block of Q8_0 and Q4_0

# GGUF file stem -> (tiny safetensors model, GGML type of its 2-D weights).
TINY_GGUF_MODELS: dict[str, tuple[str, str]] = {
    "tiny_wan_t2v_a_Q8_0": ("tiny_wan_t2v_a", "Q8_0"),
    "tiny_wan_t2v_a_Q4_0": ("tiny_wan_t2v_a", "Q4_0"),
    "tiny_wan_t2v_a_F16": ("tiny_wan_t2v_a", "F16"),
}
T2V_A_Q8_0 = "tiny_wan_t2v_a_Q8_0.gguf"
T2V_A_Q4_0 = "tiny_wan_t2v_a_Q4_0.gguf"
T2V_A_F16 = "tiny_wan_t2v_a_F16.gguf"
TINY_GGUF_FILES = (T2V_A_Q8_0, T2V_A_Q4_0, T2V_A_F16)


def log(message: str) -> None:
    print(f"[make_tiny_gguf] {message}", flush=True)


def expected_spec(stem: str) -> str:
    from make_tiny_models import expected_metadata

    source, qtype = TINY_GGUF_MODELS[stem]
    source_spec = json.loads(expected_metadata(source)[METADATA_KEY])
    return json.dumps({"name": stem, "source": source, "type": qtype, "convert_version": CONVERT_VERSION,
                       "source_spec": source_spec}, sort_keys=True)


def recorded_spec(path: Path) -> str | None:
    """The spec a GGUF file was made from (None when it is missing, unreadable or has none)."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).get_field(METADATA_KEY)
    except (OSError, ValueError):
        return None
    return None if field is None else str(field.parts[field.data[-1]], encoding="utf-8")


def stored_type(name: str, shape: tuple[int, ...], qtype: str):
    """The GGML type one tensor is stored in: the file's type for the transformer blocks' Linear weights (in
    whole blocks of values), F32 for everything else."""
    import gguf

    if name.startswith("blocks.") and len(shape) == 2 and (qtype == "F16" or shape[-1] % BLOCK == 0):
        return gguf.GGMLQuantizationType[qtype]
    return gguf.GGMLQuantizationType.F32


def write_gguf(stem: str, source: Path, path: Path) -> None:
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    _, qtype = TINY_GGUF_MODELS[stem]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="wan")
    writer.add_string(METADATA_KEY, expected_spec(stem))
    counts: dict[str, int] = {}
    for name, tensor in sorted(load_file(str(source)).items()):
        tensor = np.ascontiguousarray(tensor, dtype=np.float32)
        kind = stored_type(name, tensor.shape, qtype)
        if tensor.ndim > 4:      # GGUF holds at most four dimensions
            writer.add_array(ORIG_SHAPE_KEY + name, [int(n) for n in tensor.shape])
            tensor = tensor.reshape(tensor.shape[0], -1)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, tensor)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, tensor.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(tensor, kind), raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    log(f"wrote {path} ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}; "
        f"{path.stat().st_size / 1e6:.1f} MB)")


def make_gguf_models(out: Path, force: bool = False) -> dict[str, Path]:
    """Write the tiny GGUF models into ``out/diffusion_models`` beside their sources; returns stem -> path.

    Skips up-to-date files; writes nothing (and says so) without the ``gguf`` package or a source model.
    """
    try:
        import gguf  # noqa: F401
    except ImportError:
        log("the gguf package is not installed (make host installs it): no tiny GGUF models")
        return {}
    folder = out / SUBFOLDER
    paths = {}
    for stem, (source_name, _) in TINY_GGUF_MODELS.items():
        path, source = folder / f"{stem}.gguf", folder / f"{source_name}.safetensors"
        if not source.is_file():
            log(f"no {source}: {path.name} not made")
            continue
        if not force and path.is_file() and recorded_spec(path) == expected_spec(stem):
            log(f"up to date: {path}")
        else:
            write_gguf(stem, source, path)
        paths[stem] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"models root holding {SUBFOLDER}/ with the tiny safetensors models (default: {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rewrite files even when they are up to date")
    args = parser.parse_args(argv)
    started = time.monotonic()
    make_gguf_models(args.out.resolve(), args.force)
    log(f"done in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
