#!/usr/bin/env python
"""The refresh frontier (issue 19): how much of the bridge's gain each way of running the sharer keeps, at what cost.

    python experiments/run_refresh.py                 # REFRESH.md and REFRESH.png (all three miniatures)
    python experiments/run_refresh.py --pairs rule --merge            # one pair again, keeping the others
    python experiments/run_refresh.py --only budget,default --merge   # only the rows whose name holds a word
    python experiments/run_refresh.py --dry-run       # seconds-long check that the script runs (tests)

Three miniatures (experiments/refresh_miniatures.py): *still*, the evidence experiment's pair, whose sharer
knowledge (the first frame) is fixed before sampling starts; *denoise*, a weak receiver and a sharer that
knows the data, restoring videos from partial noise; and *rule*, a sharer that knows a rule tying channels 8-15
of the sample to channels 0-7, generating freely with euler_ancestral: what it adds depends on what the sample
has become, so fresh K/V matter. The pairs are trained once into experiments/out/refresh/ and reused.

Every schedule samples the same held-out videos with the same noise through the real bridge (a live sharer,
Fuse Caches, the stock KSampler, 12 steps, cfg 1, euler (rule: euler_ancestral); denoise 0.6 for the denoise
pair), and is scored by the miniature's quality (dB) and
by the share of refresh-1's gain it keeps: (schedule − receiver) / (refresh 1 − receiver). Cost: sharer
forwards (from the bridge's own refresh report), the CPU-time ratio to the plain receiver measured here, and
the time ratio the same schedule would have at the CPU benchmark's shape (benchmarks/bench_bridge.py: a
line through its measured refresh-policy rows; ``--bench``).

Schedules: refresh every k; the best fixed placement of N sharer forwards (searched on a validation split,
scored on the test split); adaptive (RefreshPolicy mode adaptive) at several thresholds for each signal;
budget N for each signal; fusion windows; the step-switch baseline (the sharer alone for the first s steps,
then the receiver, without fusion and with it).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import miniature as mini  # noqa: E402
import refresh_miniatures as rm  # noqa: E402

STEPS = 12
SIGNALS = ("input", "magnitude", "sigma")
# Spaced to reach N = 2 .. 8 forwards: over the 12 steps the three signals add up to about 1.07 (input), 0.81
# (magnitude) and 0.78 (sigma), and each grows toward the end of the schedule (measured on both receivers).
THRESHOLDS = {"input": (0.08, 0.15, 0.25, 0.4, 0.6), "magnitude": (0.07, 0.12, 0.2, 0.3, 0.45),
              "sigma": (0.06, 0.11, 0.18, 0.28, 0.4)}
BUDGETS = (2, 3, 4)
EVERY = (2, 3, 4, 6, 12)
SEARCH_EXHAUSTIVE = 2          # placements of up to this many forwards are searched exhaustively, more greedily
SEARCH_GREEDY = (3, 4)
WINDOWS = ((0.0, 0.25), (0.0, 0.5), (0.5, 1.0))
SWITCH = (3, 6)


@dataclass(frozen=True)
class Schedule:
    """One way to run a sampling run of the pair."""
    name: str
    family: str                    # reference | every | placement | adaptive | budget | window | switch
    policy: dict | None = None     # RefreshPolicy fields (c2c_core.refresh)
    steps: tuple | None = None     # a fixed placement: the schedule steps at which the sharer runs
    window: tuple = (0.0, 1.0)     # fusion window (sigma percent)
    switch: int = 0                # the sharer alone for the first ``switch`` steps, then the receiver
    fused: bool = True             # switch: the receiver's steps fuse the sharer's K/V (one forward at the switch)
    model: str = "bridged"         # bridged | receiver | sharer


REFERENCES = (Schedule("receiver alone", "reference", model="receiver"),
              Schedule("sharer alone", "reference", model="sharer"),
              Schedule("refresh 1", "reference", policy={"mode": "every", "every": 1}))


def plan(signals=SIGNALS, thresholds=THRESHOLDS, budgets=BUDGETS, every=EVERY, windows=WINDOWS,
         switch=SWITCH, steps=STEPS) -> list[Schedule]:
    """The test-split schedules other than the placements (those come from the search)."""
    out = list(REFERENCES)
    out += [Schedule(f"every {k}", "every", {"mode": "every", "every": k}) for k in every]
    for signal in signals:
        out += [Schedule(f"adaptive {signal} {t:g}", "adaptive",
                         {"mode": "adaptive", "signal": signal, "threshold": t, "max_reuse": steps})
                for t in thresholds[signal]]
        out.append(Schedule(f"adaptive {signal}, default guard", "adaptive", {"mode": "adaptive", "signal": signal}))
        out += [Schedule(f"budget {n} {signal}", "budget", {"mode": "budget", "signal": signal, "budget": n})
                for n in budgets]
    out += [Schedule(f"window {a:g}-{b:g}", "window", {"mode": "every", "every": 1}, window=(a, b))
            for a, b in windows]
    for s in switch:
        out.append(Schedule(f"switch at {s}", "switch", switch=s, fused=False))
        out.append(Schedule(f"switch at {s} + fusion", "switch", {"mode": "every", "every": steps}, switch=s))
    return out


# ------------------------------------------------------------------------------------------------
# One miniature: its pair, data and a sampler for any schedule
# ------------------------------------------------------------------------------------------------
class Miniature:
    """A pair, its bundle and its data; ``paths`` from ``refresh_miniatures.prepare`` (trained), or None for the
    dry run's untrained tiny models and projector."""

    def __init__(self, name: str, paths: dict | None, args):
        import torch
        self.torch, self.name, self.args = torch, name, args
        try:
            _, self.nodes = mini.setup()
        except RuntimeError:        # ComfyUI already booted here with other settings (the tests' host): use it
            import importlib
            self.nodes = importlib.import_module("dit_cache_bridge.nodes")
        import comfy.sd
        from c2c_core import load_bundle
        if paths is None:
            receiver, sharer = (mini.tiny_model_path(n) for n in rm.STARTS[name])
        else:
            receiver, sharer = paths["receiver"], paths["sharer"]
        self.receiver = mini.with_shift(comfy.sd.load_diffusion_model(str(receiver)))
        self.sharer = mini.with_shift(comfy.sd.load_diffusion_model(str(sharer)))
        if paths is None:
            with torch.inference_mode(False):
                kind = rm.settings_for(name).kinds[0]       # the pair's projector kind, untrained
                self.bundle = self.nodes.CreateC2CProjector.execute(self.sharer, self.receiver, kind, "identity",
                                                                    "all", 0.5, 32, 0).args[0]
        else:
            self.bundle = load_bundle(paths["projector"])
        self.texts = mini.text_embeddings(0)
        self.splits = {split: (rm.data(name, videos), classes) for split, (videos, classes) in
                       (("val", mini.make_videos(args.val_videos, 2)), ("test", mini.make_videos(args.test_videos, 3)))}
        self.peak = float(self.splits["test"][0].max() - self.splits["test"][0].min())

    def conds(self, split: str, sl: slice) -> dict:
        videos, classes = self.splits[split]
        latents = self.receiver.model.process_latent_out(videos[sl])
        return rm.CONDITIONER[self.name](latents, classes[sl], self.texts)

    def bridged(self, schedule: Schedule, conds: dict):
        from c2c_core.refresh import RefreshPolicy
        from dit_cache_bridge.c2c_comfy import compat
        from dit_cache_bridge.c2c_comfy.live import LiveSharer
        policy = RefreshPolicy(**(schedule.policy or {"mode": "every", "every": self.args.steps}))
        source = LiveSharer(model=self.sharer, positive=conds["sharer_positive"], negative=conds["sharer_negative"],
                            signature=compat.wan_signature(self.sharer), refresh=policy)
        model = self.nodes.FuseCaches.execute(self.receiver, source, self.bundle, 1.0, schedule.window[0],
                                              schedule.window[1], "constant", "").args[0]
        bridge = bridge_of(model)
        if schedule.steps is not None:
            bridge.tracker = FixedSteps(schedule.steps, self.args.steps)
        return model, bridge

    def run(self, schedule: Schedule, split: str) -> dict:
        """Sample ``split`` under ``schedule``: per-video quality, sharer forwards per batch, CPU seconds."""
        import nodes as comfy_nodes
        torch, total = self.torch, self.args.steps
        videos, classes = self.splits[split]
        quality, forwards, steps_run, seconds = [], [], [], 0.0
        for start in range(0, videos.shape[0], self.args.batch):
            sl = slice(start, start + self.args.batch)
            conds = self.conds(split, sl)
            rp, rn, sp, sn = (conds[k] for k in ("receiver_positive", "receiver_negative", "sharer_positive",
                                                  "sharer_negative"))
            denoise = rm.DENOISE[self.name]
            if denoise < 1.0:           # restore the true video from partial noise (the sampler adds the noise)
                latent = {"samples": self.receiver.model.process_latent_out(videos[sl]).clone()}
            else:
                latent = {"samples": torch.zeros(videos[sl].shape[0], mini.CHANNELS, mini.FRAMES, mini.SIZE, mini.SIZE)}
            ks, sampler = dict(denoise=denoise), rm.SAMPLER[self.name]
            seed = 5000 + start + (0 if split == "test" else 100_000)
            clock = time.process_time()
            with torch.inference_mode():
                if schedule.model != "bridged":
                    model = self.receiver if schedule.model == "receiver" else self.sharer
                    pos, neg = (rp, rn) if schedule.model == "receiver" else (sp, sn)
                    (out,) = comfy_nodes.common_ksampler(model, seed, total, 1.0, sampler, "simple", pos, neg, latent,
                                                         **ks)
                    bridge = None
                elif schedule.switch:
                    (mid,) = comfy_nodes.common_ksampler(self.sharer, seed, total, 1.0, sampler, "simple", sp, sn,
                                                         latent, start_step=0, last_step=schedule.switch,
                                                         force_full_denoise=False, **ks)
                    model, bridge = self.bridged(schedule, conds) if schedule.fused else (self.receiver, None)
                    (out,) = comfy_nodes.common_ksampler(model, seed, total, 1.0, sampler, "simple", rp, rn, mid,
                                                         disable_noise=True, start_step=schedule.switch,
                                                         last_step=total, force_full_denoise=True, **ks)
                else:
                    model, bridge = self.bridged(schedule, conds)
                    (out,) = comfy_nodes.common_ksampler(model, seed, total, 1.0, sampler, "simple", rp, rn, latent,
                                                         **ks)
            seconds += time.process_time() - clock
            sampled = self.receiver.model.process_latent_in(out["samples"])
            quality += rm.quality(self.name, sampled, videos[sl], classes[sl], self.peak).tolist()
            ran = list(bridge.tracker.report().sharer_steps) if bridge is not None else []
            steps_run.append(ran)
            forwards.append(len(ran) + schedule.switch)
        return {"quality": quality, "forwards": forwards, "sharer_steps": steps_run, "cpu_seconds": seconds}


