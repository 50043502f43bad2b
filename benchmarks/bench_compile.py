"""torch.compile and the bridge: a compiled receiver, bridged and stock, against the eager runs.

One command, all runs in one process (results and caveats: BENCHMARKS.md, "Compiled receiver"):

    .venv/bin/python benchmarks/bench_compile.py                        # CPU, inductor, a small Wan
    python benchmarks/bench_compile.py --shape wan1.3b --device cuda      # the same at Wan2.1-1.3B shape

Both models are random-weight Wan2.1 T2V models built by ComfyUI's own loader. The compiled receiver is
ComfyUI's TorchCompileModel (``comfy_api.torch_helpers.set_torch_compile_wrapper``, the node's code), applied
before Fuse Caches as a user wires it; the bridge is lockstep live with a weighted projector on every layer.
Each compiled model is sampled once untimed (tracing and code generation), then the four kinds alternate within
every repeat and the median is reported, with the graph breaks and compiles dynamo counted in the timed runs
(both must be 0: a recompile there would be a cost per call). On the CPU the clock is the process's CPU time with
one torch thread (inductor's kernels use as many), as bench_bridge.py explains for shared cores; wall time is kept.

Ratios: compiled ÷ eager for stock and bridged, and bridged ÷ stock for eager and compiled (the bridge's
overhead with and without compilation).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench_setup import ROOT, load_random_wan, setup_host

SHAPES = {
    "cpu": dict(dim=512, ffn=1024, layers=4, latent=(16, 3, 16, 16), dtype="fp32"),      # 192 tokens
    "wan1.3b": dict(dim=1536, ffn=8960, layers=30, latent=(16, 21, 60, 104), dtype="bf16"),
    "smoke": dict(dim=256, ffn=512, layers=2, latent=(16, 2, 8, 8), dtype="fp32"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (TorchCompileModel: inductor)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU torch threads (see bench_bridge.py on shared cores)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench" / "bench_compile.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_compile_"))
    setup_host(args.device, tmp)
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters
    from bridge_helpers import ksample, pack_nodes
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_test_nodes import wan_conditioning
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    s = SHAPES[args.shape]
    dtype = torch.bfloat16 if s["dtype"] == "bf16" else torch.float32
    draw = "cuda" if args.device == "cuda" else "cpu"
    receiver = load_random_wan(s["dim"], s["ffn"], s["layers"], 1, draw, dtype)
    sharer = load_random_wan(s["dim"], s["ffn"], s["layers"], 2, draw, dtype)
    nodes = pack_nodes()
    pos, neg = wan_conditioning(1), wan_conditioning(2)                   # equal lengths: batched CFG
    latent = {"samples": torch.zeros(1, *s["latent"])}
    proj = nodes.CreateC2CProjector.execute(sharer, receiver, "weighted", "identity", "all", alpha=0.5, hidden_dim=0,
                                            seed=0).args[0]

    def compiled(model):
        m = model.clone()
        set_torch_compile_wrapper(m, backend=args.backend)
        return m

    def bridged(model):
        source = nodes.CaptureKVCache.execute(sharer, wan_conditioning(3), wan_conditioning(4)).args[0]
        return nodes.FuseCaches.execute(model, source, proj, 1.0, 0.0, 1.0, "constant", "").args[0]

    models = {"stock, eager": receiver, "bridged, eager": bridged(receiver),
              "stock, compiled": compiled(receiver), "bridged, compiled": bridged(compiled(receiver))}

    def sample(model):
        out = ksample(model, pos, neg, cfg=4.0, steps=args.steps, latent=latent)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return out

    warm = {}
    for name, model in models.items():
        if "compiled" in name:
            start = time.perf_counter()
            sample(model)
            warm[name] = time.perf_counter() - start
            print(f"  {name}: first run (compiles) {warm[name]:.1f} s", flush=True)
    times = {name: [] for name in models}
    walls = {name: [] for name in models}
    counters.clear()
    for r in range(args.repeats):
        for name, model in models.items():
            start, cpu = time.perf_counter(), time.process_time()
            sample(model)
            walls[name].append(time.perf_counter() - start)
            times[name].append(time.process_time() - cpu if args.device == "cpu" else walls[name][-1])
            print(f"  repeat {r + 1}/{args.repeats}: {name}: {times[name][-1]:.3f} s ({walls[name][-1]:.3f} s wall)",
                  flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    timed_breaks = sum(counters["graph_break"].values())
    timed_compiles = counters["stats"]["unique_graphs"]
    result = {"shape": args.shape, "device": args.device, "backend": args.backend, "steps": args.steps,
              "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
              "clock": "cpu" if args.device == "cpu" else "wall", "seconds": med, "all": times, "wall_all": walls,
              "first_run_seconds": warm,
              "graph_breaks_in_timed_runs": timed_breaks, "compiles_in_timed_runs": timed_compiles,
              "ratios": {"compiled / eager, stock": med["stock, compiled"] / med["stock, eager"],
                         "compiled / eager, bridged": med["bridged, compiled"] / med["bridged, eager"],
                         "bridged / stock, eager": med["bridged, eager"] / med["stock, eager"],
                         "bridged / stock, compiled": med["bridged, compiled"] / med["stock, compiled"]}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("seconds", "ratios", "graph_breaks_in_timed_runs",
                                             "compiles_in_timed_runs")}, indent=1))


if __name__ == "__main__":
    main()
