"""Writes training checkpoints of a ~4 MB bank (+ AdamW state) in a loop until killed (test_checkpoint_kill.py)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from c2c_core import LayerMap, ModelSignature, ProjectorBank, TrainConfig  # noqa: E402
from c2c_core.checkpoint import save_checkpoint  # noqa: E402

folder = Path(sys.argv[1])
sig = ModelSignature(2, 8, 128)
layer_map = LayerMap.build("identity", 2, 2)
bank = ProjectorBank.build("full", sig, sig, layer_map.layers, hidden_dim=256)
optimizer = torch.optim.AdamW(bank.parameters())
for p in bank.parameters():
    p.grad = torch.zeros_like(p)
optimizer.step()
config = TrainConfig(steps=10**6, checkpoint_every=1, checkpoint_dir=str(folder))
for step in range(1, 10**6):
    save_checkpoint(folder, step, bank, layer_map, optimizer, [0.5] * step, config, {"kind": "test"})
    print(step, flush=True)
