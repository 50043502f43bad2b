"""One training process for tests/training/test_distributed.py, launched by torchrun (or alone).

    python -m torch.distributed.run --nproc_per_node 2 tests/training/ddp_worker.py SAMPLES OUT_DIR BATCH_SIZE NEGATIVE_SHARE

Sets up ComfyUI and the pack exactly as tools/train_projector.py does, trains a c2c projector for the
tiny pair with ``training.train_projector`` and writes this rank's final weights and losses to
OUT_DIR/rank<r>.safetensors and OUT_DIR/rank<r>.json.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def main(samples: str, out_dir: str, batch_size: str, negative_share: str) -> None:
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
    projector = cli.make_projector(args, nodes, sharer, receiver)
    settings = TrainSettings(loss="distill", steps=5, batch_size=int(batch_size), lr=1e-3, seed=11,
                             negative_share=float(negative_share), checkpoint_every=0)
    outcome = training.train_projector(sharer, receiver, projector, training.open_training_set(samples), settings)
    save_file({k: v.contiguous() for k, v in outcome.bundle.bank.state_dict().items()},
              str(Path(out_dir) / f"rank{rank}.safetensors"))
    rank_losses = outcome.losses
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"losses": rank_losses, "world": world}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
