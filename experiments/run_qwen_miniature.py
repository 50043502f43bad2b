#!/usr/bin/env python
"""Regenerate experiments/QWEN_RESULTS.md and experiments/qwen_results.png (the text-encoder miniature).

    nice python experiments/run_qwen_miniature.py            # 3 seeds, 2 worker processes, 10-20 min on 2 cores
    python experiments/run_qwen_miniature.py --quick         # dry run in seconds, numbers meaningless
    python experiments/run_qwen_miniature.py --oracle-only   # the ceiling check: no projector trained

Each seed runs in its own process (one torch thread each) and writes experiments/out/qwen_seed<N>/
(trained projector bundles, result.json; not committed). See experiments/qwen_miniature.py for what is
trained and measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import qwen_miniature as qm  # noqa: E402

BASELINES = (qm.RECEIVER, qm.UPPER, qm.WEIGHTED, qm.ORACLE)


def worker(seed: int, quick: bool, out: str, overrides: dict) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    settings = dataclasses.replace(qm.Settings.quick() if quick else qm.Settings(), **overrides)
    started = time.monotonic()
    result = qm.run_seed(seed, settings, Path(out) / f"qwen_seed{seed}", log=lambda m: print(m, flush=True))
    data = asdict(result)
    data["wall_seconds"] = time.monotonic() - started
    return data


def mean_spread(values):
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def gap_closed(run: dict, method: str) -> float:
    """Share of the colour-blind receiver -> seeing receiver velocity-MSE gap a method closes."""
    r, u = run["mse"][qm.RECEIVER], run["mse"][qm.UPPER]
    return (r - run["mse"][method]) / (r - u) if r != u else float("nan")


def methods_of(runs: list) -> list:
    return [m for m in BASELINES if m in runs[0]["mse"]] + [m for m in runs[0]["mse"] if m not in BASELINES]


def plot(runs: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = methods_of(runs)
    shown = [qm.RECEIVER] + [m for m in methods if m.startswith("c2c")] + [qm.SHUFFLED, qm.UPPER]
    shown = [m for m in dict.fromkeys(shown) if m in runs[0]["examples"]]
    fig = plt.figure(figsize=(15, 7.5))
    grid = fig.add_gridspec(2, 3, height_ratios=(1.0, 1.1))
    colours = ["#888888", "#2a7f3f", "#c49a2c", "#7a4fa0", "#3f78c4", "#1f4e99", "#b03a2e"]
    for col, (metric, label) in enumerate((("mse", "velocity MSE, held-out prompts (lower is better)"),
                                           ("colour", "colours right in sampled images (higher is better)"))):
        ax = fig.add_subplot(grid[0, col])
        means = [mean_spread(r[metric][m] for r in runs) for m in methods]
        ax.bar(range(len(methods)), [m for m, _ in means], yerr=[s for _, s in means], capsize=4,
               color=colours[:len(methods)])
        for i, m in enumerate(methods):
            ax.scatter([i] * len(runs), [r[metric][m] for r in runs], color="black", s=8, zorder=3)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([m.replace(" (trained)", "").replace(" (", "\n(").replace(" ", "\n", 1) for m in methods],
                           fontsize=7)
        ax.set_title(label, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    ax = fig.add_subplot(grid[0, 2])
    for i, m in enumerate(methods):
        sigmas = sorted(float(s) for s in runs[0]["mse_curve"][m])
        ys = [statistics.fmean(r["mse_curve"][m][_key(r["mse_curve"][m], s)] for r in runs) for s in sigmas]
        ax.plot(sigmas, ys, marker="o", markersize=3, label=m, color=colours[i % len(colours)])
    ax.set_xlabel("noise level sigma")
    ax.set_title("velocity MSE by noise level (mean of seeds)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    # sampled images of seed 0's first held-out prompts: latent channels 0-2 shown as RGB, one shared scale
    run = runs[0]
    import torch
    rows = ["truth"] + shown
    images = {k: torch.tensor(run["examples"][k]) for k in rows}
    lo, hi = images["truth"].min(), images["truth"].max()
    sub = grid[1, :].subgridspec(len(rows), 4, hspace=0.05, wspace=0.02)
    prompts = run.get("example_prompts", [""] * 4)
    for r, name in enumerate(rows):
        for c in range(4):
            ax = fig.add_subplot(sub[r, c])
            rgb = ((images[name][c, :3] - lo) / (hi - lo)).clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(rgb, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name.replace(" (", "\n("), fontsize=6, rotation=0, ha="right", va="center")
            if r == 0:
                ax.set_title(prompts[c], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _key(curve: dict, value: float):
    for k in curve:
        if abs(float(k) - value) < 1e-9:
            return k
    raise KeyError(value)


def report(runs: list, args, wall: float) -> str:
    methods = methods_of(runs)
    trained = [m for m in methods if m.endswith("(trained)")]
    counts = runs[0]["counts"]
    lines = ["# Text-encoder miniature: does a trained projector carry what the sharer reads into the image?", "",
             f"Generated by `{args.command}` ({len(runs)} seed{'s' if len(runs) != 1 else ''}, {wall / 60:.1f} min "
             f"wall time on {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}). Design: "
             f"`experiments/README.md` (section *Text-encoder miniature*), code `experiments/qwen_miniature.py`.", ""]
    if args.quick:
        lines += ["**Quick mode: tiny training budgets, the numbers below say nothing about the method.**", ""]
    lines += [f"Held-out prompts ({counts['test']} test combinations of colour, shape and colour that no model was "
              f"trained on; {counts['train']} train, {counts['val']} validation). Velocity MSE of the frozen DiT's "
              f"flow-matching target averaged over {len(qm.EVAL_SIGMAS)} noise levels (same noise for every method); "
              "*colours right*: foreground and background of images sampled from seeded noise (Euler, "
              f"{runs[0].get('sample_steps', '')} steps) whose mean latent is nearest the prompt's colour (chance "
              f"{100 / len(qm.COLOURS):.1f} %); latent PSNR of those images against the true ones. Mean ± standard "
              "deviation over seeds; *gap closed* = (receiver − method) / (receiver − seeing receiver) in velocity "
              "MSE, per seed.", "",
              "| method | velocity MSE | gap closed | colours right | latent PSNR (dB) |", "|---|---|---|---|---|"]
    for m in methods:
        mse, colour, psnr = (mean_spread(r[k][m] for r in runs) for k in ("mse", "colour", "psnr"))
        gap = mean_spread(gap_closed(r, m) for r in runs)
        gap_text = "—" if m in (qm.RECEIVER, qm.UPPER) else f"{100 * gap[0]:.0f} % ± {100 * gap[1]:.0f}"
        lines.append(f"| {m} | {mse[0]:.4f} ± {mse[1]:.4f} | {gap_text} | {100 * colour[0]:.0f} % ± "
                     f"{100 * colour[1]:.0f} | {psnr[0]:.2f} ± {psnr[1]:.2f} |")
    lines += ["", "![results](qwen_results.png)", ""]
    if trained:
        best = max(trained, key=lambda m: statistics.fmean(gap_closed(r, m) for r in runs))
        closed = [gap_closed(r, best) for r in runs]
        mean_closed = statistics.fmean(closed)
        verdict = ("**Goal met on every seed.**" if all(c >= 0.5 for c in closed) else
                   "**Goal met on average but not on every seed.**" if mean_closed >= 0.5 else "**Goal not met.**")
        lines += ["## Verdict", "",
                  f"Goal: a trained projector closes at least half of the receiver → upper-bound gap in held-out "
                  f"velocity MSE. Best trained projector: **{best}**, closing {100 * mean_closed:.0f} % on average "
                  f"(per seed: {', '.join(f'{100 * c:.0f} %' for c in closed)}). {verdict}", ""]
    alphas = list(runs[0]["alpha_gap"])
    lines += [] if not alphas else ["## Training-free fusion on the validation split", "",
              "Gap closed by alpha (alpha 1 is the identity projector, the sharer's K/V in place of the receiver's); "
              "the best alpha is the one reported above.", "",
              "| seed | " + " | ".join(f"alpha {a}" for a in alphas) + " | chosen |", "|---" * (len(alphas) + 2) + "|"]
    for r in runs if alphas else ():
        lines.append(f"| {r['seed']} | " + " | ".join(f"{100 * r['alpha_gap'][a]:.1f} %" for a in alphas)
                     + f" | {r['chosen']['weighted alpha']} |")
    lines += ["", "## Wall time per seed (one CPU thread each, on a shared machine)", "",
              "| seed | " + " | ".join(runs[0]["seconds"]) + " | total |", "|---" * (len(runs[0]["seconds"]) + 2) + "|"]
    for r in runs:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{v:.0f} s" for v in r["seconds"].values())
                     + f" | {r['wall_seconds']:.0f} s |")
    lines += ["", "Final training losses (mean of the last 50 steps): " + "; ".join(
        f"seed {r['seed']}: " + ", ".join(f"{k} {v:.4f}" for k, v in r["losses"].items()) for r in runs) + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--quick", action="store_true", help="dry-run sizes (seconds; the numbers mean nothing)")
    p.add_argument("--out", type=Path, default=HERE / "out", help="per-seed artefacts (not committed)")
    p.add_argument("--results", type=Path, default=HERE / "QWEN_RESULTS.md")
    p.add_argument("--kinds", help="trained projector kinds, comma-separated (default: full,c2c)")
    p.add_argument("--oracle-only", action="store_true",
                   help="the ceiling check alone: receiver, seeing receiver and K/V oracle, no projector trained")
    p.add_argument("--set", help='Settings overrides as JSON, for pilot runs, e.g. \'{"embed_scale": 0.1}\'')
    p.add_argument("--diagnose", action="store_true",
                   help="print, per row of the conditioning, where the colours are and what the K/V oracle restores, "
                        "for the random and the taught receiver (qwen_miniature.colour_locality), and stop")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report and the plot from <out>/qwen_runs.json without training anything")
    args = p.parse_args(argv)
    if args.diagnose:
        found = qm.colour_locality(0)
        print(" / ".join(found["prompts"]))
        for name in ("random receiver", "taught receiver"):
            columns = found[name]
            print(f"\n{name}: per row of the conditioning, distances of the last hidden states\n{'token':>14} "
                  + " ".join(f"{c:>20}" for c in columns))
            for i, token in enumerate(found["tokens"]):
                print(f"{token!r:>14} " + " ".join(f"{columns[c][i]:>20}" for c in columns))
        return 0
    args.command = " ".join(["python experiments/run_qwen_miniature.py", *(sys.argv[1:] if argv is None else argv)])
    if args.report_only:
        saved = json.loads((args.out / "qwen_runs.json").read_text())
        runs, wall, args.quick, args.command = saved["runs"], saved["wall_seconds"], saved["quick"], saved["command"]
    else:
        started = time.monotonic()
        seeds = list(range(args.seeds))
        overrides = {"kinds": tuple(args.kinds.split(","))} if args.kinds else {}
        if args.oracle_only:
            overrides.update(kinds=(), alphas=())
        overrides.update(json.loads(args.set or "{}"))
        if args.workers > 1 and len(seeds) > 1:
            import multiprocessing
            with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs = list(pool.map(worker, seeds, [args.quick] * len(seeds), [str(args.out)] * len(seeds),
                                     [overrides] * len(seeds)))
        else:
            runs = [worker(s, args.quick, str(args.out), overrides) for s in seeds]
        wall = time.monotonic() - started
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "qwen_runs.json").write_text(json.dumps({"wall_seconds": wall, "quick": args.quick, "runs": runs,
                                                             "command": args.command}))
    plot(runs, args.results.with_name("qwen_results.png") if args.results.name == "QWEN_RESULTS.md"
         else args.results.with_suffix(".png"))
    args.results.write_text(report(runs, args, wall), encoding="utf-8")
    print(f"wrote {args.results} in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
