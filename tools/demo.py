"""``make demo``: the shipped Wan2.1 + ChronoEdit workflow, run three ways on tiny models, as pictures.

Starts a headless ComfyUI with this pack installed (``tests/host.py``'s ComfyServer), converts
``workflows/wan21_t2v_with_chronoedit_sharer.json`` to an API prompt with tiny models substituted for
the 14B ones (``tools/workflow_api.py``), swaps in the embedded default (the miniature experiment's
trained tiny pair, its trained c2c projector and the conditioning they were trained with; made once by
``tools/make_demo_assets.py``, see ``use_trained_default``), and queues it over HTTP three times:

    receiver alone   Fuse Caches strength 0 (bit-identical to plain sampling)
    sharer alone     the sharer sampled by the stock KSampler with its own conditioning
    bridged          the workflow as shipped

It listens on the server's websocket for the ``dit_cache_bridge.report`` event that a bridged run
sends when it ends, and writes to ``out/demo/``:

    comparison.png   ground truth, then one row per run; columns: latent frames of each test video
    layers.png       per receiver layer: fusion strength and the measured change of K and V
    report.txt       timings, models, first-frame PSNR against the truth, the fusion report, the files

With ``--no-train`` and no trained default made, it runs the untrained tiny models and the weighted
projector instead, and says so.

    python tools/demo.py [--out DIR] [--no-train] [--videos 1,10,12,14] [--steps N] [--fast] [--size WxH] [--frames N]
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

demo_assets = host._load_tool("make_demo_assets")

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

    videos: tuple = (0,)     # trained default only: which of the miniature's held-out test videos to show

    @classmethod
    def fast(cls) -> "DemoSettings":
        """For the tests: the smallest latent that still has two frames."""
        return cls(width=64, height=64, length=5, steps=2, tile_scale=8, timeout=300.0)

    @classmethod
    def trained(cls) -> "DemoSettings":
        """The trained tiny pair's own size (8 x 8 latent, 3 latent frames) and the experiment's 12 steps."""
        return cls(width=64, height=64, length=9, steps=12, tile_scale=20, videos=DEMO_VIDEOS)


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


# --------------------------------------------------------------------------------------------------
# The demo's default: THE ONE PLACE where the embedded trained pair and projector get plugged in.
# By default the demo runs the miniature experiment's trained tiny pair (T2V receiver, I2V sharer)
# and its trained c2c projector, made once by tools/make_demo_assets.py into .models/demo/ and linked
# into the server's diffusion_models/ and c2c_projectors/ folders. The graph stays the shipped
# workflow; use_trained_default() swaps in those files, the conditioning the pair was trained with
# (Test: demo moving squares) and the experiment's sampling (shift 3, euler, cfg 1).
# Without them (--no-train and nothing made yet) the demo falls back to the untrained seeded tiny
# models and the training-free weighted projector below.
# --------------------------------------------------------------------------------------------------
FALLBACK_PROJECTOR = {"kind": "weighted", "mapping": "identity", "layers": "all", "alpha": 0.5}
DEMO_VIDEOS = (1, 10, 12, 14)  # held-out test videos (seed 0), picked for visible squares; 0-15 score alike


@dataclass(frozen=True)
class TrainedDefault:
    """The trained assets as the server names them (file names in its model folders) and how they were made."""
    receiver: str
    sharer: str
    projector: str
    stamp: dict

    @classmethod
    def from_stamp(cls, stamp: dict) -> "TrainedDefault":
        names = {role: Path(path).name for role, path in stamp["links"].items()}
        return cls(names["receiver"], names["sharer"], names["projector"], stamp)


def trained_default(models_root: Path, generate: bool, log=print) -> TrainedDefault | None:
    """The trained default, made first when missing and ``generate``; None when missing and not ``generate``.

    Runs tools/make_demo_assets.py in a subprocess (so this process stays free of ComfyUI imports);
    when the stamp is up to date that only re-links the files.
    """
    import subprocess

    if not generate and demo_assets.up_to_date(models_root) is None:
        return None
    command = [sys.executable, str(REPO_ROOT / "tools" / "make_demo_assets.py"), "--root", str(models_root)]
    stamp = None
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            if line.startswith("{"):
                stamp = json.loads(line)
            elif line.startswith("[demo assets]"):
                log(line.rstrip())
    if process.returncode != 0 or stamp is None:
        raise DemoError(f"tools/make_demo_assets.py failed (exit {process.returncode}); run it alone to see why, or "
                        "pass --no-train for the untrained fallback")
    return TrainedDefault.from_stamp(stamp)


def use_default_projector(api: dict, trained: TrainedDefault | None) -> str:
    """Point every projector of the prompt at the demo's default; returns a one-line description."""
    if trained is None:
        for node_id in workflow_api.nodes_of_type(api, "DiTCacheBridge_CreateC2CProjector"):
            api[node_id]["inputs"].update(FALLBACK_PROJECTOR)
        return "Create C2C Projector, " + ", ".join(f"{k} {v}" for k, v in FALLBACK_PROJECTOR.items())
    for node_id in workflow_api.nodes_of_type(api, "DiTCacheBridge_CreateC2CProjector"):
        api[node_id] = {"class_type": "DiTCacheBridge_LoadC2CProjector", "_meta": {"title": "Load C2C Projector (demo default)"},
                        "inputs": {"projector_name": trained.projector}}
    return f"Load C2C Projector {trained.projector} (c2c, trained by tools/make_demo_assets.py)"


