#!/usr/bin/env python
"""Train a C2C projector for a Wan sharer -> receiver pair, or between two Qwen text encoders, from the command line.

Same implementation as the Train C2C Projector node (``c2c_comfy/training.py: train_projector``); data
are folders written by Save C2C Training Sample (or by a script using ``save_training_samples``).
With ``--pair text``, as Train C2C Text Projector (``c2c_comfy/text_training.py: train_text_projector``):
--sharer and --receiver are the text encoders (Qwen3-VL, Qwen-Image's Qwen2.5-VL), --dit the frozen
Qwen-Image DiT whose flow-matching loss trains the projector, data from Save C2C Text Training Sample.

    python tools/train_projector.py --sharer chronoedit_14B_fp16.safetensors \\
        --receiver wan2.1_t2v_14B_fp16.safetensors --dataset output/c2c_training/my_samples \\
        --kind c2c --mapping terminal --loss distill --steps 2000 --batch-size 1 --lr 1e-4 \\
        --warmup 100 --checkpoint-every 200 --out models/c2c_projectors/wan_chronoedit_c2c.safetensors

    # several GPUs (or CPU processes with --cpu): the standard launcher, same arguments
    torchrun --nproc_per_node 2 tools/train_projector.py ...

    # after an interruption: same arguments plus --resume
    python tools/train_projector.py ... --resume

    # a text-encoder pair (torchrun works the same)
    python tools/train_projector.py --pair text --sharer qwen3_vl_8b.safetensors \
        --receiver qwen_2.5_vl_7b.safetensors --dit qwen_image_edit_2509_fp8_e4m3fn.safetensors \
        --dataset output/c2c_training/c2c_text_samples --kind c2c --steps 2000 \
        --out models/c2c_projectors/qwen3vl_to_qwen25vl_c2c.safetensors

Models load with ComfyUI's ``comfy.sd.load_diffusion_model`` (the UNETLoader code) and text encoders with
``comfy.sd.load_clip`` (CLIPLoader, type qwen_image). ComfyUI is found
through COMFYUI_PATH, else the repository's pinned host in .host/ComfyUI. Under torchrun every
process trains on its own share of each step's batches, the projector's gradients are averaged
(gloo on CPU, NCCL on GPUs), rank 0 writes checkpoints, the bundle and the loss plot, and at the end
all ranks compare a digest of their weights.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import sys
import time
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
if str(TOOLS_DIR) not in sys.path:      # loaded by path (tests/training/ddp_worker.py, experiments/miniature.py)
    sys.path.append(str(TOOLS_DIR))
import comfy_host  # noqa: E402

PACK_NAME = comfy_host.PACK_NAME


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    g = p.add_argument_group("models and data")
    g.add_argument("--pair", choices=("wan", "text"), default="wan",
                   help="wan: two Wan diffusion models; text: two Qwen text encoders and a Qwen-Image --dit")
    g.add_argument("--sharer", required=True, type=Path, help="sharer diffusion model (--pair text: text encoder)")
    g.add_argument("--receiver", required=True, type=Path, help="receiver diffusion model (--pair text: Qwen-Image's "
                                                                 "text encoder)")
    g.add_argument("--dit", type=Path, default=None, help="--pair text: the Qwen-Image diffusion model (frozen)")
    g.add_argument("--dataset", required=True, type=Path, help="folder of training-sample files")
    g.add_argument("--receiver-shift", type=float, default=None,
                   help="ModelSamplingSD3 shift of the receiver (sets the sigma distribution; default: the model's)")
    g.add_argument("--sharer-rope-scale-t", type=float, default=None,
                   help="ScaleROPE scale_t of the sharer, as in its workflow (ChronoEdit: 7)")
    g = p.add_argument_group("projector (a bundle to continue from, or a fresh one)")
    g.add_argument("--projector", type=Path, default=None, help="start from this bundle instead of a fresh projector")
    g.add_argument("--kind", default="c2c", help="fresh projector kind: a learnable one of Create C2C Projector's")
    g.add_argument("--mapping", default="terminal", help="layer map of a fresh projector (Create C2C Projector's)")
    g.add_argument("--layers", default="all", help="receiver layers to fuse, e.g. 'all', 'last8', '0-3,7'")
    g.add_argument("--hidden-dim", type=int, default=0, help="hidden width (0: the kind's default; c2c: the receiver's K/V width / 8, 64-512)")
    g.add_argument("--init-seed", type=int, default=0, help="initialisation seed of a fresh projector")
    g = p.add_argument_group("training")
    g.add_argument("--loss", default=None, help="c2c_core's LOSS_KINDS: velocity, distill or kv (default distill; "
                                                "--pair text trains with velocity only)")
    g.add_argument("--steps", type=int, default=500)
    g.add_argument("--batch-size", type=int, default=1, help="samples per step and process")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    g.add_argument("--schedule", default="cosine", help="learning-rate decay, c2c_core's DECAYS")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--negative-share", type=float, default=0.1, help="fraction of examples with negative conds")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("files")
    g.add_argument("--out", required=True, type=Path, help="the trained bundle (.safetensors)")
    g.add_argument("--checkpoint-dir", type=Path, default=None, help="default: <out>_checkpoints/")
    g.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: end only)")
    g.add_argument("--plot", type=Path, default=None, help="loss-curve PNG (default: <out>_loss.png)")
    resume = g.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    resume.add_argument("--restart", action="store_true", help="delete earlier checkpoints and start over")
    g = p.add_argument_group("machine")
    g.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.out.suffix != ".safetensors":
        p.error(f"--out {args.out}: expected a .safetensors file name")
    if args.pair == "text":
        if args.dit is None:
            p.error("--pair text needs --dit, the Qwen-Image diffusion model whose loss trains the projector")
        if args.loss not in (None, "velocity"):
            p.error(f"--loss {args.loss}: --pair text trains with the DiT's flow-matching loss, 'velocity'")
        args.loss = "velocity"
    elif args.dit is not None:
        p.error("--dit is for --pair text")
    args.loss = args.loss or "distill"
    stem = args.out.with_suffix("")
    args.checkpoint_dir = args.checkpoint_dir or stem.with_name(stem.name + "_checkpoints")
    args.plot = args.plot or stem.with_name(stem.name + "_loss.png")
    return args


def setup_comfyui(cpu: bool, local_rank: int):
    """ComfyUI booted in this process the one way (tools/comfy_host.py), on the CPU or this rank's GPU."""
    import torch

    comfy_host.boot(cpu=cpu or not torch.cuda.is_available(), cuda_device=local_rank)


