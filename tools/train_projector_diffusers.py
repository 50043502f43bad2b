#!/usr/bin/env python
"""Train a C2C projector for a Wan-family sharer -> receiver pair with diffusers models.

The same trainer as tools/train_projector.py (``c2c_core.train.run_training``), fed by the diffusers
bridge (``c2c_diffusers.training``); the bundle it writes loads in ComfyUI and in diffusers alike. Data:
a folder of samples (``c2c_core.samples``) written by ``c2c_diffusers.training.save_training_sample``
(clean latent + both models' conditioning).

    python tools/train_projector_diffusers.py --receiver Wan2.1-T2V-14B-Diffusers \\
        --sharer ChronoEdit-14B-Diffusers --sharer-class chronoedit --dataset out/diffusers_samples \\
        --kind c2c --mapping terminal --steps 2000 --lr 1e-4 --warmup 100 \\
        --checkpoint-every 200 --out models/c2c_projectors/wan_chronoedit_c2c.safetensors

A model is a diffusers folder (a pipeline's, with transformer/, or the transformer's own) or one
.safetensors transformer file in ComfyUI or diffusers layout. After an interruption: same arguments
plus --resume.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = ("wan", "chronoedit")


def load_transformer(path: Path, kind: str, dtype):
    import diffusers
    from safetensors.torch import load_file

    from c2c_diffusers import convert

    cls = diffusers.ChronoEditTransformer3DModel if kind == "chronoedit" else diffusers.WanTransformer3DModel
    if path.is_dir():
        sub = "transformer" if (path / "transformer").is_dir() else None
        return cls.from_pretrained(str(path), subfolder=sub, torch_dtype=dtype)
    weights = load_file(str(path))
    if not convert.is_comfy_layout(weights):
        weights = convert.to_comfy(weights)
    return convert.from_comfy(weights, cls=cls, dtype=dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--receiver", type=Path, required=True)
    parser.add_argument("--receiver-class", choices=CLASSES, default="wan")
    parser.add_argument("--sharer", type=Path, required=True)
    parser.add_argument("--sharer-class", choices=CLASSES, default="wan")
    parser.add_argument("--dataset", type=Path, required=True, help="folder of save_training_sample files")
    parser.add_argument("--kind", default="c2c", help="projector kind: gating, full, c2c, weighted (learnable)")
    parser.add_argument("--mapping", default="terminal", help="layer map: terminal, identity, uniform, position")
    parser.add_argument("--hidden-dim", type=int, default=0, help="hidden width of full/c2c projectors (0: default)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out's folder")
    parser.add_argument("--out", type=Path, required=True, help="the projector bundle to write (.safetensors)")
    args = parser.parse_args(argv)
    for name in ("receiver", "sharer"):
        if not getattr(args, name).exists():
            parser.error(f"--{name} {getattr(args, name)}: no such file or folder")
    if args.out.suffix != ".safetensors":
        parser.error(f"--out {args.out}: expected a .safetensors file name")

    import torch

    from c2c_core import C2CError, LayerMap, ProjectorBank, TrainConfig, save_bundle, velocity_loss
    from c2c_core.bundle import ProjectorBundle
    from c2c_core.checkpoint import has_checkpoint
    from c2c_core.train import provenance, run_training
    from c2c_diffusers import Bridge, BridgeSetupError, LiveSharer, models
    from c2c_diffusers.training import bridged_velocity, open_training_set, sample_batches

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    try:
        dataset = open_training_set(args.dataset)
        checkpoints = args.out.parent / (args.out.stem + "_checkpoints")
        if not args.resume and has_checkpoint(checkpoints):
            parser.error(f"{checkpoints} holds checkpoints of an earlier run; pass --resume to continue it or "
                         f"delete them to start over.")
        receiver = load_transformer(args.receiver, args.receiver_class, dtype).to(args.device).requires_grad_(False)
        sharer = load_transformer(args.sharer, args.sharer_class, dtype).to(args.device).requires_grad_(False)
        rs, ss = models.signature(receiver, args.receiver.stem), models.signature(sharer, args.sharer.stem)
        dataset.check_models(rs.arch, ss.arch)
        layer_map = LayerMap.build(args.mapping, ss.num_layers, rs.num_layers)
        hparams = {"hidden_dim": args.hidden_dim} if args.hidden_dim else {}
        bank = ProjectorBank.build(args.kind, ss, rs, layer_map.layers, **hparams).to(args.device, dtype)
        bundle = ProjectorBundle(bank=bank, layer_map=layer_map, sharer=ss, receiver=rs)
        batches = sample_batches(dataset, seed=args.seed, device=args.device)
        bridge = Bridge(LiveSharer(sharer, batches(0).sharer), bundle).attach(receiver)
        config = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, seed=args.seed,
                             checkpoint_every=args.checkpoint_every,
                             checkpoint_dir=str(checkpoints) if args.checkpoint_every or args.resume else None)
        try:
            result = run_training(bank, layer_map, batches, velocity_loss(bridged_velocity(bridge, receiver)), config,
                                  resume=args.resume,
                                  progress=lambda done, total, loss: print(f"step {done}/{total} loss {loss:.5f}",
                                                                           flush=True))
        finally:
            bridge.detach()
        save_bundle(args.out, bank, layer_map,
                    provenance=provenance("tools/train_projector_diffusers.py", config, result, len(dataset)))
    except (C2CError, BridgeSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} (loss {result.losses[0]:.5f} -> {result.losses[-1]:.5f})")
    return 0


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
