"""The demo's pictures: saved Wan latents previewed as ComfyUI previews them, side by side, and the layer plot.

``comparison.png``: the ground truth (trained default only), one row per run, then |bridged - receiver|;
columns are latent frames, grouped by video. ``layers.png``: per receiver layer, the fusion strength and
projector gate, and the measured change of K and V. Also the trained default's score: first-frame PSNR
against the truth, in model space, as experiments/miniature.py measures it.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import install_host
import make_demo_assets as demo_assets
from demo_graph import DemoSettings


def latent_formats():
    """ComfyUI's comfy/latent_formats.py (Wan's preview factors live there); it only imports torch."""
    loaded = sys.modules.get("comfy.latent_formats")
    if loaded is not None:
        return loaded
    name = "_dcb_comfy_latent_formats"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, install_host.comfyui_path() / "comfy" / "latent_formats.py")
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


def comparison_png(runs: list, path: Path, settings: DemoSettings, title: str, notes: tuple[str, ...] = (),
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
        return [layer_value(report, key, layer) for layer in layers]

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


def layer_value(report: dict, key: str, layer) -> float:
    """A per-layer value of the report; JSON turned the layer keys into strings."""
    values = report.get(key) or {}
    return float(values.get(str(layer), values.get(layer, 0.0)))
