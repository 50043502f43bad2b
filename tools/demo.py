"""``make demo``: the shipped Wan2.1 + ChronoEdit workflow, run three ways on tiny models, as pictures.

Starts a headless ComfyUI with this pack installed (``tests/host.py``'s ComfyServer), converts
``workflows/wan21_t2v_with_chronoedit_sharer.json`` to an API prompt with the tiny seeded models
substituted for the 14B ones (``tools/workflow_api.py``), and queues it over HTTP three times:

    receiver alone   Fuse Caches strength 0 (bit-identical to plain sampling)
    sharer alone     the sharer sampled by the stock KSampler with its own conditioning
    bridged          the workflow as shipped

It listens on the server's websocket for the ``dit_cache_bridge.report`` event that a bridged run
sends when it ends, and writes to ``out/demo/``:

    comparison.png   one row per run, one column per latent frame (Wan's latent->RGB preview colours)
    layers.png       per receiver layer: fusion strength and the measured change of K and V
    report.txt       timings, model sizes, the fusion report and where everything is

    python tools/demo.py [--out DIR] [--fast] [--steps N] [--size WxH] [--frames N]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tests"))

import host  # noqa: E402  (the shared ComfyUI launcher of the tests)

workflow_api = host._load_tool("workflow_api")

DEMO_WORKFLOW = REPO_ROOT / "workflows" / "wan21_t2v_with_chronoedit_sharer.json"
DEFAULT_OUT = REPO_ROOT / "out" / "demo"
REPORT_EVENT = "dit_cache_bridge.report"
RUNS = (("receiver", "receiver alone"), ("sharer", "sharer alone"), ("bridged", "bridged"))


class DemoError(RuntimeError):
    """Something the demo cannot recover from; the message says what to do."""


@dataclass(frozen=True)
class DemoSettings:
    width: int = 128
    height: int = 128
    length: int = 9          # video frames: 9 -> 3 latent frames
    steps: int = 8
    tile_scale: int = 12     # each latent pixel becomes a tile_scale x tile_scale block in comparison.png
    timeout: float = 600.0   # per prompt

    @classmethod
    def fast(cls) -> "DemoSettings":
        """For the tests: the smallest latent that still has two frames."""
        return cls(width=64, height=64, length=5, steps=2, tile_scale=8, timeout=300.0)


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


# --------------------------------------------------------------------------------------------------
# The demo's projector: THE ONE PLACE where the embedded default projector gets plugged in.
# Until a trained tiny projector ships with the pack, the demo uses the training-free 'weighted'
# projector (half sharer, half receiver). When one ships: turn the Create C2C Projector node into
# {"class_type": "LoadC2CProjector", "inputs": {"projector_name": <file>}} here, and put the file in
# the demo's models root under c2c_projectors/ (host.ensure_tiny_models' root) before the server starts.
# --------------------------------------------------------------------------------------------------
DEFAULT_PROJECTOR = {"kind": "weighted", "mapping": "identity", "layers": "all", "alpha": 0.5}


def use_default_projector(api: dict) -> str:
    """Point every projector of the prompt at the demo's default; returns a one-line description."""
    for node_id in workflow_api.nodes_of_type(api, "CreateC2CProjector"):
        api[node_id]["inputs"].update(DEFAULT_PROJECTOR)
    return "Create C2C Projector, " + ", ".join(f"{k} {v}" for k, v in DEFAULT_PROJECTOR.items())


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------

