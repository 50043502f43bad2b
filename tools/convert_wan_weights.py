"""Convert a Wan2.1/2.2 or ChronoEdit transformer file between ComfyUI's and diffusers' key layouts.

The direction is read from the keys (``self_attn`` = ComfyUI/original, ``attn1`` = diffusers). Tensors
are written unchanged (same dtype, same values); only names change. Needs the optional diffusers extra.

    python tools/convert_wan_weights.py IN.safetensors OUT.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a .safetensors transformer file (ComfyUI or diffusers layout)")
    parser.add_argument("target", type=Path, help="the .safetensors file to write, in the other layout")
    args = parser.parse_args(argv)
    if args.source.suffix != ".safetensors" or not args.source.is_file():
        parser.error(f"{args.source}: expected an existing .safetensors file")
    from safetensors import safe_open
    from safetensors.torch import save_file

    from c2c_diffusers import BridgeSetupError, convert

    with safe_open(str(args.source), framework="pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    try:
        if convert.is_comfy_layout(weights):
            out, layout = convert.to_diffusers(weights), "diffusers"
        else:
            out, layout = convert.to_comfy(weights), "ComfyUI"
    except BridgeSetupError as e:
        print(f"error: {args.source}: {e}", file=sys.stderr)
        return 1
    save_file({k: v.contiguous() for k, v in out.items()}, str(args.target), metadata=metadata)
    print(f"{args.source} -> {args.target}: {len(out)} tensors to {layout} layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
