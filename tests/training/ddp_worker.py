"""The training processes for tests/training/test_distributed.py: one torchrun launch trains every run the
tests compare, so ComfyUI starts once per process instead of once per run.

    python -m torch.distributed.run --nproc_per_node 2 tests/training/ddp_worker.py SAMPLES OUT_DIR RUN [RUN ...]

RUN is NAME=BATCH_SIZE,NEGATIVE_SHARE: a data-parallel run of every rank; NAME=BATCH_SIZE,NEGATIVE_SHARE,alone
runs after the process group is closed, on rank 0 alone (world 1: the one-process reference). Sets up ComfyUI
and the pack exactly as tools/train_projector.py does, trains a c2c projector for the tiny pair with
``training.train_projector`` and writes each run's final weights and losses to OUT_DIR/NAME/rank<r>.safetensors
and OUT_DIR/NAME/rank<r>.json.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def parse_run(text: str) -> tuple[str, int, float, bool]:
    name, settings = text.split("=", 1)
    batch_size, negative_share, *alone = settings.split(",")
    return name, int(batch_size), float(negative_share), alone == ["alone"]


def main(samples: str, out_dir: str, *runs: str) -> None:
    spec = importlib.util.spec_from_file_location("_dcb_train_projector", REPO_ROOT / "tools" / "train_projector.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.setup_comfyui(cpu=True, local_rank=0)
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group(backend="gloo")
    training, nodes = cli.import_pack()
    from c2c_core.train import TrainSettings
    models = REPO_ROOT / ".models" / "diffusion_models"
    args = cli.parse_args(["--sharer", str(models / "tiny_wan_t2v_b.safetensors"),
                           "--receiver", str(models / "tiny_wan_t2v_a.safetensors"), "--dataset", samples,
                           "--out", str(Path(out_dir) / "unused.safetensors"), "--kind", "c2c",
                           "--mapping", "identity", "--hidden-dim", "64"])
    sharer, receiver = cli.load_models(args)

    def train(name: str, batch_size: int, negative_share: float, world: int) -> None:
        projector = cli.make_projector(args, nodes, sharer, receiver)
        settings = TrainSettings(loss="distill", steps=5, batch_size=batch_size, lr=1e-3, seed=11,
                                 negative_share=negative_share, checkpoint_every=0)
        outcome = training.train_projector(sharer, receiver, projector, training.open_training_set(samples), settings)
        out = Path(out_dir) / name
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in outcome.bundle.bank.state_dict().items()},
                  str(out / f"rank{rank}.safetensors"))
        rank_losses = outcome.losses
        (out / f"rank{rank}.json").write_text(json.dumps({"losses": rank_losses, "world": world}))

    plan = [parse_run(run) for run in runs]
    for name, batch_size, negative_share, alone in plan:
        if not alone:
            train(name, batch_size, negative_share, world)
    if world > 1:
        dist.destroy_process_group()
    for name, batch_size, negative_share, alone in plan:
        if alone and rank == 0:
            train(name, batch_size, negative_share, 1)


if __name__ == "__main__":
    main(*sys.argv[1:])