def demo_prompts(workflow: dict, object_info: dict, settings: DemoSettings) -> tuple[dict, dict]:
    """The three API prompts (by run key) and facts about the graph for the report."""
    api = workflow_api.to_api(workflow, object_info)
    real_names = {i: n["inputs"]["unet_name"] for i, n in api.items() if n["class_type"] == "UNETLoader"}
    tiny = workflow_api.substitute_tiny(api, workflow_api.TinySettings(
        width=settings.width, height=settings.height, length=settings.length, steps=settings.steps,
        save_prefix="dit_cache_bridge_demo"), object_info)
    projector = use_default_projector(tiny)

    (fuse_id,) = workflow_api.nodes_of_type(tiny, "FuseCaches")
    capture_id = tiny[fuse_id]["inputs"]["kv_source"][0]
    (sampler_id,) = [i for i in workflow_api.nodes_of_type(tiny, "KSampler")
                     if tiny[i]["inputs"]["model"] == [fuse_id, 0]]
    (save_id,) = [i for i in workflow_api.nodes_of_type(tiny, "SaveLatent")
                  if tiny[i]["inputs"]["samples"] == [sampler_id, 0]]

    receiver = copy.deepcopy(tiny)
    receiver[fuse_id]["inputs"]["strength"] = 0.0
    sharer = copy.deepcopy(tiny)
    capture = tiny[capture_id]["inputs"]
    sharer[sampler_id]["inputs"].update(model=capture["sharer"], positive=capture["positive"],
                                        negative=capture["negative"])
    sharer = workflow_api.keep_needed(sharer, object_info)
    prompts = {"receiver": receiver, "sharer": sharer, "bridged": tiny}
    for key, prompt in prompts.items():
        prompt[save_id]["inputs"]["filename_prefix"] = f"dit_cache_bridge_demo/{key}"

    facts = {
        "save_id": save_id, "fuse_id": fuse_id, "sampler": tiny[sampler_id]["inputs"],
        "strength": tiny[fuse_id]["inputs"]["strength"], "projector": projector,
        "receiver_loader": _loader_of(tiny, tiny[fuse_id]["inputs"]["model"]),
        "sharer_loader": _loader_of(tiny, capture["sharer"]), "real_names": real_names,
    }
    return prompts, facts


def _loader_of(api: dict, link) -> str:
    """The UNETLoader a MODEL link comes from (through ModelSamplingSD3, ScaleROPE ...)."""
    node_id = link[0]
    while api[node_id]["class_type"] != "UNETLoader":
        node_id = api[node_id]["inputs"]["model"][0]
    return node_id


# --------------------------------------------------------------------------------------------------
# Running prompts with the websocket open
# --------------------------------------------------------------------------------------------------

class ServerEvents:
    """The server's websocket for one client id: waits for a prompt to end, collecting our reports."""

    def __init__(self, server: "host.ComfyServer"):
        import websocket

        self.server = server
        self.client_id = f"dit-cache-bridge-demo-{uuid.uuid4().hex[:8]}"
        url = server.url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self.ws = websocket.create_connection(url, timeout=30)
        self._timeout_error = websocket.WebSocketTimeoutException

    def close(self) -> None:
        self.ws.close()

    def run(self, prompt: dict, timeout: float) -> tuple[dict, list, float]:
        """Queue ``prompt``; returns (history entry, reports received, wall seconds)."""
        started = time.monotonic()
        prompt_id = self.server.post_prompt(prompt, client_id=self.client_id)
        reports, deadline = [], started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DemoError(f"prompt {prompt_id} still running after {timeout:.0f} s; server log: "
                                f"{self.server.log_path}")
            self.ws.settimeout(min(remaining, 5.0))
            try:
                message = self.ws.recv()
            except self._timeout_error:
                if not self.server.running:
                    raise DemoError(f"the ComfyUI server stopped; see {self.server.log_path}:\n"
                                    f"{self.server.log_tail()}") from None
                continue
            if isinstance(message, bytes):       # preview images
                continue
            event = json.loads(message)
            kind, data = event.get("type"), event.get("data") or {}
            if kind == REPORT_EVENT:
                reports.append(data)
            elif data.get("prompt_id") == prompt_id and (
                    kind in ("execution_success", "execution_error", "execution_interrupted")
                    or (kind == "executing" and data.get("node") is None)):
                break
        seconds = time.monotonic() - started
        return self.server.wait(prompt_id, timeout=60), reports, seconds


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------

