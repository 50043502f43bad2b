"""A bridged run against its floor, memory against the number of fused layers, and projector cost.

One command, ratios side by side in one process (results and caveats: BENCHMARKS.md):

    .venv/bin/python benchmarks/bench_bridge.py                      # CPU, issue-10 config
    python benchmarks/bench_bridge.py --shape wan1.3b --device cuda  # the same runs at Wan2.1-1.3B shape
    .venv/bin/python benchmarks/bench_bridge.py --shape smoke        # seconds: the script runs (tests/benchmarks)

Both models are random-weight Wan2.1 models at the chosen shape, written once as safetensors and
loaded with ComfyUI's own loader; every run is the stock KSampler code path on a Fuse Caches clone
(the real runtime: c2c_comfy). Timing (:func:`interleaved`): one untimed warm-up round of every run kind
(``--warmup``), then ``--repeats`` rounds with every kind once per round, the order rotated by one each
round. Each ratio is taken per round against the runs of the same round (:func:`paired`) and reported
as the median with its min–max over rounds: load drift moves a whole round alike, and the spread is
the noise left.

On CPU the script times with one torch thread and the process's CPU time by default (``--threads``,
``--clock``): on a machine whose cores other processes share, OpenMP's threads wait for each other
at every op (a small linear went from 0.9 ms to 18 ms with 2 threads on 2 busy cores) and wall time
tracks the neighbours' load; one thread's CPU time tracks the work. Wall time is recorded too.

Ratios (issue 10): lockstep live ÷ (receiver alone + sharer alone) per projector type; replay of a
recording ÷ receiver alone; recording ÷ sharer alone. Refresh policies (issue 19, ``--policies``):
every k, adaptive and budget rows with the weighted and the c2c projector, the sharer's projected K/V
cached while reused, with the sharer forwards each row ran. Then peak captured K/V and time per step
against the number of fused layers per mode (a PNG; every mode's K/V measured in its run, refresh
every 4 over a whole 4-step cycle), the projector cost per type as a fraction of one transformer
block, where the c2c projector stands against lockstep ≤ 1.15 × (R + S) at each shape
(:func:`c2c_standing`), and whether Wan2.1-14B fits an 80 GB card, by arithmetic.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_setup import GB, ROOT, setup_host, wan_model, wan_params

SHAPES = {
    # issue 10's CPU config: dim 1024 (8 heads), 8 layers, ffn 4096, latent 16x4x32x32 (1,024 tokens)
    "cpu": dict(dim=1024, ffn=4096, layers=8, latent=(16, 4, 32, 32), dtype="fp32"),
    # Wan2.1-T2V-1.3B: dim 1536 (12 heads), 30 layers, ffn 8960; 480p 81 frames = 21x60x104 latent (32,760 tokens)
    "wan1.3b": dict(dim=1536, ffn=8960, layers=30, latent=(16, 21, 60, 104), dtype="bf16", record_layers=8),
    # a seconds-long check that the script runs
    "smoke": dict(dim=256, ffn=512, layers=2, latent=(16, 2, 8, 8), dtype="fp32"),
}
WAN14B = dict(dim=5120, ffn=13824, layers=40)


# -- host and models ----------------------------------------------------------------------------
def write_wan(path: Path, dim: int, ffn: int, layers: int, seed: int, dtype: str) -> Path:
    """A random-weight Wan2.1 T2V model at this shape, in ComfyUI's key layout (the tiny models' init)."""
    import torch
    from safetensors.torch import save_file
    import make_tiny_models as mtm
    model = wan_model(dim, ffn, layers, "cpu", torch.float32)
    mtm.initialise(model, seed)
    target = torch.bfloat16 if dtype == "bf16" else torch.float32
    save_file({k: v.detach().to(target).contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# -- the bench ----------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, tmp: Path):
        import torch
        from bridge_helpers import load_model, pack_nodes
        from comfy_test_nodes import wan_conditioning
        self.torch, self.args, self.shape = torch, args, SHAPES[args.shape]
        self.nodes = pack_nodes()
        s = self.shape
        print(f"writing two random {args.shape} Wan models ({s['dim']} dim, {s['layers']} layers) ...", flush=True)
        shape = (s["dim"], s["ffn"], s["layers"])
        self.receiver = load_model(write_wan(tmp / "receiver.safetensors", *shape, 1, s["dtype"]))
        self.sharer = load_model(write_wan(tmp / "sharer.safetensors", *shape, 2, s["dtype"]))
        self.pos, self.neg = wan_conditioning(1), wan_conditioning(2)          # equal lengths: batched CFG
        self.sharer_pos, self.sharer_neg = wan_conditioning(3), wan_conditioning(4)
        self.latent = {"samples": torch.zeros(1, *s["latent"])}
        self.tokens = s["latent"][1] * (s["latent"][2] // 2) * (s["latent"][3] // 2)
        self.cuda = args.device == "cuda"
        self.clock = args.clock

    def projector(self, kind, layers="all", hidden=0):
        """Create C2C Projector's output (untrained); ``hidden`` 0 keeps the kind's default hidden width."""
        return self.nodes.CreateC2CProjector.execute(self.sharer, self.receiver, kind, "identity", layers, alpha=0.5,
                                                     hidden_dim=hidden, seed=0).args[0]

    def live(self, proj, streaming=True, refresh=1, policy=None):
        """A Fuse Caches clone over a live sharer; ``policy`` (a RefreshPolicy) or ``refresh`` k says when it runs."""
        from c2c_core.refresh import RefreshPolicy
        from dit_cache_bridge.c2c_comfy import compat
        from dit_cache_bridge.c2c_comfy.live import LiveSharer
        src = LiveSharer(model=self.sharer, positive=self.sharer_pos, negative=self.sharer_neg,
                         signature=compat.wan_signature(self.sharer), refresh=policy or RefreshPolicy(every=refresh),
                         streaming=streaming)
        return self.fuse(src, proj)

    def policy_models(self, projectors) -> dict:
        """Bridged clones for ``--policies``, with the weighted and the c2c projector: {row name: model}. The sharer's
        projected K/V are cached while reused (``FusionRun.sharer_part``), so a reused step costs the blend only."""
        wanted = [p for p in self.args.policies.split(",") if p and p != "none"]
        if not wanted:
            return {}
        return {f"refresh {policy_label(name)}, {kind}": self.live(projectors[kind], policy=parse_policy(name))
                for kind in ("weighted", "c2c") for name in wanted}

    def fuse(self, src, proj):
        return self.nodes.FuseCaches.execute(self.receiver, src, proj, 1.0, 0.0, 1.0, "constant", "").args[0]

    def record(self, cfg, layers, steps):
        from dit_cache_bridge.c2c_comfy import compat, recorded
        sig = compat.wan_signature(self.sharer)
        rec = recorded.record("Record KV Cache", self.sharer, self.sharer_pos, self.sharer_neg, tuple(layers),
                              self.latent, 7, steps, cfg, "euler", "simple", 1.0, "bf16", "ram", sig)
        return recorded.RecordedSharer(rec, sig, tuple(layers), node="Record KV Cache")

    def sample(self, model, cfg, steps):
        from bridge_helpers import ksample
        return ksample(model, self.pos, self.neg, cfg=cfg, steps=steps, latent=self.latent)

    def timed(self, fn, wall_too=False):
        """(seconds on the chosen clock, peak device bytes or None) of one call; with wall_too, wall seconds too."""
        torch = self.torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        out = (cpu if self.clock == "cpu" else wall, torch.cuda.max_memory_allocated() if self.cuda else None)
        return (*out, wall) if wall_too else out


def parse_policy(name: str):
    """``every4`` / ``adaptive`` / ``adaptive@0.1`` / ``budget3`` -> a RefreshPolicy (c2c_core.refresh)."""
    from c2c_core.refresh import RefreshPolicy
    if name.startswith("every"):
        return RefreshPolicy(mode="every", every=int(name[5:]))
    if name.startswith("adaptive"):
        return RefreshPolicy(mode="adaptive", **({"threshold": float(name[9:])} if "@" in name else {}))
    if name.startswith("budget"):
        return RefreshPolicy(mode="budget", budget=int(name[6:]))
    raise SystemExit(f"--policies: {name!r} is not everyK, adaptive[@THRESHOLD] or budgetN")


def policy_label(name: str) -> str:
    """``every4`` -> ``every 4``, ``budget3`` -> ``budget 3``, ``adaptive@0.2`` -> ``adaptive 0.2``."""
    for mode in ("every", "budget", "adaptive"):
        if name.startswith(mode):
            rest = name[len(mode):].lstrip("@")
            return f"{mode} {rest}" if rest else mode
    return name


def report_of(patched):
    wrappers = patched.wrappers["outer_sample"]
    key = next(k for k in wrappers if k.startswith("dit_cache_bridge"))
    return wrappers[key][0].__self__.last_report


def interleaved(b: Bench, runs: dict, rounds: int, warmup: int = 1, label: str = "") -> dict:
    """Time every run of ``runs`` (name -> callable) once per round, all kinds in one round.

    ``warmup`` untimed rounds first (allocator, caches, lazy imports: the first run of a process is slower);
    the order rotates by one each round, so no kind always runs first or right after the same neighbour.
    Returns {name: {"seconds": [per round], "wall": [...], "peak": [...]}}, rounds in the order they ran.
    """
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    out = {name: {"seconds": [], "wall": [], "peak": []} for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, peak, wall = b.timed(runs[name], wall_too=True)
            out[name]["seconds"].append(seconds)
            out[name]["wall"].append(wall)
            out[name]["peak"].append(peak)
            print(f"  {label}round {r + 1}/{rounds}: {name}: {seconds:.2f} s {b.clock} ({wall:.2f} s wall)", flush=True)
    return out


def paired(times: dict, name: str, *over: str) -> dict:
    """Per-round ratio of ``name`` to the sum of ``over`` measured in the same round: median, min, max, all.

    Pairing within a round cancels the load drift that moves every run of that round alike; the spread of the
    per-round ratios is the noise left.
    """
    values = [t / sum(times[o]["seconds"][r] for o in over) for r, t in enumerate(times[name]["seconds"])]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def ratios(b: Bench, cfg: float, steps: int, repeats: int, warmup: int = 1) -> dict:
    """Seconds of each run kind, all kinds interleaved in every round (:func:`interleaved`), with paired ratios.

    Bridged clones are built once, before timing, and sampled again in every round, as ComfyUI reuses a
    Fuse Caches output when only the sampler's inputs change; the recording is timed anew every round.
    """
    projectors = {kind: b.projector(kind) for kind in ("weighted", "gating", "c2c")}
    recorded = b.shape.get("record_layers", b.shape["layers"])      # a 1.3B recording of all 30 layers is 120 GB
    replay = b.fuse(b.record(cfg, list(range(recorded)), steps), b.projector("weighted", f"0-{recorded - 1}"))
    models = {
        "lockstep, weighted": b.live(projectors["weighted"]),
        "lockstep, gating": b.live(projectors["gating"]),
        "lockstep, c2c": b.live(projectors["c2c"]),
        "buffered live, weighted": b.live(projectors["weighted"], streaming=False),
    }
    if b.args.c2c_hidden:
        models[f"lockstep, c2c hidden {b.args.c2c_hidden}"] = b.live(b.projector("c2c", hidden=b.args.c2c_hidden))
    models.update(b.policy_models(projectors))
    runs = {"receiver alone": lambda: b.sample(b.receiver, cfg, steps),
            "sharer alone": lambda: b.sample(b.sharer, cfg, steps)}
    for name, model in models.items():
        runs[name] = lambda model=model: b.sample(model, cfg, steps)
    runs[f"recording ({recorded} layers, bf16, RAM)"] = lambda: b.record(cfg, list(range(recorded)), steps)
    runs["replay, weighted"] = lambda: b.sample(replay, cfg, steps)
    skip = [word for word in b.args.skip.split(",") if word]
    runs = {name: fn for name, fn in runs.items() if name in ("receiver alone", "sharer alone")
            or not any(word in name for word in skip)}
    models = {name: model for name, model in models.items() if name in runs}
    times = interleaved(b, runs, repeats, warmup, f"cfg {cfg:g} ")
    forwards = {name: report_of(model).sharer_forwards for name, model in models.items()}
    return {"clock": b.clock, "rounds": repeats, "warmup_rounds": warmup, "times": times, "sharer_forwards": forwards,
            "seconds": {n: statistics.median(t["seconds"]) for n, t in times.items()},
            "peak_bytes": {n: (max(t["peak"]) if t["peak"][0] is not None else None) for n, t in times.items()},
            "per_receiver": {n: paired(times, n, "receiver alone") for n in times},
            "per_sharer": {n: paired(times, n, "sharer alone") for n in times},
            "per_both": {n: paired(times, n, "receiver alone", "sharer alone") for n in times}}


SWEEP_REFRESH = 4


def sweep(b: Bench, cfg: float, steps: int, repeats: int, warmup: int = 1) -> dict:
    """Time per step (median of ``repeats``, modes interleaved) and peak sharer K/V held against the number of
    fused layers (the first n), per mode.

    "refresh every 4" runs at least 4 steps (one whole refresh cycle) so that it reuses what it claims to;
    the other modes run ``steps``. Every mode's K/V is measured in the run: the live modes' from the run
    report, replay's from the replay reader (:func:`replay_kv_meter`).
    """
    from dit_cache_bridge.c2c_comfy import memory
    counts = sorted({1, 2, b.shape["layers"] // 2, b.shape["layers"]})
    mode_steps = {"buffered live": steps, "lockstep": steps, f"refresh every {SWEEP_REFRESH}":
                  max(steps, SWEEP_REFRESH), "replay": steps}
    out = {"fused_layers": counts, "clock": b.clock, "steps": mode_steps, "modes": {}}
    itemsize = 2 if b.shape["dtype"] == "bf16" else 4
    for mode in mode_steps:
        out["modes"][mode] = {"seconds_per_step": [], "captured_kv_bytes": [], "bank_bytes": [], "sharer_forwards": [],
                              "replay_host_bytes": []}
    for n in counts:
        proj = b.projector("weighted", f"0-{n - 1}")
        bank = memory.bank_bytes(proj.bank, itemsize)
        rec = b.record(cfg, list(range(n)), steps)
        models = {"buffered live": b.live(proj, streaming=False), "lockstep": b.live(proj),
                  f"refresh every {SWEEP_REFRESH}": b.live(proj, refresh=SWEEP_REFRESH), "replay": b.fuse(rec, proj)}
        with replay_kv_meter() as meter:
            times = interleaved(b, {mode: (lambda m=model, k=mode_steps[mode]: b.sample(m, cfg, k))
                                    for mode, model in models.items()}, repeats, warmup, f"{n} fused layers, ")
        for mode, model in models.items():
            seconds = statistics.median(times[mode]["seconds"])
            report = report_of(model)
            kv = meter.device_peak if mode == "replay" else report.peak_kv_bytes
            row = out["modes"][mode]
            row["seconds_per_step"].append(seconds / mode_steps[mode])
            row["captured_kv_bytes"].append(kv)
            row["bank_bytes"].append(bank)
            row["sharer_forwards"].append(report.sharer_forwards)
            row["replay_host_bytes"].append(meter.host_peak if mode == "replay" else None)
            print(f"  {n} fused layers, {mode}: {seconds / mode_steps[mode]:.2f} s/step over {mode_steps[mode]} "
                  f"steps, {report.sharer_forwards} sharer forwards, captured K/V {memory.gb(kv)}", flush=True)
    return out


class replay_kv_meter:
    """Measures what a replay holds while the block runs: the most recorded K/V handed to the receiver at once
    (one fused layer, every branch of the call: ``RecordedRun.kv``) and the most the replay reader keeps of
    the current step on the host (``ReplayReader``'s held tensors)."""

    def __enter__(self):
        from c2c_core.recording import ReplayReader
        from dit_cache_bridge.c2c_comfy.recorded import RecordedRun
        self.device_peak = self.host_peak = 0
        self.patched = [(RecordedRun, "kv", RecordedRun.kv), (ReplayReader, "get", ReplayReader.get)]
        meter, kv, get = self, RecordedRun.kv, ReplayReader.get

        def metered_kv(run, layer, call):
            k, v = kv(run, layer, call)
            meter.device_peak = max(meter.device_peak, k.numel() * k.element_size() + v.numel() * v.element_size())
            return k, v

        def metered_get(reader, slot, kind, layer):
            out = get(reader, slot, kind, layer)
            meter.host_peak = max(meter.host_peak, reader._held_bytes)
            return out
        RecordedRun.kv, ReplayReader.get = metered_kv, metered_get
        return self

    def __exit__(self, *exc):
        for cls, name, original in self.patched:
            setattr(cls, name, original)


def projector_cost(b: Bench, repeats: int) -> dict:
    """Seconds of one layer's K and V projection per type ÷ seconds of one transformer block (forward ÷ layers)."""
    torch = b.torch
    from c2c_core import ProjectorBank
    from dit_cache_bridge.c2c_comfy import compat
    dm = b.receiver.model.diffusion_model
    device = b.receiver.load_device
    dtype = b.receiver.model.get_dtype()
    import comfy.model_management as mm
    mm.load_models_gpu([b.receiver])
    x = torch.randn(2, *b.shape["latent"], device=device, dtype=dtype)
    t = torch.full((2,), 500.0, device=device, dtype=dtype)
    ctx = torch.cat([b.pos[0][0], b.neg[0][0]]).to(device=device, dtype=dtype)

    def median(fn):
        fn()
        return statistics.median(b.timed(fn)[0] for _ in range(repeats))
    with torch.no_grad():
        block = median(lambda: dm(x, t, ctx)) / b.shape["layers"]
        sig = compat.wan_signature(b.receiver)
        sk = torch.randn(2, b.tokens, sig.num_heads, sig.head_dim, device=device, dtype=dtype)
        rk = torch.randn_like(sk)
        out = {"block_seconds": block, "fraction_of_block": {}}
        for kind in ("identity", "weighted", "gating", "full", "c2c"):
            bank = ProjectorBank.build(kind, sig, sig, [0]).eval().to(device=device, dtype=dtype)
            seconds = median(lambda: (bank.project(0, "k", sk, rk), bank.project(0, "v", sk, rk)))
            out["fraction_of_block"][kind] = seconds / block
    return out


def fits_14b(card_gb: float = 80.0) -> dict:
    """Wan2.1-14B pair at 480p 81 frames, batched CFG, bf16: device bytes per mode, by arithmetic."""
    from dit_cache_bridge.c2c_comfy import memory
    from c2c_core import ProjectorBank
    from c2c_core import ModelSignature
    tokens = 21 * 30 * 52
    weights = wan_params(**WAN14B) * 2
    # ComfyUI's own activation estimate for Wan with flash/pytorch attention: area x dtype x 0.01 MB x factor 1.0
    activations = 2 * 21 * 60 * 104 * 2 * 0.01 * 1024 * 1024
    layer = memory.kv_layer_bytes(tokens, 40, 128, 2, 2)
    sig = ModelSignature(num_layers=40, num_heads=40, head_dim=128, name="wan14b")
    import torch
    with torch.device("meta"):
        c2c = ProjectorBank.build("c2c", sig, sig, list(range(40)))
    bank = memory.bank_bytes(c2c, 2)
    kept = memory.projected_bytes(c2c, range(40), tokens=tokens, chunks=2, itemsize=2)
    rows = {      # buffered: the sharer's forward runs nested in the receiver's first fused block (docs/memory.md)
        "receiver alone": weights + activations,
        "buffered live, 40 layers": 2 * weights + 2 * activations + 40 * layer + bank,
        "buffered live, 40 layers, K/V reused": 2 * weights + 2 * activations + 40 * layer + bank + kept,
        "lockstep live, 40 layers": 2 * weights + 2 * activations + layer + bank,
        "recorded: recording (sharer alone)": weights + activations,
        "recorded: replay (receiver alone)": weights + activations + layer + bank,
    }
    recording = memory.recording_bytes(steps=20, chunks=2, layers=40, tokens=tokens, heads=40, head_dim=128,
                                       storage_dtype="bf16")
    return {"card_gb": card_gb, "weights_gb": weights / GB, "activations_gb": activations / GB,
            "kv_layer_gb": layer / GB, "c2c_bank_gb": bank / GB, "recording_40_layers_20_steps_gb": recording / GB,
            "modes_gb": {k: v / GB for k, v in rows.items()},
            "fits": {k: v / GB <= card_gb for k, v in rows.items()}}


def plot(sweep_out: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    n = sweep_out["fused_layers"]
    styles = ("o-", "s--", "^:", "D-.")
    for style, (mode, row) in zip(styles, sweep_out["modes"].items()):
        ax1.plot(n, row["seconds_per_step"], style, label=mode, alpha=0.8)
        ax2.plot(n, [(kv + bank) / 1024 ** 2 for kv, bank in zip(row["captured_kv_bytes"], row["bank_bytes"])],
                 style, label=mode, alpha=0.8)
    ax1.set(xlabel="fused layers", ylabel=f"{sweep_out['clock']} seconds per step", title="time per step")
    ax2.set(xlabel="fused layers", ylabel="MB", title="peak extra memory: sharer K/V held + projector bank")
    for ax in (ax1, ax2):
        ax.set_xticks(n)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(result: dict) -> str:
    """Median seconds and the paired per-round ratios: median [min–max] over rounds."""
    med = result["seconds"]

    def cell(r):
        return f"{r['median']:.2f} [{r['min']:.2f}–{r['max']:.2f}]"
    lines = [f"| run | sharer forwards | {result['clock']} seconds (median) | wall seconds (median) | "
             "÷ receiver alone, per round | ÷ sharer alone, per round | ÷ (receiver + sharer), per round |",
             "|---|---|---|---|---|---|---|"]
    for name, s in med.items():
        peak = result["peak_bytes"][name]
        forwards = result["sharer_forwards"].get(name, "")
        wall = statistics.median(result["times"][name]["wall"])
        lines.append(f"| {name} | {forwards} | {s:.2f}{'' if peak is None else f' ({peak / GB:.1f} GB peak)'} | "
                     f"{wall:.2f} | {cell(result['per_receiver'][name])} | {cell(result['per_sharer'][name])} | "
                     f"{cell(result['per_both'][name])} |")
    return "\n".join(lines)


# Shapes at which the c2c projector's cost is stated against issue 10's target (lockstep ≤ 1.15 × (R + S)).
# (text tokens: 8 in the CPU benchmark's stand-in prompts, umT5's 512 for the real shapes)
C2C_SHAPES = {"dim 512, 32 tokens (the earlier CPU runs)": dict(dim=512, ffn=2048, tokens=32, text=8),
              "dim 1024, 256 tokens (this CPU benchmark)": dict(dim=1024, ffn=4096, tokens=256, text=8),
              "Wan2.1-1.3B, 480p 81 frames": dict(dim=1536, ffn=8960, tokens=32760, text=512),
              "Wan2.1-14B, 480p 81 frames": dict(dim=5120, ffn=13824, tokens=32760, text=512)}


def c2c_split(shape: dict, hidden: int = 512, trunk: int = 2) -> tuple[float, float]:
    """(sharer side, per-call rest) of one layer's c2c K+V projection, each as a fraction of one Wan block, in
    multiply-adds per token. The sharer side (its in-projection, 2·d·h for K and V) is what a reused step
    takes from the cache; the rest (the receiver's in-projection, the trunk, the out-projection and the head
    weights) runs in every fused call. A Wan block: q, k, v, o (4·d²), cross-attention q, o (2·d²), FFN
    (2·d·ffn), attention over the image tokens (2·L·d) and the text (2·T·d). Matrix products only: the
    block's norms, modulation and RoPE are left out, so at small shapes this overstates the fractions."""
    d, ffn, tokens, text = shape["dim"], shape["ffn"], shape["tokens"], shape["text"]
    block = 6 * d * d + 2 * d * ffn + 2 * tokens * d + 2 * text * d
    sharer = 2 * d * hidden
    rest = 2 * (d * hidden + trunk * 2 * hidden * hidden + hidden * d + hidden * (d // 128))
    return sharer / block, rest / block


def c2c_standing(hidden: int = 512, trunk: int = 2) -> dict:
    """Where lockstep with a c2c projector stands against ≤ 1.15 × (receiver + sharer), by shape (arithmetic).

    With c of a block per fused layer (:func:`c2c_split`, both parts), lockstep over every layer costs about
    (1 + c / 2) × (receiver + sharer): a sharer block and a receiver block per fused layer, plus c. At dim
    512 the arithmetic gives 0.99 where 0.73 was measured; the measured fraction at the benchmark's own
    shape is printed beside it (``projector_cost``).
    """
    out = {}
    for name, sh in C2C_SHAPES.items():
        c = sum(c2c_split(sh, hidden, trunk))
        out[name] = {"fraction_of_block": c, "lockstep_per_both": 1 + c / 2, "meets_1_15": 1 + c / 2 <= 1.15}
    return out


def main(argv=None) -> dict:
    """Run the benchmark, print its tables, write the JSON and the plot; returns the results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cfg", type=float, nargs="+", default=[4.0, 1.0], help="4 = batched CFG, 1 = no negative pass")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds of every run kind before timing")
    ap.add_argument("--c2c-hidden", type=int, default=0,
                    help="also time lockstep with a c2c projector of this hidden width (0: only the default's)")
    ap.add_argument("--policies", default="every2,every4,adaptive,budget3",
                    help="refresh-policy rows (cached projections), comma-separated: everyK, adaptive[@THRESHOLD], "
                         "budgetN; 'none' for none")
    ap.add_argument("--skip", default="", help="leave out the runs whose name contains one of these comma-separated "
                                              "words (e.g. gating,buffered on a loaded machine)")
    ap.add_argument("--sweep-steps", type=int, default=2,
                    help="steps of each run in the fused-layers sweep (refresh every 4 runs at least 4)")
    ap.add_argument("--sweep-repeats", type=int, default=3, help="runs per point of the sweep (median)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    ap.add_argument("--threads", type=int,
                    help="torch CPU threads (0: torch's default, the default on CUDA); 1, the default on CPU, keeps "
                         "OpenMP from waiting on busy shared cores")
    ap.add_argument("--clock", choices=["cpu", "wall"],
                    help="what the ratios divide: process CPU time (the default on CPU) or wall time (on CUDA)")
    ap.add_argument("--latent", type=int, nargs=4, metavar=("C", "T", "H", "W"),
                    help="override the shape's latent (e.g. 16 2 16 16 on a loaded CPU)")
    ap.add_argument("--model", type=int, nargs=3, metavar=("DIM", "FFN", "LAYERS"),
                    help="override the shape's model (e.g. 512 2048 8 on a loaded CPU)")
    args = ap.parse_args(argv)
    args.clock = args.clock or ("wall" if args.device == "cuda" else "cpu")
    args.threads = (0 if args.device == "cuda" else 1) if args.threads is None else args.threads
    if args.latent:
        SHAPES[args.shape] = {**SHAPES[args.shape], "latent": tuple(args.latent)}
    if args.model:
        SHAPES[args.shape] = {**SHAPES[args.shape], "dim": args.model[0], "ffn": args.model[1],
                              "layers": args.model[2]}
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="c2c_bench_"))
    setup_host(args.device, tmp)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    b = Bench(args, tmp)
    started, started_cpu = time.perf_counter(), time.process_time()
    results = {"shape": args.shape, "model": [b.shape["dim"], b.shape["ffn"], b.shape["layers"]],
               "latent": list(b.shape["latent"]),
               "device": torch.cuda.get_device_name() if b.cuda else "cpu",
               "tokens": b.tokens, "steps": args.steps, "repeats": args.repeats, "ratios": {},
               "clock": args.clock, "torch_threads": torch.get_num_threads(), "nice": os.nice(0),
               "load_average_before": os.getloadavg()}
    for cfg in args.cfg:
        results["ratios"][str(cfg)] = ratios(b, cfg, args.steps, args.repeats, args.warmup)
    results["sweep"] = sweep(b, args.cfg[0], args.sweep_steps, args.sweep_repeats, args.warmup)
    results["projector_cost"] = projector_cost(b, max(3, args.repeats))
    results["c2c_standing"] = c2c_standing()
    results["wan14b_80gb"] = fits_14b()
    results["wall_seconds"] = time.perf_counter() - started
    results["cpu_seconds"] = time.process_time() - started_cpu
    results["load_average_after"] = os.getloadavg()
    (args.out / "bench_bridge.json").write_text(json.dumps(results, indent=1))
    plot(results["sweep"], args.out / "bench_bridge.png",
         f"dim {b.shape['dim']}, {b.shape['layers']} layers, {b.tokens} tokens on {results['device']}, "
         f"cfg {args.cfg[0]:g}, {args.sweep_steps} steps per run, median of {args.sweep_repeats}")

    print(f"\n{args.shape} shape, model (dim, ffn, layers) {tuple(results['model'])}, latent {b.shape['latent']}, "
          f"{b.tokens} tokens, {args.steps} euler steps, "
          f"median of {args.repeats}, on {results['device']} ({results['wall_seconds']:.0f} s wall, "
          f"{results['cpu_seconds']:.0f} s CPU); clock {args.clock}, {results['torch_threads']} torch thread(s), "
          f"nice {results['nice']}, load average {results['load_average_before']} before, "
          f"{results['load_average_after']} after")
    for cfg, result in results["ratios"].items():
        print(f"\ncfg {cfg} ({'batched cond + uncond' if float(cfg) != 1 else 'one chunk per call'})\n")
        print(table(result))
    sw = results["sweep"]
    print(f"\nfused layers {sw['fused_layers']}: captured K/V at peak (MB)")
    for mode, row in sw["modes"].items():
        print(f"  {mode} ({sw['steps'][mode]} steps, sharer forwards {row['sharer_forwards']}): "
              f"{[round(kv / 1024 ** 2, 2) for kv in row['captured_kv_bytes']]}, "
              f"s/step {[round(s, 2) for s in row['seconds_per_step']]}"
              + (f", replay reader's host copy {[round(h / 1024 ** 2, 2) for h in row['replay_host_bytes']]}"
                 if mode == "replay" else ""))
    pc = results["projector_cost"]
    print(f"\nprojector K+V cost as a fraction of one block ({pc['block_seconds'] * 1e3:.1f} ms): "
          + ", ".join(f"{k} {v:.3f}" for k, v in pc["fraction_of_block"].items()))
    print("\nc2c projector (hidden 512) against lockstep ≤ 1.15 × (receiver + sharer), by arithmetic:")
    for name, row in results["c2c_standing"].items():
        print(f"  {name}: {row['fraction_of_block']:.3f} of a block -> lockstep ≈ {row['lockstep_per_both']:.2f} × "
              f"(R + S), {'meets' if row['meets_1_15'] else 'misses'} 1.15")
    w = results["wan14b_80gb"]
    print(f"\nWan2.1-14B pair, 480p 81 frames, batched CFG, bf16 (arithmetic): weights {w['weights_gb']:.1f} GB "
          f"per model, activations {w['activations_gb']:.1f} GB, K/V {w['kv_layer_gb']:.2f} GB per layer, c2c bank "
          f"{w['c2c_bank_gb']:.2f} GB")
    for mode, gbs in w["modes_gb"].items():
        print(f"  {mode}: {gbs:.1f} GB -> {'fits' if w['fits'][mode] else 'does not fit'} on {w['card_gb']:.0f} GB")
    print(f"\nwrote {args.out / 'bench_bridge.json'} and {args.out / 'bench_bridge.png'}")
    return results


if __name__ == "__main__":
    main()
