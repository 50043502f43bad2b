"""``make demo``: the shipped Wan2.1 + ChronoEdit workflow, run three ways on tiny models, as pictures.

Starts a headless ComfyUI with this pack installed (``comfy_server.py``), converts
``workflows/wan21_t2v_with_chronoedit_sharer.json`` to an API prompt with tiny models substituted for
the 14B ones (``workflow_api.py``), swaps in the embedded default (the miniature experiment's
trained tiny pair, its trained c2c projector and the conditioning they were trained with; made once by
``make_demo_assets.py``, see ``demo_graph.use_trained_default``), and queues it over HTTP three times:

    receiver alone   Fuse Caches strength 0 (bit-identical to plain sampling)
    sharer alone     the sharer sampled by the stock KSampler with its own conditioning
    bridged          the workflow as shipped

It listens on the server's websocket for the ``dit_cache_bridge.report`` event that a bridged run
sends when it ends, and writes to ``out/demo/``:

    comparison.png   ground truth, then one row per run; columns: latent frames of each test video
    layers.png       per receiver layer: fusion strength and the measured change of K and V
    report.txt       timings, models, first-frame PSNR against the truth, the fusion report, the files

With ``--no-train`` and no trained default made, it runs the untrained tiny models and the weighted
projector instead, and says so. The parts: ``demo_graph.py`` (the prompts), ``demo_events.py`` (the
websocket), ``demo_pictures.py`` (the pictures), ``demo_report.py`` (report.txt); this file runs them.

    python tools/demo.py [--out DIR] [--no-train] [--videos 1,10,12,14] [--steps N] [--fast] [--size WxH] [--frames N]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import install_host
from comfy_server import ComfyServer, PromptFailed, PromptRejected
from demo_events import REPORT_EVENT, ServerEvents
from demo_graph import DEMO_WORKFLOW, REPO_ROOT, DemoError, DemoSettings, TrainedDefault, demo_prompts, trained_default
from demo_pictures import comparison_png, first_frame_psnr, ground_truth, layers_png
from demo_report import report_text
from make_tiny_models import ensure_tiny_models
from workflow_api import load_workflow

DEFAULT_OUT = REPO_ROOT / "out" / "demo"
RUNS = (("receiver", "receiver alone"), ("sharer", "sharer alone"), ("bridged", "bridged"))
# The graph's conditioning comes from the stand-in nodes the tests use too (no text encoder, no VAE).
STAND_IN_NODES = {"dit_cache_bridge_test_nodes.py": REPO_ROOT / "tests" / "comfy_test_nodes.py"}


@dataclass
class Run:
    key: str
    label: str
    prompt: dict
    seconds: float = 0.0
    latent_path: Path | None = None
    latent: object = None                      # torch.Tensor (1, 16, T, H, W)
    reports: list = field(default_factory=list)


@dataclass
class DemoResult:
    out_dir: Path
    comparison: Path
    layers: Path
    report: Path
    runs: list
    row_boxes: dict
    psnr: dict | None = None       # run key -> first-frame PSNR per shown video (trained default only)


def run_demo(out_dir: Path = DEFAULT_OUT, settings: DemoSettings | None = None, log=print,
             trained: TrainedDefault | None = None, models_root: Path | None = None) -> DemoResult:
    """Run the three prompts on a fresh headless ComfyUI and write the pictures and the report.

    ``trained``: the trained default (``trained_default()``), or None for the untrained tiny models and
    the weighted projector. ``settings`` None: the size that fits (``DemoSettings.trained()`` or the default).
    ``models_root``: the server's models root (default: the tiny models' .models/, made if missing).
    """
    import safetensors.torch

    total_started = time.monotonic()
    if settings is None:
        settings = DemoSettings.trained() if trained is not None else DemoSettings()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    server_dir = out_dir / "comfyui"
    shutil.rmtree(server_dir, ignore_errors=True)    # our own server folders from an earlier demo
    try:
        comfyui = install_host.comfyui_path()
    except install_host.HostNotInstalled as exc:
        raise DemoError(f"no ComfyUI to run: {exc}. Run `make demo` (it installs one), or set COMFYUI_PATH.") from exc
    log("[demo] tiny models ...")
    models = ensure_tiny_models(models_root)
    workflow = load_workflow(DEMO_WORKFLOW)

    log(f"[demo] starting ComfyUI ({comfyui}) ...")
    with ComfyServer(server_dir, models.root, custom_nodes=STAND_IN_NODES) as server:
        log(f"[demo] server ready in {server.startup_seconds:.1f} s at {server.url}")
        object_info = server.object_info()
        prompts, facts = demo_prompts(workflow, object_info, settings, trained)
        runs = [Run(key, label, prompts[key]) for key, label in RUNS]
        events = ServerEvents(server)
        try:
            for run in runs:
                log(f"[demo] {run.label} ...")
                entry, run.reports, run.seconds = events.run(run.prompt, settings.timeout)
                (run.latent_path,) = server.output_files(entry, facts["save_id"])
                run.latent = safetensors.torch.load_file(str(run.latent_path))["latent_tensor"]
                log(f"[demo] {run.label}: {run.seconds:.2f} s")
        finally:
            events.close()
        startup = server.startup_seconds

    bridged = runs[-1]
    reports = [r for r in bridged.reports if str(r.get("node")) == facts["fuse_id"]]
    if not reports:
        raise DemoError(f"the bridged run sent no '{REPORT_EVENT}' event for Fuse Caches node {facts['fuse_id']} "
                        f"(got {bridged.reports!r}); see {server_dir / 'server.log'}")
    report = reports[-1]["report"]

    truth, psnr = None, None
    if trained is not None:
        truth, peak = ground_truth(settings)
        psnr = {run.key: first_frame_psnr(run.latent, truth, peak) for run in runs}
    frames = bridged.latent.shape[2]
    comparison = out_dir / "comparison.png"
    if trained is not None:
        title = (f"Wan2.1 T2V receiver + ChronoEdit sharer: the miniature's trained tiny pair and c2c projector, "
                 f"{facts['sampler']['steps']} steps")
        notes = ("The receiver is told only the motion direction; the sharer also sees the first frame. "
                 "Bridged, the receiver reads the sharer's K/V through the trained projector.",
                 "Colours: Wan2.1 latent->RGB preview factors (ComfyUI), one contrast stretch for all rows; "
                 "dB = first-frame PSNR vs the truth, mean of the shown videos.")
    else:
        title = (f"Wan2.1 T2V receiver + ChronoEdit sharer (tiny stand-ins), {facts['sampler']['steps']} steps, "
                 f"{frames} latent frames")
        notes = ("Random-weight tiny stand-ins for the 14B models (no trained default: --no-train): this shows what "
                 "the bridge changes, not image quality.",
                 "Colours: Wan2.1 latent->RGB preview factors (ComfyUI), one contrast stretch for all rows.")
    stats = comparison_png(runs, comparison, settings, title, notes, truth, psnr)
    layers = out_dir / "layers.png"
    layers_png(report, layers, f"Fuse Caches, bridged run: {report['sharer_forwards']} sharer forwards, "
                               f"{report['model_calls']} receiver calls")
    report_path = out_dir / "report.txt"
    report_path.write_text(report_text(runs, facts, report, stats, settings, models, startup, server_dir,
                                       time.monotonic() - total_started, comparison, layers, trained, psnr),
                           encoding="utf-8")
    return DemoResult(out_dir, comparison, layers, report_path, runs, stats["row_boxes"], psnr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default out/demo)")
    parser.add_argument("--no-train", action="store_true",
                        help="never train the default pair: use it if made, else the untrained tiny models")
    parser.add_argument("--fast", action="store_true", help="untrained fallback only: tiny latent and 2 steps")
    parser.add_argument("--steps", type=int, help="sampling steps")
    parser.add_argument("--size", help="untrained fallback only: latent video size in pixels, WxH (multiples of 16)")
    parser.add_argument("--frames", type=int, help="untrained fallback only: video frames (4k+1: 5, 9, 13 ...)")
    parser.add_argument("--videos", help="trained default only: held-out test videos to show, e.g. 0,1,2 (0-63)")
    args = parser.parse_args(argv)
    try:
        models = ensure_tiny_models()
        trained = trained_default(models.root, generate=not args.no_train)
        if trained is not None:
            settings = DemoSettings.trained()
            if args.fast or args.size or args.frames:
                print("[demo] --fast/--size/--frames are ignored: the trained pair runs at its own size "
                      "(64x64, 9 frames)", file=sys.stderr)
        else:
            settings = DemoSettings.fast() if args.fast else DemoSettings()
        overrides = {}
        if args.steps:
            overrides["steps"] = args.steps
        if trained is None and args.size:
            width, height = (int(v) for v in args.size.lower().split("x"))
            overrides.update(width=width, height=height)
        if trained is None and args.frames:
            overrides["length"] = args.frames
        if trained is not None and args.videos:
            overrides["videos"] = tuple(int(v) for v in args.videos.split(","))
        if overrides:
            settings = DemoSettings(**{**settings.__dict__, **overrides})
        result = run_demo(args.out, settings, trained=trained)
    except (DemoError, PromptRejected, PromptFailed) as exc:
        print(f"[demo] failed: {exc}", file=sys.stderr)
        return 1
    print(result.report.read_text(encoding="utf-8"))
    print("[demo] wrote:")
    for path in (result.comparison, result.layers, result.report):
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
