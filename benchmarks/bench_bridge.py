"""Speed of a bridged sampling run against its floor (one receiver forward + one sharer forward per call).

Run: .venv/bin/python benchmarks/bench_bridge.py [--tokens-frames 5 --size 32 --steps 6 --repeats 3]
CPU, tiny random-weight Wan models (dim 512 / 3 layers for both sides); ratios, side by side, same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--size", type=int, default=32, help="latent height and width")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import host
    models = host.ensure_tiny_models()
    host.setup_comfy_in_process(models.root, Path(tempfile.mkdtemp()))
    import torch
    from bridge_helpers import ksample, load_model, pack_nodes
    from comfy_test_nodes import wan_conditioning
    nodes = pack_nodes()
    torch.set_num_threads(2)

    receiver = load_model(models.path(host.T2V_WIDE))
    sharer = load_model(models.path(host.T2V_WIDE))
    pos, neg = wan_conditioning(1), wan_conditioning(2, length=5)
    latent = {"samples": torch.zeros(1, 16, args.frames, args.size, args.size)}

    def bridged(kind, layers, refresh=1):
        proj = nodes.CreateC2CProjector.execute(sharer, receiver, kind, "identity", layers, 0.5, 0, 0).args[0]
        src = nodes.CaptureKVCache.execute(sharer, pos, neg, refresh_every=refresh).args[0]
        return nodes.FuseCaches.execute(receiver, src, proj, 1.0, 0.0, 1.0).args[0]

    runs = {
        "receiver alone": receiver,
        "sharer alone": sharer,
        "bridged, weighted, all layers": bridged("weighted", "all"),
        "bridged, weighted, first layer (sharer stops after it)": bridged("weighted", "0"),
        "bridged, weighted, all layers, refresh every 3": bridged("weighted", "all", refresh=3),
    }
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, model in runs.items():
            start = time.perf_counter()
            ksample(model, pos, neg, cfg=4.0, steps=args.steps, latent=latent)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    floor = med["receiver alone"] + med["sharer alone"]
    tokens = args.frames * (args.size // 2) ** 2
    print(f"{tokens} tokens, {args.steps} steps, cfg 4 (2 model calls per step), median of {args.repeats}")
    print(f"| run | seconds | ÷ receiver alone | ÷ (receiver + sharer) |")
    print(f"|---|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {t:.2f} | {t / med['receiver alone']:.2f} | {t / floor:.2f} |")


if __name__ == "__main__":
    main()
