"""REFRESH.md and REFRESH.png from run_refresh.py's results (kept apart so a report can be redone from the JSON:
``python experiments/refresh_report.py experiments/out/refresh/refresh.json``)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

MATCH_POINTS = 2.0          # adaptive "matches" the best fixed schedule at N when within this many points of gain
GOAL_GAIN, GOAL_RATIO = 0.95, 1.3


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def by_forwards(runs: dict, family: str, signal: str | None = None) -> dict:
    """{N: the run of ``family`` (and ``signal``) with the most gain among those averaging N sharer forwards}."""
    out = {}
    for name, run in runs.items():
        sch = run["schedule"]
        if sch["family"] != family or (signal and (sch["policy"] or {}).get("signal", "input") != signal):
            continue
        n = round(run["mean_forwards"])
        if n not in out or run["gain_kept"] > out[n][1]["gain_kept"]:
            out[n] = (name, run)
    return out


def fixed_best(runs: dict) -> dict:
    """{N: best fixed schedule on test among every-k and the validation-picked placements}."""
    best = {}
    for family in ("every", "placement"):
        for n, (name, run) in by_forwards(runs, family).items():
            if n not in best or run["gain_kept"] > best[n][1]["gain_kept"]:
                best[n] = (name, run)
    return best


def signals_of(runs: dict) -> list:
    return sorted({(r["schedule"]["policy"] or {}).get("signal", "input") for r in runs.values()
                   if r["schedule"]["family"] in ("adaptive", "budget")})


def compare(runs: dict) -> dict:
    """Per signal: adaptive and budget against the best fixed schedule at each N they reach."""
    fixed = fixed_best(runs)
    out = {}
    for signal in signals_of(runs):
        rows = {}
        for family in ("adaptive", "budget"):
            for n, (name, run) in by_forwards(runs, family, signal).items():
                if n in fixed:
                    rows.setdefault(n, {})[family] = (name, run["gain_kept"] - fixed[n][1]["gain_kept"])
        adaptive = [d for row in rows.values() if "adaptive" in row for d in [row["adaptive"][1]]]
        out[signal] = {"rows": rows, "adaptive_mean_gap": statistics.fmean(adaptive) if adaptive else None,
                       "adaptive_matches_everywhere": bool(adaptive) and all(100 * d >= -MATCH_POINTS for d in adaptive)}
    return out


def fuses(schedule: dict) -> bool:
    """A bridged run: the receiver fuses the sharer's K/V (not a model alone, not the switch without fusion)."""
    return schedule["model"] == "bridged" and (not schedule["switch"] or schedule["fused"])


POLICIES = ("every", "placement", "adaptive", "budget")


def cheapest_at_goal(runs: dict, key: str, families=None):
    """The run with the lowest ``key`` ratio among bridged runs keeping ≥ GOAL_GAIN of the gain (of ``families``)."""
    ok = [(run[key], name) for name, run in runs.items()
          if run.get(key) is not None and run["gain_kept"] >= GOAL_GAIN and fuses(run["schedule"])
          and (families is None or run["schedule"]["family"] in families)]
    return min(ok) if ok else None


def bench_ratios(bench: dict) -> dict:
    """The benchmark's CFG 1 rows (one chunk per call, as the miniature samples), else its first CFG setting's."""
    return bench["ratios"].get("1.0") or next(iter(bench["ratios"].values()))


def cost_line(bench: dict | None) -> dict | None:
    """A time ratio to the plain receiver as a line in the share of steps that run the sharer, fitted through
    the CPU benchmark's c2c refresh rows (every k and lockstep; cached sharer side), by least squares."""
    if not bench:
        return None
    ratios = bench_ratios(bench)
    steps = bench["steps"]
    points = []
    for name, r in ratios["per_receiver"].items():
        forwards = ratios["sharer_forwards"].get(name)
        if forwards is None or "c2c" not in name or "hidden" in name:
            continue
        points.append((forwards / steps, r["median"]))
    if len(points) < 2:
        return None
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return {"intercept": my - slope * mx, "slope": slope, "points": points,
            "shape": f"dim {bench['model'][0]}, {bench['model'][2]} layers, {bench['tokens']} tokens, "
                     f"{bench['steps']} steps, cfg {'1' if '1.0' in bench['ratios'] else next(iter(bench['ratios']))}"}