def latent_formats():
    """ComfyUI's comfy/latent_formats.py (Wan's preview factors live there); it only imports torch."""
    loaded = sys.modules.get("comfy.latent_formats")
    if loaded is not None:
        return loaded
    name = "_dcb_comfy_latent_formats"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, host.comfyui_path() / "comfy" / "latent_formats.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def preview_rgb(latent):
    """A saved Wan latent (1, 16, T, H, W) as preview RGB (T, H, W, 3), the way ComfyUI previews it."""
    import torch

    wan = latent_formats().Wan21()
    x = wan.process_in(latent.float())                    # SaveLatent stores the VAE-space latent
    factors = torch.tensor(wan.latent_rgb_factors, dtype=torch.float32)      # (16, 3)
    bias = torch.tensor(wan.latent_rgb_factors_bias, dtype=torch.float32)
    return torch.einsum("bcthw,cr->bthwr", x, factors)[0] + bias


def comparison_png(runs: list[Run], path: Path, settings: DemoSettings, title: str) -> dict:
    """Rows: each run, then |bridged - receiver|; columns: latent frames.

    Returns the difference statistics and ``row_boxes``: each row's pixel box (by run key, and
    'difference'), for readers of the picture such as the tests.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    rgb = {run.key: preview_rgb(run.latent) for run in runs}
    stacked = torch.stack(list(rgb.values()))
    lo, hi = torch.quantile(stacked.flatten()[::7], torch.tensor([0.01, 0.99])).tolist()
    diff = (rgb["bridged"] - rgb["receiver"]).abs().mean(dim=-1)             # (T, H, W)
    diff_max = float(diff.max())

    def tile(image) -> Image.Image:
        array = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        picture = Image.fromarray(array, mode="RGB" if array.ndim == 3 else "L").convert("RGB")
        return picture.resize((picture.width * settings.tile_scale, picture.height * settings.tile_scale),
                              Image.NEAREST)

    rows = [(run.label, [tile((rgb[run.key][t] - lo) / max(hi - lo, 1e-6)) for t in range(rgb[run.key].shape[0])])
            for run in runs]
    rows.append((f"|bridged - receiver|\n(white = {diff_max:.3g})",
                 [tile(diff[t] / max(diff_max, 1e-12)) for t in range(diff.shape[0])]))

    font = _font(18)
    small = _font(14)
    tile_w, tile_h = rows[0][1][0].size
    label_w, head_h, gap = 230, 100, 8
    frames = len(rows[0][1])
    canvas = Image.new("RGB", (label_w + frames * (tile_w + gap) + gap, head_h + len(rows) * (tile_h + gap) + gap),
                       "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 8), title, fill="black", font=font)
    draw.text((gap, 34), "Random-weight tiny stand-ins for the 14B models: this shows what the bridge changes, not "
                         "image quality.", fill="#444", font=small)
    draw.text((gap, 52), "Colours: Wan2.1 latent->RGB preview factors (ComfyUI), one contrast stretch for all rows.",
              fill="#444", font=small)
    for t in range(frames):
        draw.text((label_w + t * (tile_w + gap) + 4, head_h - 22), f"latent frame {t}", fill="black", font=small)
    boxes = {}
    for r, (label, tiles) in enumerate(rows):
        y = head_h + r * (tile_h + gap)
        draw.multiline_text((gap, y + tile_h // 2 - 20), label, fill="black", font=font)
        for t, picture in enumerate(tiles):
            canvas.paste(picture, (label_w + t * (tile_w + gap), y))
        key = runs[r].key if r < len(runs) else "difference"
        boxes[key] = (label_w, y, label_w + frames * (tile_w + gap) - gap, y + tile_h)
    canvas.save(path)
    return {"mean_abs_diff": float(diff.mean()), "max_abs_diff": diff_max, "row_boxes": boxes}


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:       # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def layers_png(report: dict, path: Path, title: str) -> None:
    """Two panels over receiver layers: fusion strength and projector gate, and relative change of K and V."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [int(layer) for layer in report["layers"]]

    def per_layer(key):
        return [_layer_value(report, key, layer) for layer in layers]

    x = list(range(len(layers)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.5 * len(layers) + 4), 6), sharex=True)
    top.bar(x, per_layer("strength"), color="#c0504d", label="strength (mean over steps)")
    gates = [(i, g) for i, layer in zip(x, layers)
             for g in [(report.get("gate") or {}).get(str(layer), (report.get("gate") or {}).get(layer))] if g]
    for which, marker in (("k", "v"), ("v", "^")):
        points = [(i, g[which]) for i, g in gates if g.get(which) is not None]
        if points:
            top.scatter(*zip(*points), marker=marker, color="black", zorder=3, label=f"projector gate ({which.upper()})")
    top.set_ylabel("strength and gate")
    top.legend(loc="lower right", fontsize=8)
    top.set_title(title)
    width = 0.4
    bottom.bar([i - width / 2 for i in x], per_layer("k_change"), width, label="K", color="#4f81bd")
    bottom.bar([i + width / 2 for i in x], per_layer("v_change"), width, label="V", color="#9bbb59")
    bottom.set_ylabel("relative change\n‖fused − own‖ / ‖own‖")
    bottom.set_xlabel("receiver layer")
    bottom.set_xticks(x, [str(layer) for layer in layers])
    bottom.legend()
    for axis in (top, bottom):
        axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------------

