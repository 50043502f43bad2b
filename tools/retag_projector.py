#!/usr/bin/env python
"""Give a projector bundle saved before bundles named their models the architecture tags of its pair.

Load C2C Projector accepts such a bundle on its shapes alone (with a warning); once tagged, a projector
made for one pair is refused for another pair of the same shapes. The tags are read from the models'
safetensors headers (no weight is loaded), so this runs without ComfyUI or diffusers:

    python tools/retag_projector.py models/c2c_projectors/old.safetensors \\
        --sharer models/diffusion_models/chronoedit_14B.safetensors \\
        --receiver models/diffusion_models/wan2.1_t2v_14B.safetensors

A model is one .safetensors file (original/ComfyUI or diffusers key layout) or a diffusers folder
(its transformer/ shards). Writes ``<name>_tagged.safetensors`` beside the bundle unless --out is
given; never replaces an existing file. A backward bank, if the bundle holds one, is tagged too.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def weight_shapes(path: Path) -> dict:
    """{name: shape} from the safetensors header(s) of a model file or diffusers folder."""
    from c2c_core.tensorfile import read_header
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise SystemExit(f"{path}: no .safetensors files in {folder}; expected a model file or a diffusers folder.")
    else:
        files = [path]
    shapes = {}
    for file in files:
        shapes.update({name: shape for name, (shape, _) in read_header(file)[1].items()})
    return shapes


def tagged(sig, path: Path, role: str):
    from c2c_core.arch import arch_from_weights
    from c2c_core.errors import SignatureError
    try:        # the tag is range-checked where it is made: a tag load_bundle would refuse is never written
        arch = arch_from_weights(weight_shapes(path), sig.num_heads)
    except SignatureError as e:
        raise SystemExit(f"--{role} {path}: {e} Nothing was written; pass the {role} model file (a Wan-family "
                         f"checkpoint) the bundle was made for.") from None
    if (arch.num_layers, arch.dim) != (sig.num_layers, sig.width):
        raise SystemExit(f"--{role} {path}: a model of {arch.num_layers} layers, dim {arch.dim}; the bundle's {role} "
                         f"has {sig.num_layers} layers, dim {sig.width}. Pass the {role} the bundle was made for.")
    if sig.arch is not None and sig.arch != arch:
        raise SystemExit(f"--{role} {path}: {arch.describe()}, but the bundle is already tagged for "
                         f"{sig.arch.describe()}; nothing to do.")
    return dataclasses.replace(sig, arch=arch)


def retag(bundle_path: Path, sharer: Path, receiver: Path, out: Path) -> Path:
    from c2c_core.bundle import load_bundle, save_projector_bundle
    bundle = load_bundle(bundle_path)
    s, r = tagged(bundle.sharer, sharer, "sharer"), tagged(bundle.receiver, receiver, "receiver")
    bundle.bank.sharer, bundle.bank.receiver = s, r
    backward = bundle.backward
    if backward is not None:
        backward.bank.sharer, backward.bank.receiver = r, s
        backward = dataclasses.replace(backward, sharer=r, receiver=s)
    bundle = dataclasses.replace(bundle, sharer=s, receiver=r, backward=backward)
    save_projector_bundle(out, bundle, provenance={**bundle.provenance, "retagged_from": bundle_path.name},
                          overwrite=False)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="the projector bundle (.safetensors) to tag")
    parser.add_argument("--sharer", type=Path, required=True, help="the sharer model it was made for")
    parser.add_argument("--receiver", type=Path, required=True, help="the receiver model it was made for")
    parser.add_argument("--out", type=Path, help="output file (default: <bundle>_tagged.safetensors)")
    args = parser.parse_args(argv)
    from c2c_core import C2CError
    out = args.out or args.bundle.with_name(f"{args.bundle.stem}_tagged.safetensors")
    try:
        retag(args.bundle, args.sharer, args.receiver, out)
    except FileExistsError:
        raise SystemExit(f"{out} exists; choose another --out (files are never replaced).") from None
    except C2CError as exc:
        raise SystemExit(str(exc)) from None
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