def modelled_ratio(line: dict | None, schedule, forwards: float, sharer_ratio: float, total: int) -> float | None:
    """The schedule's time ratio at the benchmark's shape: bridged steps on the line, switch steps at the sharer's
    cost (``sharer_ratio`` = sharer alone ÷ receiver alone there)."""
    if line is None:
        return None
    if schedule.model == "receiver":
        return 1.0
    if schedule.model == "sharer":
        return sharer_ratio
    if schedule.switch:
        tail = total - schedule.switch
        bridged = (line["intercept"] + line["slope"] * 1 / tail) if schedule.fused else 1.0
        return (schedule.switch * sharer_ratio + tail * bridged) / total
    inside = schedule.window[1] - schedule.window[0]
    return 1.0 + inside * (line["intercept"] - 1.0) + line["slope"] * forwards / total


def wan14b_line() -> dict:
    """The same line for a Wan2.1-14B pair at 480p 81 frames by arithmetic (bench_bridge.c2c_split): a reused
    step adds the c2c projector's per-call part in every layer, a step that runs the sharer adds a sharer
    forward (the same size as the receiver) and the projector's sharer side."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_bridge
    side, rest = bench_bridge.c2c_split(bench_bridge.C2C_SHAPES["Wan2.1-14B, 480p 81 frames"])
    return {"intercept": 1.0 + rest, "slope": 1.0 + side, "points": [], "shape": "Wan2.1-14B, arithmetic"}


def with_costs(data: dict, bench: dict | None) -> dict:
    """Each run's ``bench_ratio`` (None without a benchmark) and ``wan14b_ratio``; each pair's cost lines."""
    line, big = cost_line(bench), wan14b_line()
    sharer = bench_ratios(bench)["per_receiver"]["sharer alone"]["median"] if bench else 1.0
    for pair in data["pairs"]:
        pair["cost_line"], pair["wan14b_line"] = line, big
        for run in pair["runs"].values():
            sch = run["schedule"]
            schedule = SimpleNamespace(**{**sch, "window": tuple(sch["window"])})
            run["bench_ratio"] = modelled_ratio(line, schedule, run["mean_forwards"], sharer, data["steps"])
            run["wan14b_ratio"] = modelled_ratio(big, schedule, run["mean_forwards"], 1.0, data["steps"])
    return data


def report(data: dict, bench: dict | None = None) -> str:
    data = with_costs(data, bench)
    lines = ["# Refresh frontier: when to run the sharer (issue 19)", "",
             f"Generated by `{data['command']}` ({data['wall_seconds'] / 60:.1f} min wall on {os.cpu_count()} shared CPU "
             f"cores, {platform.machine()}; pairs in parallel, one torch thread each). Design and reading: "
             "`experiments/README.md` (Refresh frontier).", ""]
    if data["dry_run"]:
        lines += ["**Dry run: untrained tiny models, 2 videos; the numbers say nothing.**", ""]
    lines += [f"{data['test_videos']} held-out test videos per miniature (one noise seed each), sampled in runs of "
              f"{data['batch']} (one refresh decision per run, from the signal measured over the batch); placements "
              f"searched on {data['val_videos']} validation videos. 12 steps, cfg 1, euler (rule: euler_ancestral), "
              "the pair's trained projector (c2c; rule: full) fused into both layers at strength 1.", "",
              "Columns: *sharer forwards* per sampling run (the bridge's refresh report; switch rows add the sharer's "
              "own steps); *quality* (dB): still = first-frame PSNR, denoise = whole-video PSNR of the restored "
              "video, rule = the sample's rule SNR (channels 8-15 against the rule applied to channels 0-7); "
              "*gain kept* = (schedule − receiver) / (refresh 1 − receiver) per video, mean ± standard error; "
              "*CPU ratio*: the run's CPU time ÷ "
              "the receiver alone's, on this miniature (dim 256, 48 tokens: the projector weighs more than a block "
              "here); *bench ratio*: the same schedule's time ratio at the CPU benchmark's shape, from the line "
              "through its measured c2c refresh rows (BENCHMARKS.md); *14B ratio*: the same at Wan2.1-14B shape "
              "(480p 81 frames) by arithmetic (`bench_bridge.c2c_split`).", ""]
    for pair in data["pairs"]:
        runs = pair["runs"]
        line = pair["cost_line"]
        lines += [f"## {pair['pair']}", ""]
        if pair.get("command", data["command"]) != data["command"]:
            lines += [f"Run by `{pair['command']}`.", ""]
        for rerun in pair.get("reruns", []):
            lines += [f"Rows sampled again by `{rerun['command']}`: {', '.join(rerun['rows'])}.", ""]
        if line:
            lines += [f"Bench line ({line['shape']}): ratio = {line['intercept']:.3f} + {line['slope']:.3f} × (share "
                      f"of steps that run the sharer), through {len(line['points'])} measured rows.", ""]
        big = pair["wan14b_line"]
        lines += [f"Wan2.1-14B line (arithmetic): ratio = {big['intercept']:.3f} + {big['slope']:.3f} × (share of "
                  "steps that run the sharer).", ""]
        lines += ["| schedule | sharer forwards | sharer steps (first run) | quality (dB) | gain kept | CPU ratio | "
                  "bench ratio | 14B ratio |", "|---|---|---|---|---|---|---|---|"]
        for name, run in runs.items():
            steps = run["sharer_steps"][0] if run["sharer_steps"] and run["sharer_steps"][0] else []
            gain = "—" if name in ("receiver alone", "refresh 1") else \
                f"{_pct(run['gain_kept'])} ± {100 * run['gain_se']:.1f}"
            lines.append(f"| {name} | {run['mean_forwards']:.1f} | {steps} | {run['mean_quality']:.2f} | {gain} | "
                         f"{run['cpu_ratio']:.2f} | {_ratio(run['bench_ratio'])} | {_ratio(run['wan14b_ratio'])} |")
        lines += ["", "Best fixed placement per N (searched on validation): " + "; ".join(
            f"N={n}: steps {p['steps']} ({_pct(p['val_gain_kept'])} on val)" for n, p in pair["placements"].items()),
            ""]
        fixed = fixed_best(runs)
        cmp_ = compare(runs)
        lines += ["### Adaptive and budget against the best fixed schedule at the same N", "",
                  "| N | best fixed (test) | " + " | ".join(f"adaptive {s} | budget {s}" for s in cmp_) + " |",
                  "|---" * (2 + 2 * len(cmp_)) + "|"]
        for n in sorted(fixed):
            name, run = fixed[n]
            cells = []
            for s, c in cmp_.items():
                row = c["rows"].get(n, {})
                for family in ("adaptive", "budget"):
                    cells.append(f"{100 * row[family][1]:+.1f} pt ({row[family][0]})" if family in row else "—")
            lines.append(f"| {n} | {name}: {_pct(run['gain_kept'])} | " + " | ".join(cells) + " |")
        gaps = []
        for s, c in cmp_.items():
            gap = "—" if c["adaptive_mean_gap"] is None else f"{100 * c['adaptive_mean_gap']:+.1f} pt"
            within = "within" if c["adaptive_matches_everywhere"] else "not within"
            gaps.append(f"{s}: {gap} ({within} {MATCH_POINTS:g} pt at every N)")
        lines += ["", "Per signal, adaptive's mean gap to the best fixed schedule over the N it reached: "
                  + "; ".join(gaps) + ".", ""]
        for key, label in (("bench_ratio", "at the CPU benchmark's shape (measured line)"),
                           ("wan14b_ratio", "at Wan2.1-14B shape (arithmetic)"), ("cpu_ratio", "on this miniature (CPU)")):
            for families, what in ((None, "bridged run"), (POLICIES, "run with a refresh policy (no switch)")):
                best = cheapest_at_goal(runs, key, families)
                lines.append(f"- Cheapest {what} keeping ≥ {100 * GOAL_GAIN:.0f} % of the gain, {label}: " +
                             ("none" if best is None else f"**{best[1]}** at {best[0]:.2f}× the receiver "
                              f"({'meets' if best[0] <= GOAL_RATIO else 'misses'} ≤ {GOAL_RATIO}×)"))
        lines += ["", f"Wall time of this miniature: {pair['seconds'] / 60:.1f} min.", ""]
    lines += ["![frontier](REFRESH.png)", ""]
    return "\n".join(lines)


def plot(data: dict, bench: dict | None, path: Path) -> None:
    data = with_costs(data, bench)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = data["pairs"]
    rows = (("mean_forwards", "sharer forwards per run (of 12 steps)"),
            ("bench_ratio", "time ratio to the receiver, CPU benchmark shape (measured line)"),
            ("wan14b_ratio", "time ratio to the receiver, Wan2.1-14B (arithmetic)"))
    fig, axes = plt.subplots(len(rows), len(pairs), figsize=(6.5 * len(pairs), 4.3 * len(rows)), squeeze=False)
    styles = {"every": ("o", "#444444"), "placement": ("*", "#000000"), "window": ("v", "#8c564b"),
              "switch": ("x", "#d62728"), "adaptive": ("s", None), "budget": ("^", None)}
    signal_colours = {"input": "#1f77b4", "magnitude": "#2ca02c", "sigma": "#ff7f0e"}
    for col, pair in enumerate(pairs):
        for row, (key, label) in enumerate(rows):
            ax = axes[row][col]
            seen = set()
            for name, run in pair["runs"].items():
                sch = run["schedule"]
                if sch["family"] == "reference" or run.get(key) is None:
                    continue
                marker, colour = styles[sch["family"]]
                signal = (sch["policy"] or {}).get("signal", "input")
                if colour is None:
                    colour = signal_colours.get(signal, "#9467bd")
                legend = sch["family"] + (f" ({signal})" if sch["family"] in ("adaptive", "budget") else "")
                ax.scatter(run[key], 100 * run["gain_kept"], marker=marker, color=colour, s=40 if marker != "*" else 110,
                           label=None if legend in seen else legend, alpha=0.85)
                seen.add(legend)
            ax.axhline(100 * GOAL_GAIN, color="grey", lw=0.8, ls="--")
            if key != "mean_forwards":
                ax.axvline(GOAL_RATIO, color="grey", lw=0.8, ls="--")
            ax.set_xlabel(label)
            ax.set_ylabel("gain kept (% of refresh 1's)")
            ax.set_title(f"{pair['pair']} miniature", fontsize=10)
            low, high = ax.get_ylim()
            ax.set_ylim(max(-20, low), min(130, high))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    saved = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else here / "out" / "refresh" / "refresh.json").read_text())
    bench_path = Path(sys.argv[2] if len(sys.argv) > 2 else here.parent / "out" / "bench" / "bench_bridge.json")
    bench_data = json.loads(bench_path.read_text()) if bench_path.is_file() else None
    target = here / "REFRESH.md"
    target.write_text(report(saved, bench_data), encoding="utf-8")
    plot(saved, bench_data, target.with_suffix(".png"))
    print(f"wrote {target}" + ("" if bench_data else f" (no {bench_path}: no time ratio at the benchmark's shape)"))