def bridge_of(model):
    """The Bridge object behind a Fuse Caches clone (its outer-sample wrapper's owner): its ``tracker`` decides."""
    wrappers = model.wrappers["outer_sample"]
    key = next(k for k in wrappers if k.startswith("dit_cache_bridge"))
    return wrappers[key][0].__self__


def FixedSteps(steps, total: int):
    """A RefreshTracker that runs the sharer exactly at ``steps`` (and, as every tracker, at a run's first step)."""
    from c2c_core.refresh import RefreshPolicy, RefreshTracker

    class Fixed(RefreshTracker):
        def _should_run(self, step, sigma, signal):
            return self._last_run_step is None or step in self.steps
    tracker = Fixed(RefreshPolicy(mode="every", every=total))
    tracker.steps = frozenset(steps)
    return tracker


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------
def mean(values):
    return statistics.fmean(values)


def gain_kept(run: dict, receiver: dict, full: dict) -> tuple[float, float]:
    """Share of refresh 1's gain kept, and its standard error over videos (paired differences)."""
    gain = mean(full["quality"]) - mean(receiver["quality"])
    diffs = [(q - r) / gain for q, r in zip(run["quality"], receiver["quality"])]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
    return mean(diffs), se


def search_placements(m: Miniature, log) -> dict:
    """Best fixed placement of N sharer forwards on the validation split: {N: (steps, gain kept on val)}."""
    receiver, total = m.run(REFERENCES[0], "val"), m.args.steps
    full = m.run(REFERENCES[2], "val")
    scored = {}

    def score(steps):
        steps = tuple(sorted(steps))
        if steps not in scored:
            run = m.run(Schedule("placement", "placement", steps=steps), "val")
            scored[steps] = gain_kept(run, receiver, full)[0]
        return scored[steps]
    best = {1: ((0,), score((0,)))}
    for n in range(2, m.args.exhaustive + 1):
        candidates = [(0, *rest) for rest in itertools.combinations(range(1, total), n - 1)]
        steps = max(candidates, key=score)
        best[n] = (steps, score(steps))
        log(f"[{m.name}] best placement of {n} on val: {steps} ({100 * best[n][1]:.1f} %, {len(candidates)} tried)")
    for n in m.args.greedy:
        steps = best[max(best)][0]
        while len(steps) < n:
            steps = max((tuple(sorted((*steps, s))) for s in range(1, total) if s not in steps), key=score)
        best[n] = (steps, score(steps))
        log(f"[{m.name}] greedy placement of {n} on val: {steps} ({100 * best[n][1]:.1f} %)")
    return {n: {"steps": list(s), "val_gain_kept": g} for n, (s, g) in best.items()}


