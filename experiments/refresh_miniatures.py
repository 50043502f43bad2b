"""The two miniatures of the refresh frontier (experiments/run_refresh.py): trained pairs and their quality.

- **still**: the evidence experiment's pair (``miniature.py``, seed 0, the demo's recipe): a T2V receiver
  that knows the motion direction from its text, an I2V sharer that also sees the first frame. The
  sharer's knowledge (the first frame's colours, sizes and positions) is fixed before sampling starts:
  its K/V from step 0 already carry it. Quality: first-frame PSNR against the true first frame.
- **motion**: the same videos, but the receiver's text says nothing (one embedding for every video) and
  the sharer is a T2V model whose text names the direction. What the sharer knows is *where the squares
  go next*, which it can only say about squares that exist: the positions are drawn by the sampler, so
  its useful K/V follow the sample as it forms (fresh K/V matter). Quality: motion PSNR, frames 1 and 2
  of the sample against its own frame 0 moved by the true direction (the data's videos are exactly
  that, ``torch.roll`` of frame 0), so a receiver that blurs over directions scores low.

Both pairs are trained once into ``<out>/<name>/`` (stamped, reused by later runs) with the settings of
``miniature.Settings()``: 500 base steps per model, a c2c projector of 900 steps.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import miniature as mini

PAIRS = ("still", "motion")
FILES = {"receiver": "receiver.safetensors", "sharer": "sharer.safetensors", "projector": "projector_c2c.safetensors"}
STAMP_VERSION = 1


def motion_conditionings(videos_latent: torch.Tensor, classes: torch.Tensor, texts: torch.Tensor) -> dict:
    """The motion pair's CONDITIONINGs: the receiver's text is the empty one, the sharer's names the direction."""
    n = videos_latent.shape[0]
    empty = texts[mini.DIRECTIONS:].expand(n, -1, -1).clone()
    return {"receiver_positive": [[empty, {}]], "receiver_negative": [[empty.clone(), {}]],
            "sharer_positive": [[texts[classes], {}]], "sharer_negative": [[empty.clone(), {}]]}


CONDITIONER = {"still": mini.conditionings, "motion": motion_conditionings}
STARTS = {"still": ("tiny_wan_t2v_a", "tiny_wan_i2v"), "motion": ("tiny_wan_t2v_b", "tiny_wan_t2v_a")}


def _stamp(name: str, settings: mini.Settings, seed: int) -> dict:
    from dataclasses import asdict
    return {"version": STAMP_VERSION, "pair": name, "seed": seed, "settings": asdict(settings)}


def prepare(name: str, out: Path, settings: mini.Settings, seed: int = 0, log=print) -> dict:
    """Train ``name``'s pair and c2c projector into ``out/name`` unless a matching stamp says they are there."""
    folder = Path(out) / name
    paths = {role: folder / file for role, file in FILES.items()}
    stamp_path = folder / "stamp.json"
    wanted = _stamp(name, settings, seed)
    if stamp_path.is_file():
        stamp = json.loads(stamp_path.read_text())
        if {k: stamp.get(k) for k in wanted} == wanted and all(p.is_file() for p in paths.values()):
            return paths
    training, nodes = mini.setup()
    import comfy.sd
    folder.mkdir(parents=True, exist_ok=True)
    clock = time.monotonic()
    conditioner = CONDITIONER[name]
    texts = mini.text_embeddings(0)
    videos, classes = mini.make_videos(settings.train_videos, 1000 * seed + 1)
    receiver_start, sharer_start = STARTS[name]
    receiver = mini.with_shift(comfy.sd.load_diffusion_model(str(mini.tiny_model_path(receiver_start))))
    sharer = mini.with_shift(comfy.sd.load_diffusion_model(str(mini.tiny_model_path(sharer_start))))
    torch.manual_seed(seed)
    loss = {}
    for role, patcher in (("receiver", receiver), ("sharer", sharer)):
        losses = mini.train_base(training, patcher, videos, classes, texts, role, settings, seed,
                                 lambda m: log(f"[{name}] {m}"), conditioner=conditioner)
        loss[role] = sum(losses[-50:]) / len(losses[-50:])
        mini.save_model(patcher, paths[role])
    receiver, sharer = (mini.with_shift(comfy.sd.load_diffusion_model(str(paths[r]))) for r in ("receiver", "sharer"))
    base_seconds = time.monotonic() - clock
    dataset = mini.save_samples(training, receiver, videos, classes, texts, folder / "samples", conditioner)
    with torch.inference_mode(False):
        torch.manual_seed(seed)
        fresh = nodes.CreateC2CProjector.execute(sharer, receiver, "c2c", "identity", "all", 0.5,
                                                 settings.projector_hidden, seed).args[0]
    log(f"[{name}] c2c projector: {settings.projector_steps} steps ...")
    mini.train_and_save_projector(training, sharer, receiver, fresh, dataset, settings, seed, paths["projector"])
    import shutil
    shutil.rmtree(folder / "samples")
    stamp_path.write_text(json.dumps({**wanted, "base_loss": loss, "seconds": {
        "base models": base_seconds, "total": time.monotonic() - clock}}, indent=1))
    return paths


# ------------------------------------------------------------------------------------------------
# Quality of sampled videos
# ------------------------------------------------------------------------------------------------
def psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> torch.Tensor:
    """Per-video PSNR (dB) over every dimension but the first."""
    mse = torch.mean((a - b) ** 2, dim=tuple(range(1, a.dim())))
    return 10 * torch.log10(peak ** 2 / mse.clamp_min(1e-12))


def quality(name: str, sampled: torch.Tensor, videos: torch.Tensor, classes: torch.Tensor, peak: float) -> torch.Tensor:
    """Per-video quality of sampled model-space videos: still = first-frame PSNR, motion = motion PSNR."""
    if name == "still":
        return psnr(sampled[:, :, 0], videos[:, :, 0], peak)
    moved = torch.stack([torch.stack([torch.roll(sampled[i, :, 0], shifts=(t * dy, t * dx), dims=(1, 2))
                                      for t in range(1, mini.FRAMES)], dim=1)
                         for i, (dy, dx) in enumerate(mini.DIRECTION_STEPS[int(c)] for c in classes)])
    return psnr(sampled[:, :, 1:], moved, peak)