def run_demo(out_dir: Path = DEFAULT_OUT, settings: DemoSettings = DemoSettings(), log=print) -> DemoResult:
    """Run the three prompts on a fresh headless ComfyUI and write the pictures and the report."""
    import safetensors.torch

    total_started = time.monotonic()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    server_dir = out_dir / "comfyui"
    shutil.rmtree(server_dir, ignore_errors=True)    # our own server folders from an earlier demo
    try:
        comfyui = host.comfyui_path()
    except host.HostNotInstalled as exc:
        raise DemoError(f"no ComfyUI to run: {exc}. Run `make demo` (it installs one), or set COMFYUI_PATH.") from exc
    log("[demo] tiny models ...")
    models = host.ensure_tiny_models()
    workflow = workflow_api.load_workflow(DEMO_WORKFLOW)

    log(f"[demo] starting ComfyUI ({comfyui}) ...")
    with host.ComfyServer(server_dir, models.root) as server:
        log(f"[demo] server ready in {server.startup_seconds:.1f} s at {server.url}")
        object_info = server.object_info()
        prompts, facts = demo_prompts(workflow, object_info, settings)
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

    frames = bridged.latent.shape[2]
    comparison = out_dir / "comparison.png"
    stats = comparison_png(runs, comparison, settings,
                           f"Wan2.1 T2V receiver + ChronoEdit sharer (tiny stand-ins), {facts['sampler']['steps']} "
                           f"steps, {frames} latent frames")
    layers = out_dir / "layers.png"
    layers_png(report, layers, f"Fuse Caches, bridged run: {report['sharer_forwards']} sharer forwards, "
                               f"{report['model_calls']} receiver calls")
    report_path = out_dir / "report.txt"
    report_path.write_text(report_text(runs, facts, report, stats, settings, models, startup, server_dir,
                                       time.monotonic() - total_started, comparison, layers), encoding="utf-8")
    return DemoResult(out_dir, comparison, layers, report_path, runs, stats["row_boxes"])