# ------------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------------
def run_pair(name: str, args, log) -> dict:
    import torch
    torch.set_num_threads(1)
    paths = None if args.dry_run else rm.prepare(name, args.out, rm.settings_for(name), log=log)
    m = Miniature(name, paths, args)
    started = time.monotonic()
    schedules = plan(**args.plan, steps=args.steps)
    if args.only:       # rerun some rows of an earlier run of this pair; keep the rest (and its placements)
        kept = earlier_pair(args, name)
        placements, runs = kept["placements"], dict(kept["runs"])
        schedules = [REFERENCES[0], *(s for s in schedules if any(word in s.name for word in args.only))]
    else:
        placements, runs = search_placements(m, log), {}
        schedules += [Schedule(f"best placement of {n}", "placement", steps=tuple(p["steps"]))
                      for n, p in placements.items()]
    for schedule in schedules:
        runs[schedule.name] = {"schedule": asdict(schedule), **m.run(schedule, "test")}
        log(f"[{name}] {schedule.name}: quality {mean(runs[schedule.name]['quality']):.2f} dB, sharer forwards "
            f"{mean(runs[schedule.name]['forwards']):.1f}, {runs[schedule.name]['cpu_seconds']:.1f} s CPU")
    again = m.run(REFERENCES[0], "test")         # the receiver once more: CPU time drifts with the machine's load
    receiver_cpu = statistics.median([runs["receiver alone"]["cpu_seconds"], again["cpu_seconds"]])
    receiver, full = runs["receiver alone"], runs["refresh 1"]
    for schedule in schedules:                   # rows kept from an earlier run keep their CPU ratio
        runs[schedule.name]["cpu_ratio"] = runs[schedule.name]["cpu_seconds"] / receiver_cpu
    for run in runs.values():
        run["mean_quality"] = mean(run["quality"])
        run["gain_kept"], run["gain_se"] = gain_kept(run, receiver, full)
        run["mean_forwards"] = mean(run["forwards"])
    seconds = time.monotonic() - started
    if args.only:
        return {**kept, "runs": runs, "seconds": kept["seconds"] + seconds,
                "reruns": [*kept.get("reruns", []), {"command": args.command, "rows": [s.name for s in schedules]}]}
    return {"pair": name, "placements": placements, "runs": runs, "receiver_cpu": receiver_cpu, "seconds": seconds}