def use_trained_default(api: dict, trained: TrainedDefault, ids: dict, settings: DemoSettings) -> None:
    """Swap the trained pair, its training conditioning and the experiment's sampling into the tiny prompt."""
    mini = demo_assets.miniature()
    for node_id, name in ((ids["receiver_loader"], trained.receiver), (ids["sharer_loader"], trained.sharer)):
        api[node_id]["inputs"]["unet_name"] = name
    for node_id in workflow_api.nodes_of_type(api, "ModelSamplingSD3"):
        api[node_id]["inputs"]["shift"] = mini.SHIFT
    for node_id in workflow_api.nodes_of_type(api, "ScaleROPE"):       # ChronoEdit's scale_t 7: not trained with
        api[node_id]["inputs"].update(scale_x=1.0, shift_x=0.0, scale_y=1.0, shift_y=0.0, scale_t=1.0, shift_t=0.0)
    squares = "demo_moving_squares"
    api[squares] = {"class_type": "DCBDemoMovingSquares", "_meta": {"title": "Test: demo moving squares"},
                    "inputs": {"videos": ",".join(str(v) for v in settings.videos)}}
    sampler = api[ids["sampler"]]["inputs"]
    sampler.update(positive=[squares, 1], negative=[squares, 2], cfg=1.0, sampler_name="euler", scheduler="simple")
    api[sampler["latent_image"][0]]["inputs"]["batch_size"] = len(settings.videos)
    capture = api[ids["capture"]]["inputs"]
    for which, slot in (("positive", 1), ("negative", 2)):
        image = api[capture[which][0]]
        if image["class_type"] != "DCBTestWanImageConditioning":
            raise DemoError(f"the sharer's {which} conditioning comes from {image['class_type']}, expected the "
                            "stand-in of WanImageToVideo (DCBTestWanImageConditioning)")
        image["inputs"].update(conditioning=[squares, slot], start_latent=[squares, 0], clip_seed=-1, known_frames=1)


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------

def demo_prompts(workflow: dict, object_info: dict, settings: DemoSettings,
                 trained: TrainedDefault | None = None) -> tuple[dict, dict]:
    """The three API prompts (by run key) and facts about the graph for the report."""
    api = workflow_api.to_api(workflow, object_info)
    real_names = {i: n["inputs"]["unet_name"] for i, n in api.items() if n["class_type"] == "UNETLoader"}
    tiny = workflow_api.substitute_tiny(api, workflow_api.TinySettings(
        width=settings.width, height=settings.height, length=settings.length, steps=settings.steps,
        save_prefix="dit_cache_bridge_demo"), object_info)

    (fuse_id,) = workflow_api.nodes_of_type(tiny, "DiTCacheBridge_FuseCaches")
    capture_id = tiny[fuse_id]["inputs"]["kv_source"][0]
    (sampler_id,) = [i for i in workflow_api.nodes_of_type(tiny, "KSampler")
                     if tiny[i]["inputs"]["model"] == [fuse_id, 0]]
    (save_id,) = [i for i in workflow_api.nodes_of_type(tiny, "SaveLatent")
                  if tiny[i]["inputs"]["samples"] == [sampler_id, 0]]
    ids = {"sampler": sampler_id, "capture": capture_id,
           "receiver_loader": _loader_of(tiny, tiny[fuse_id]["inputs"]["model"]),
           "sharer_loader": _loader_of(tiny, tiny[capture_id]["inputs"]["sharer"])}
    projector = use_default_projector(tiny, trained)
    if trained is not None:
        use_trained_default(tiny, trained, ids, settings)
        tiny = workflow_api.keep_needed(tiny, object_info)

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
        "receiver_loader": ids["receiver_loader"], "sharer_loader": ids["sharer_loader"], "real_names": real_names,
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
    """A saved Wan latent (B, 16, T, H, W) as preview RGB (B, T, H, W, 3), the way ComfyUI previews it."""
    import torch

    wan = latent_formats().Wan21()
    x = wan.process_in(latent.float())                    # SaveLatent stores the VAE-space latent
    factors = torch.tensor(wan.latent_rgb_factors, dtype=torch.float32)      # (16, 3)
    bias = torch.tensor(wan.latent_rgb_factors_bias, dtype=torch.float32)
    return torch.einsum("bcthw,cr->bthwr", x, factors) + bias