def import_pack():
    """The pack's training module and nodes, the pack loaded as ComfyUI loads it (package ``dit_cache_bridge``)."""
    comfy_host.load_pack()
    return importlib.import_module(f"{PACK_NAME}.c2c_comfy.training"), importlib.import_module(f"{PACK_NAME}.nodes")


def load_models(args):
    import comfy.sd

    for name in ("sharer", "receiver"):
        if not getattr(args, name).is_file():
            raise SystemExit(f"--{name} {getattr(args, name)}: no such file")
    sharer = comfy.sd.load_diffusion_model(str(args.sharer))
    receiver = comfy.sd.load_diffusion_model(str(args.receiver))
    if args.receiver_shift is not None:
        from comfy_extras.nodes_model_advanced import ModelSamplingSD3
        (receiver,) = ModelSamplingSD3().patch(receiver, args.receiver_shift)
    if args.sharer_rope_scale_t is not None:
        sharer = sharer.clone()
        sharer.set_model_rope_options(1.0, 0.0, 1.0, 0.0, args.sharer_rope_scale_t, 0.0)
    return sharer, receiver


def load_text_models(args):
    """The two text encoders (CLIPLoader's code, type qwen_image) and the Qwen-Image DiT (UNETLoader's)."""
    import comfy.sd
    import folder_paths

    for name in ("sharer", "receiver", "dit"):
        if not getattr(args, name).is_file():
            raise SystemExit(f"--{name} {getattr(args, name)}: no such file")

    def clip(path):
        return comfy.sd.load_clip(ckpt_paths=[str(path)], clip_type=comfy.sd.CLIPType.QWEN_IMAGE,
                                  embedding_directory=folder_paths.get_folder_paths("embeddings"))

    return clip(args.sharer), clip(args.receiver), comfy.sd.load_diffusion_model(str(args.dit))


def make_projector(args, nodes, sharer, receiver):
    from c2c_core import load_bundle

    if args.projector is not None:
        bundle = load_bundle(args.projector)
        compat = importlib.import_module(f"{PACK_NAME}.c2c_comfy.compat")
        if args.pair == "text":
            text = importlib.import_module(f"{PACK_NAME}.c2c_comfy.text_encoder")
            signatures = [text.encoder_signature(compat.qwen_encoder(m)) for m in (sharer, receiver)]
        else:
            signatures = [compat.wan_signature(m) for m in (sharer, receiver)]
        nodes.projector.check_projector_fits("train_projector.py", bundle, *signatures)
        return bundle
    return nodes.CreateC2CProjector.execute(sharer, receiver, args.kind, args.mapping, args.layers, 0.5,
                                            args.hidden_dim, args.init_seed).args[0]