def earlier_pair(args, name: str) -> dict:
    """``name``'s results in the saved run (<out>/refresh.json), which ``--only`` updates."""
    saved = results_file(args)
    pairs = json.loads(saved.read_text())["pairs"] if saved.is_file() else []
    found = [p for p in pairs if p["pair"] == name]
    if not found:
        raise SystemExit(f"--only reruns rows of an earlier run, but {saved} has no results for '{name}': "
                         f"run `python experiments/run_refresh.py --pairs {name} --merge` first")
    return found[0]


def results_file(args) -> Path:
    return args.out / ("dry_run.json" if args.dry_run else "refresh.json")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default=",".join(rm.PAIRS))
    p.add_argument("--test-videos", type=int, default=32)
    p.add_argument("--val-videos", type=int, default=16)
    p.add_argument("--batch", type=int, default=32, help="videos per sampling run (one refresh decision per run)")
    p.add_argument("--out", type=Path, default=HERE / "out" / "refresh")
    p.add_argument("--results", type=Path, default=HERE / "REFRESH.md")
    p.add_argument("--bench", type=Path, default=HERE.parent / "out" / "bench" / "bench_bridge.json",
                   help="bench_bridge.py's JSON for the time ratio at its shape (column empty when absent; "
                        "refresh_report.py redoes the report with it later)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="one process per miniature")
    p.add_argument("--merge", action="store_true",
                   help="keep the pairs not run now from <out>/refresh.json (each pair's report names its command)")
    p.add_argument("--only", default="",
                   help="comma-separated words: rerun only the schedules whose name holds one (e.g. budget,default) "
                        "and keep the pair's other rows from <out>/refresh.json (implies --merge)")
    p.add_argument("--dry-run", action="store_true",
                   help="untrained tiny pairs, 2 videos, a handful of schedules: checks that the script runs "
                        "(seconds); numbers meaningless")
    args = p.parse_args(argv)
    args.command = " ".join(["python experiments/run_refresh.py", *(sys.argv[1:] if argv is None else argv)])
    args.steps, args.exhaustive, args.greedy, args.plan = STEPS, SEARCH_EXHAUSTIVE, SEARCH_GREEDY, {}
    args.only = [word for word in args.only.split(",") if word]
    args.merge = args.merge or bool(args.only)
    if args.dry_run:
        args.test_videos = args.val_videos = args.batch = 2
        args.steps, args.exhaustive, args.greedy = 4, 2, (3,)
        args.plan = dict(signals=("input",), thresholds={"input": (0.2,)}, budgets=(2,), every=(2,),
                         windows=((0.5, 1.0),), switch=(2,))
        args.workers = 1
    started = time.monotonic()
    pairs = args.pairs.split(",")
    for name in pairs if args.only else ():
        earlier_pair(args, name)                # before any work: each pair has rows to keep
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.workers > 1 and len(pairs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(args.workers, len(pairs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_worker, pairs, [args] * len(pairs)))
    else:
        results = [run_pair(name, args, log) for name in pairs]
    wall = time.monotonic() - started
    for result in results:
        result.setdefault("command", args.command)      # a pair with rows rerun (--only) keeps its own command
    saved = results_file(args)
    if args.merge and saved.is_file():
        kept = json.loads(saved.read_text())
        ran = {r["pair"] for r in results}
        results = [r for r in kept["pairs"] if r["pair"] not in ran] + results
        results.sort(key=lambda r: rm.PAIRS.index(r["pair"]) if r["pair"] in rm.PAIRS else len(rm.PAIRS))
        wall += kept["wall_seconds"]
    data = {"command": args.command, "wall_seconds": wall, "dry_run": args.dry_run, "pairs": results,
            "test_videos": args.test_videos, "val_videos": args.val_videos,
            "batch": args.batch, "steps": args.steps}
    args.out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(data, indent=1))
    import refresh_report
    bench = json.loads(args.bench.read_text()) if args.bench.is_file() else None
    args.results.write_text(refresh_report.report(data, bench), encoding="utf-8")
    if not args.dry_run:
        refresh_report.plot(data, bench, args.results.with_suffix(".png"))
    print(f"wrote {args.results} in {wall / 60:.1f} min")
    return data


def _worker(name, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return run_pair(name, args, lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