def ground_truth(settings: DemoSettings) -> tuple[object, float]:
    """The shown test videos as a VAE-space latent (N, 16, T, H, W), and the PSNR peak of the experiment.

    The peak is the value range over all 64 held-out videos, as experiments/miniature.py measures it.
    """
    videos, _ = demo_assets.miniature().demo_test_videos(demo_assets.miniature().Settings().test_videos)
    peak = float(videos.max() - videos.min())
    return latent_formats().Wan21().process_out(videos[list(settings.videos)]), peak


def first_frame_psnr(latent, truth, peak: float) -> list[float]:
    """Per video: PSNR (dB) of the first latent frame against the truth, in model space (as the experiment)."""
    import torch

    wan = latent_formats().Wan21()
    error = (wan.process_in(latent.float())[:, :, 0] - wan.process_in(truth.float())[:, :, 0]) ** 2
    mse = error.mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return [float(v) for v in 10 * torch.log10(peak ** 2 / mse)]


def comparison_png(runs: list[Run], path: Path, settings: DemoSettings, title: str, notes: tuple[str, ...] = (),
                   truth=None, psnr: dict | None = None) -> dict:
    """Rows: the ground truth (when given), each run, then |bridged - receiver|; columns: latent frames,
    grouped by video when the batch holds several.

    Returns the difference statistics and ``row_boxes``: each row's pixel box (by run key, 'truth' and
    'difference'), for readers of the picture such as the tests.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    rgb = {run.key: preview_rgb(run.latent) for run in runs}
    labels = {run.key: run.label for run in runs}
    if truth is not None:
        rgb = {"truth": preview_rgb(truth), **rgb}
        labels["truth"] = "ground truth"
    stacked = torch.stack(list(rgb.values()))
    lo, hi = torch.quantile(stacked.flatten()[::7], torch.tensor([0.01, 0.99])).tolist()
    diff = (rgb["bridged"] - rgb["receiver"]).abs().mean(dim=-1)             # (B, T, H, W)
    diff_max = float(diff.max())
    videos, frames = diff.shape[:2]

    def tile(image) -> Image.Image:
        array = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        picture = Image.fromarray(array, mode="RGB" if array.ndim == 3 else "L").convert("RGB")
        return picture.resize((picture.width * settings.tile_scale, picture.height * settings.tile_scale),
                              Image.NEAREST)

    def label(key: str) -> str:
        if psnr is None or key not in psnr:
            return labels[key]
        return f"{labels[key]}\nframe 0: {sum(psnr[key]) / len(psnr[key]):.1f} dB"

    rows = [(key, label(key), [[tile((rgb[key][b, t] - lo) / max(hi - lo, 1e-6)) for t in range(frames)]
                               for b in range(videos)]) for key in rgb]
    rows.append(("difference", f"|bridged - receiver|\n(white = {diff_max:.3g})",
                 [[tile(diff[b, t] / max(diff_max, 1e-12)) for t in range(frames)] for b in range(videos)]))

    font = _font(18)
    small = _font(14)
    tile_w, tile_h = rows[0][2][0][0].size
    label_w, gap, group_gap = 230, 8, 28
    head_h = 70 + 18 * len(notes)
    group_w = frames * (tile_w + gap) - gap
    width = label_w + videos * group_w + (videos - 1) * group_gap + gap
    canvas = Image.new("RGB", (width, head_h + len(rows) * (tile_h + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 8), title, fill="black", font=font)
    for i, note in enumerate(notes):
        draw.text((gap, 34 + 18 * i), note, fill="#444", font=small)

    def x_of(b: int, t: int) -> int:
        return label_w + b * (group_w + group_gap) + t * (tile_w + gap)

    for b in range(videos):
        for t in range(frames):
            name = f"frame {t}" if videos > 1 else f"latent frame {t}"
            if videos > 1 and t == 0:
                name = f"video {settings.videos[b]}: frame 0"
            draw.text((x_of(b, t) + 2, head_h - 22), name, fill="black", font=small)
    boxes = {}
    for r, (key, text, tiles) in enumerate(rows):
        y = head_h + r * (tile_h + gap)
        draw.multiline_text((gap, y + tile_h // 2 - 20), text, fill="black", font=font)
        for b, group in enumerate(tiles):
            for t, picture in enumerate(group):
                canvas.paste(picture, (x_of(b, t), y))
        boxes[key] = (label_w, y, x_of(videos - 1, frames - 1) + tile_w, y + tile_h)
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
        comfyui = host.comfyui_path()
    except host.HostNotInstalled as exc:
        raise DemoError(f"no ComfyUI to run: {exc}. Run `make demo` (it installs one), or set COMFYUI_PATH.") from exc
    log("[demo] tiny models ...")
    models = host.ensure_tiny_models(models_root)
    workflow = workflow_api.load_workflow(DEMO_WORKFLOW)

    log(f"[demo] starting ComfyUI ({comfyui}) ...")
    with host.ComfyServer(server_dir, models.root) as server:
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


def report_text(runs, facts, report, stats, settings, models, startup, server_dir, total, comparison, layers,
                trained=None, psnr=None) -> str:
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
    ]
    prompt = runs[-1].prompt
    if trained is not None:
        stamp = trained.stamp
        seconds = stamp.get("seconds", {})
        lines += [f"models (the trained default: experiments/miniature.py seed {stamp['seed']}, made by "
                  f"tools/make_demo_assets.py on {stamp.get('made', '?')} in {seconds.get('total', 0):.0f} s; "
                  f"{Path(stamp['links']['receiver']).parent.parent / 'demo'})"]
        for role, loader, start in (("receiver", facts["receiver_loader"], host.T2V_A),
                                    ("sharer", facts["sharer_loader"], host.I2V)):
            name = prompt[loader]["inputs"]["unet_name"]
            spec = host.TinyModels.spec(start)
            lines.append(f"  {role:<9} {name:<34} {spec['model_type'].upper()} dim {spec['dim']}, {spec['num_layers']} "
                         f"layers, trained from {start} (final loss {stamp['base_loss'][role]:.3f})  "
                         f"(for {facts['real_names'][loader]})")
        lines.append(f"  projector {trained.projector:<34} c2c, {stamp['settings']['projector_steps']} steps of the "
                     "pack's trainer (velocity loss)")
        lines += ["  conditioning: Test: demo moving squares, held-out test videos "
                  f"{', '.join(str(v) for v in settings.videos)} (text = motion direction; the sharer also gets "
                  "the first frame)"]
    else:
        lines += ["models (UNTRAINED tiny seeded stand-ins, tools/make_tiny_models.py: no trained default was found "
                  "and --no-train was given; run tools/demo.py without --no-train to make it, a few minutes once)"]
        for role, loader in (("receiver", facts["receiver_loader"]), ("sharer", facts["sharer_loader"])):
            name = prompt[loader]["inputs"]["unet_name"]
            spec = host.TinyModels.spec(name)
            size_mb = models.path(name).stat().st_size / 1e6
            lines.append(f"  {role:<9} {name:<28} {spec['model_type'].upper()} dim {spec['dim']}, {spec['num_layers']} "
                         f"layers x {spec['num_heads']} heads, {size_mb:.1f} MB  (for {facts['real_names'][loader]})")
    lines += ["", f"runs (wall time from POST /prompt to done; server startup {startup:.1f} s)"]
    for run in runs:
        lines.append(f"  {run.label:<15} {run.seconds:7.2f} s   {run.latent_path}")
    if psnr is not None:
        lines += ["", "first-frame PSNR vs the ground truth (dB, model space, peak = value range of the 64 held-out "
                      "videos, as experiments/miniature.py)",
                  "  " + f"{'':<15} {'mean':>6}  " + "  ".join(f"video {v:>2}" for v in settings.videos)]
        for run in runs:
            values = psnr[run.key]
            lines.append(f"  {run.label:<15} {sum(values) / len(values):6.2f}  "
                         + "  ".join(f"{v:8.2f}" for v in values))
        r, s_, b = (sum(psnr[k]) / len(psnr[k]) for k in ("receiver", "sharer", "bridged"))
        if s_ != r:
            lines.append(f"  the bridge closes {100 * (b - r) / (s_ - r):.0f} % of the receiver -> sharer gap in dB "
                         "on these videos (experiments/RESULTS.md: about 70 % over 16 videos x 3 seeds)")
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
    parser.add_argument("--no-train", action="store_true",
                        help="never train the default pair: use it if made, else the untrained tiny models")
    parser.add_argument("--fast", action="store_true", help="untrained fallback only: tiny latent and 2 steps")
    parser.add_argument("--steps", type=int, help="sampling steps")
    parser.add_argument("--size", help="untrained fallback only: latent video size in pixels, WxH (multiples of 16)")
    parser.add_argument("--frames", type=int, help="untrained fallback only: video frames (4k+1: 5, 9, 13 ...)")
    parser.add_argument("--videos", help="trained default only: held-out test videos to show, e.g. 0,1,2 (0-63)")
    args = parser.parse_args(argv)
    try:
        models = host.ensure_tiny_models()
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