def report_text(runs, facts, report, stats, settings, models, startup, server_dir, total, comparison, layers) -> str:
    sampler = facts["sampler"]
    shape = tuple(runs[0].latent.shape)
    lines = [
        "DiT Cache Bridge demo",
        "=====================",
        f"workflow   {DEMO_WORKFLOW.relative_to(REPO_ROOT)} (tiny models substituted by tools/workflow_api.py)",
        f"latent     {settings.width}x{settings.height}, {settings.length} frames -> {shape}; "
        f"{sampler['steps']} steps, {sampler['sampler_name']}/{sampler['scheduler']}, cfg {sampler['cfg']}, "
        f"seed {sampler['seed']}",
        f"projector  {facts['projector']}; Fuse Caches strength {facts['strength']}",
        "",
        "models (tiny seeded stand-ins, tools/make_tiny_models.py)",
    ]
    prompt = runs[-1].prompt
    for role, loader in (("receiver", facts["receiver_loader"]), ("sharer", facts["sharer_loader"])):
        name = prompt[loader]["inputs"]["unet_name"]
        spec = host.TinyModels.spec(name)
        size_mb = models.path(name).stat().st_size / 1e6
        lines.append(f"  {role:<9} {name:<28} {spec['model_type'].upper()} dim {spec['dim']}, {spec['num_layers']} "
                     f"layers x {spec['num_heads']} heads, {size_mb:.1f} MB  (for {facts['real_names'][loader]})")
    lines += ["", f"runs (wall time from POST /prompt to done; server startup {startup:.1f} s)"]
    for run in runs:
        lines.append(f"  {run.label:<15} {run.seconds:7.2f} s   {run.latent_path}")
    lines += ["", f"fusion report of the bridged run (websocket event {REPORT_EVENT}, Fuse Caches node "
                  f"{facts['fuse_id']}): {report['sharer_forwards']} sharer forwards, {report['model_calls']} "
                  "receiver model calls",
              "  layer  strength  K change  V change"]
    for layer in report["layers"]:
        strength, k, v = (_layer_value(report, key, layer) for key in ("strength", "k_change", "v_change"))
        lines.append(f"  {layer:>5}  {strength:8.3f}  {k:8.4f}  {v:8.4f}")
    lines += ["",
              f"bridged vs receiver alone, preview RGB: mean |difference| {stats['mean_abs_diff']:.4g}, "
              f"max {stats['max_abs_diff']:.4g}",
              "",
              "files",
              f"  {comparison}",
              f"  {layers}",
              f"  server folders and log: {server_dir}",
              "",
              f"total demo wall time {total:.1f} s"]
    return "\n".join(lines) + "\n"


def _layer_value(report: dict, key: str, layer) -> float:
    """A per-layer value of the report; JSON turned the layer keys into strings."""
    values = report.get(key) or {}
    return float(values.get(str(layer), values.get(layer, 0.0)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default out/demo)")
    parser.add_argument("--fast", action="store_true", help="tiny latent and 2 steps (what the tests run)")
    parser.add_argument("--steps", type=int, help="sampling steps")
    parser.add_argument("--size", help="latent video size in pixels, WxH (multiples of 16)")
    parser.add_argument("--frames", type=int, help="video frames (4k+1: 5, 9, 13 ...)")
    args = parser.parse_args(argv)
    settings = DemoSettings.fast() if args.fast else DemoSettings()
    overrides = {}
    if args.steps:
        overrides["steps"] = args.steps
    if args.size:
        width, height = (int(v) for v in args.size.lower().split("x"))
        overrides.update(width=width, height=height)
    if args.frames:
        overrides["length"] = args.frames
    if overrides:
        settings = DemoSettings(**{**settings.__dict__, **overrides})
    try:
        result = run_demo(args.out, settings)
    except (DemoError, host.PromptRejected, host.PromptFailed) as exc:
        print(f"[demo] failed: {exc}", file=sys.stderr)
        return 1
    print(result.report.read_text(encoding="utf-8"))
    print("[demo] wrote:")
    for path in (result.comparison, result.layers, result.report):
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