def compat_encoder_width(clip) -> int:
    """The hidden width of a Qwen text encoder (what the Qwen-Image DiT must read)."""
    return importlib.import_module(f"{PACK_NAME}.c2c_comfy.compat").qwen_encoder(clip).hidden_size


def weights_digest(bank) -> str:
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(bank.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    setup_comfyui(args.cpu, local_rank)
    import torch
    import torch.distributed as dist
    import comfy.model_management

    if args.threads:
        torch.set_num_threads(args.threads)
    if world > 1:
        on_gpu = comfy.model_management.get_torch_device().type == "cuda"
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        training, nodes = import_pack()
        core = importlib.import_module("c2c_core")
        samples, train, checkpoint = (importlib.import_module(f"c2c_core.{m}")
                                      for m in ("samples", "train", "checkpoint"))
        text = importlib.import_module(f"{PACK_NAME}.c2c_comfy.text_training") if args.pair == "text" else None
        try:
            dataset = (text.open_prompt_set if text else training.open_training_set)(args.dataset)
        except samples.TrainingDataError as e:
            raise SystemExit(f"--dataset: {e}") from None
        if not args.resume and not args.restart and checkpoint.has_checkpoint(args.checkpoint_dir):
            raise SystemExit(f"{args.checkpoint_dir} holds checkpoints of an earlier run; pass --resume to continue "
                             f"it or --restart to delete them and start over.")
        refused = (core.C2CError, importlib.import_module(f"{PACK_NAME}.c2c_comfy.errors").BridgeInputError)
        try:        # the pack's own lists and checks (c2c_core, Create C2C Projector), before any model loads
            settings = train.TrainSettings(loss=args.loss, steps=args.steps, batch_size=args.batch_size,
                                           lr=args.lr, warmup_steps=args.warmup, decay=args.schedule,
                                           checkpoint_every=args.checkpoint_every,
                                           checkpoint_dir=args.checkpoint_dir, seed=args.seed,
                                           negative_share=args.negative_share, weight_decay=args.weight_decay,
                                           grad_clip=args.grad_clip)
            if text:
                sharer, receiver, dit = load_text_models(args)
                text.check_dit("train_projector.py", "--dit", dit, compat_encoder_width(receiver))
            else:
                sharer, receiver = load_models(args)
            projector = make_projector(args, nodes, sharer, receiver)
        except refused as e:
            raise SystemExit(f"train_projector.py: {e}") from None
        if not any(True for _ in projector.bank.parameters()):
            raise SystemExit(f"--kind {projector.bank.kind}: this projector has nothing to learn; use c2c, full, "
                             "gating or auto")
        say(f"[train_projector] {projector.bank.kind} projector, layers {projector.layer_map.pairs} "
            f"(receiver: sharer), {len(dataset)} samples, {world} process(es), loss {args.loss}")
        started = time.monotonic()
        every = max(1, args.steps // 20)
        first_step = []

        def progress(done, total, loss):
            first_step.append(done) if not first_step else None
            if done % every == 0 or done == total:
                rate = (time.monotonic() - started) / (done - first_step[0] + 1)
                say(f"[train_projector] step {done}/{total} loss {loss:.5f} ({rate:.2f} s/step)", flush=True)

        try:
            if text:
                outcome = text.train_text_projector(dit, receiver, sharer, projector, dataset, settings,
                                                    resume=not args.restart, output_path=args.out, progress=progress)
            else:
                outcome = training.train_projector(sharer, receiver, projector, dataset, settings,
                                                   resume=not args.restart, output_path=args.out, progress=progress)
        except samples.TrainingDataError as e:
            raise SystemExit(f"--dataset: {e}") from None
        if rank == 0:
            plot = nodes.train.loss_plot(outcome.losses, f"{args.loss} loss, {outcome.bundle.bank.kind} projector")
            nodes.train.write_png(plot, args.plot)
        digest = weights_digest(outcome.bundle.bank)
        if world > 1:
            digests = [None] * world
            dist.all_gather_object(digests, digest)
            if len(set(digests)) != 1:
                raise SystemExit(f"ranks ended with different projector weights: {digests}")
            say(f"[train_projector] all {world} ranks hold identical projector weights (sha256 {digest[:16]})")
        if outcome.resumed_at:
            say(f"[train_projector] resumed at step {outcome.resumed_at}")
        say(f"[train_projector] wrote {args.out} and {args.plot} in {time.monotonic() - started:.1f} s; "
            f"final loss {outcome.losses[-1]:.5f}; weights sha256 {digest[:16]}")
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
