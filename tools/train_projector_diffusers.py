#!/usr/bin/env python
"""Train a C2C projector with diffusers models: a Wan-family DiT pair, or a Qwen-Image text-encoder pair.

The same trainer as tools/train_projector.py (``c2c_core.train.run_training``: checkpoints, resume, torchrun),
fed by the diffusers bridges; the bundle it writes loads in ComfyUI and in diffusers alike.

--pair wan (default): a sharer DiT -> receiver DiT. Data: a folder of samples written by
``c2c_diffusers.training.save_training_sample`` (clean latent + both models' conditioning). A model is a
diffusers folder (a pipeline's, with transformer/, or the transformer's own) or one .safetensors transformer
file in ComfyUI or diffusers layout.

    python tools/train_projector_diffusers.py --receiver Wan2.1-T2V-14B-Diffusers \\
        --sharer ChronoEdit-14B-Diffusers --sharer-class chronoedit --dataset out/diffusers_samples \\
        --kind c2c --mapping terminal --steps 2000 --lr 1e-4 --warmup 100 \\
        --checkpoint-every 200 --out models/c2c_projectors/wan_chronoedit_c2c.safetensors

--pair text: a Qwen3-VL sharer -> the Qwen2.5-VL text encoder of a Qwen-Image pipeline, trained with that
pipeline's frozen DiT (c2c_diffusers.text_training). --receiver is the pipeline's diffusers folder
(Qwen-Image, or Qwen-Image-Edit for samples with an edit image; its VAE is not loaded), --sharer a
transformers Qwen3-VL folder (model and processor). Data: samples written by
``c2c_diffusers.text_training.save_prompt_sample`` (clean latent + prompt, and the edit image).

    python tools/train_projector_diffusers.py --pair text --receiver Qwen-Image-Edit-2509 \\
        --sharer Qwen3-VL-8B-Instruct --dataset out/qwen_samples --kind c2c --steps 2000 --lr 1e-4 \\
        --checkpoint-every 200 --out models/c2c_projectors/qwen3vl_to_qwen25vl.safetensors

    # several GPUs (or CPU processes): the standard launcher, same arguments
    torchrun --nproc_per_node 2 tools/train_projector_diffusers.py ...

After an interruption: same arguments plus --resume (--restart deletes the checkpoints and starts over).
Under torchrun every process trains on its own share of each step's samples, gradients are averaged
(gloo on CPU, NCCL on GPUs), rank 0 writes checkpoints, the bundle and the loss plot, and at the end all
ranks compare a digest of their weights.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = ("wan", "chronoedit")
PAIRS = ("wan", "text")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--pair", choices=PAIRS, default="wan",
                        help="wan: two Wan-family DiTs; text: Qwen3-VL into a Qwen-Image pipeline's text encoder")
    parser.add_argument("--receiver", type=Path, required=True)
    parser.add_argument("--receiver-class", choices=CLASSES, default="wan", help="--pair wan: the receiver's class")
    parser.add_argument("--sharer", type=Path, required=True)
    parser.add_argument("--sharer-class", choices=CLASSES, default="wan", help="--pair wan: the sharer's class")
    parser.add_argument("--dataset", type=Path, required=True, help="folder of the pair's sample files")
    parser.add_argument("--kind", default="c2c", help="projector kind: gating, full, c2c, weighted (learnable)")
    parser.add_argument("--mapping", default="terminal", help="layer map: terminal, identity, uniform, position")
    parser.add_argument("--hidden-dim", type=int, default=0, help="hidden width of full/c2c projectors (0: default)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default=None, help="default: this process's GPU when there is one, else cpu")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="default: <out>_checkpoints/")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    again.add_argument("--restart", action="store_true", help="delete earlier checkpoints and start over")
    parser.add_argument("--out", type=Path, required=True, help="the projector bundle to write (.safetensors)")
    parser.add_argument("--plot", type=Path, default=None, help="loss-curve PNG (default: <out>_loss.png)")
    args = parser.parse_args(argv)
    for name in ("receiver", "sharer"):
        if not getattr(args, name).exists():
            parser.error(f"--{name} {getattr(args, name)}: no such file or folder")
    if args.out.suffix != ".safetensors":
        parser.error(f"--out {args.out}: expected a .safetensors file name")
    stem = args.out.with_suffix("")
    args.checkpoint_dir = args.checkpoint_dir or stem.with_name(stem.name + "_checkpoints")
    args.plot = args.plot or stem.with_name(stem.name + "_loss.png")
    return args


@dataclass
class Pair:
    """What the loop needs of either pair: the bank and its map, the step's batches, the loss, and the bridge
    to detach afterwards."""
    bank: object
    layer_map: object
    batches: object
    loss_fn: object
    samples: int
    bridge: object


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


def wan_pair(args, dtype, device, rank: int, world: int) -> Pair:
    from c2c_core import LayerMap, ProjectorBank, velocity_loss
    from c2c_core.bundle import ProjectorBundle
    from c2c_diffusers import Bridge, LiveSharer, models
    from c2c_diffusers.training import bridged_velocity, open_training_set, sample_batches

    dataset = open_training_set(args.dataset)
    receiver = load_transformer(args.receiver, args.receiver_class, dtype).to(device).requires_grad_(False)
    sharer = load_transformer(args.sharer, args.sharer_class, dtype).to(device).requires_grad_(False)
    rs, ss = models.signature(receiver, args.receiver.stem), models.signature(sharer, args.sharer.stem)
    dataset.check_models(rs.arch, ss.arch)
    layer_map = LayerMap.build(args.mapping, ss.num_layers, rs.num_layers)
    hparams = {"hidden_dim": args.hidden_dim} if args.hidden_dim else {}
    bank = ProjectorBank.build(args.kind, ss, rs, layer_map.layers, **hparams).to(device, dtype)
    bundle = ProjectorBundle(bank=bank, layer_map=layer_map, sharer=ss, receiver=rs)
    batches = sample_batches(dataset, seed=args.seed, device=device, rank=rank, world=world)
    bridge = Bridge(LiveSharer(sharer, batches(0).sharer), bundle).attach(receiver)
    return Pair(bank, layer_map, batches, velocity_loss(bridged_velocity(bridge, receiver)), len(dataset), bridge)


def text_pair(args, dtype, device, rank: int, world: int) -> Pair:
    from diffusers import DiffusionPipeline
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from c2c_core import LayerMap, ProjectorBank, velocity_loss
    from c2c_core.bundle import ProjectorBundle
    from c2c_diffusers import TextEncoderBridge
    from c2c_diffusers.text_encoder import encoder_signature
    from c2c_diffusers.text_training import bridged_prompt_velocity, check_prompt_set, open_prompt_set, prompt_batches

    dataset = open_prompt_set(args.dataset)
    if not args.receiver.is_dir():
        raise SystemExit(f"--receiver {args.receiver}: expected a Qwen-Image pipeline's diffusers folder")
    pipe = DiffusionPipeline.from_pretrained(str(args.receiver), vae=None, dtype=dtype).to(device)
    check_prompt_set(dataset, pipe)     # before the sharer loads
    sharer = AutoModelForImageTextToText.from_pretrained(str(args.sharer), dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(str(args.sharer))
    for model in (pipe.text_encoder, pipe.transformer, sharer):
        model.requires_grad_(False)
    rs, ss = encoder_signature(pipe.text_encoder), encoder_signature(sharer)
    layer_map = LayerMap.build(args.mapping, ss.num_layers, rs.num_layers)
    hparams = {"hidden_dim": args.hidden_dim} if args.hidden_dim else {}
    bank = ProjectorBank.build(args.kind, ss, rs, layer_map.layers, **hparams).to(device, dtype)
    bridge = TextEncoderBridge(sharer, processor, ProjectorBundle(bank=bank, layer_map=layer_map, sharer=ss,
                                                                  receiver=rs)).attach(pipe)
    batches = prompt_batches(dataset, seed=args.seed, device=device, rank=rank, world=world)
    return Pair(bank, layer_map, batches, velocity_loss(bridged_prompt_velocity(bridge, pipe)), len(dataset), bridge)


def weights_digest(bank) -> str:
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(bank.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_loss_plot(losses: list, path: Path, title: str) -> None:
    """The loss curve as a PNG: raw per-step loss and a moving mean (log scale when all positive)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    values = np.asarray(losses, dtype=np.float64)
    steps = np.arange(1, len(values) + 1)
    ax.plot(steps, values, color="#9db4d6", linewidth=0.8, label="per step")
    window = max(1, len(values) // 20)
    if window > 1:
        ax.plot(steps[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid"), color="#1f4e99",
                linewidth=1.6, label=f"mean of {window}")
    if len(values) and (values > 0).all() and values.max() > 10 * values.min():
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="step", ylabel="loss")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    import torch
    import torch.distributed as dist

    from c2c_core import C2CError, TrainConfig, save_bundle
    from c2c_core.checkpoint import has_checkpoint
    from c2c_core.train import provenance, run_training
    from c2c_diffusers import BridgeSetupError

    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    say = print if rank == 0 else (lambda *a, **k: None)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    try:
        if not args.resume and not args.restart and has_checkpoint(args.checkpoint_dir):
            raise SystemExit(f"{args.checkpoint_dir} holds checkpoints of an earlier run; pass --resume to continue "
                             f"it or --restart to delete them and start over.")
        config = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, seed=args.seed,
                             checkpoint_every=args.checkpoint_every, checkpoint_dir=str(args.checkpoint_dir))
        pair = (text_pair if args.pair == "text" else wan_pair)(args, dtype, device, rank, world)
        try:
            result = run_training(pair.bank, pair.layer_map, pair.batches, pair.loss_fn, config,
                                  resume=not args.restart,
                                  progress=lambda done, total, loss: say(f"step {done}/{total} loss {loss:.5f}",
                                                                         flush=True))
        finally:
            pair.bridge.detach()
        digest = weights_digest(pair.bank)
        if world > 1:
            digests = [None] * world
            dist.all_gather_object(digests, digest)
            if len(set(digests)) != 1:
                raise SystemExit(f"ranks ended with different projector weights: {digests}")
            say(f"all {world} ranks hold identical projector weights (sha256 {digest[:16]})")
        if rank == 0:
            save_bundle(args.out, pair.bank, pair.layer_map,
                        provenance=provenance("tools/train_projector_diffusers.py", config, result, pair.samples,
                                              processes=world))
            write_loss_plot(result.losses, args.plot, f"velocity loss, {pair.bank.kind} projector ({args.pair} pair)")
    except (C2CError, BridgeSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if result.resumed_at:
        say(f"resumed at step {result.resumed_at}")
    say(f"wrote {args.out} and {args.plot} (loss {result.losses[0]:.5f} -> {result.losses[-1]:.5f}; "
        f"weights sha256 {digest[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
