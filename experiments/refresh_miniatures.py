"""The two miniatures of the refresh frontier (experiments/run_refresh.py): trained pairs and their quality.

- **still**: the evidence experiment's pair (``miniature.py``, seed 0, the demo's recipe): a T2V receiver
  that knows the motion direction from its text, an I2V sharer that also sees the first frame. The
  sharer's knowledge (the first frame's colours, sizes and positions) is fixed before sampling starts:
  its K/V from step 0 already carry it. Task: generate (denoise 1); quality: first-frame PSNR against
  the true first frame.
- **blind**: the denoise task with a receiver that cannot read half of its own latent: its patch embedding
  never sees channels 8-15 (their weights are zero and stay zero in training; 500 steps, the demo's recipe
  otherwise). The sharer is the still pair's trained T2V receiver, which reads every channel. What the
  sharer adds is the *current* state of the channels the receiver cannot see, which changes at every step:
  K/V from an earlier step describe a latent that is no longer there. Task and quality as denoise.
- **denoise**: both models see the same text (the direction) and nothing else; the sharer is the still
  pair's trained T2V model (500 steps), the receiver the same architecture trained only 100 steps from
  another seed checkpoint: the sharer knows what the videos look like, the receiver hardly. What the
  sharer adds is *about the current sample*, which changes at every step, so fresh K/V matter. Task:
  restore held-out videos from partial noise (img2img, denoise 0.6, as a refine pass samples); quality:
  PSNR of the whole restored video against the truth. Its c2c projector: the still pair's recipe
  (900 steps).

Pairs are trained once into ``<out>/<name>/`` (stamped, reused by later runs).

(An earlier second miniature, *motion* (an empty-text receiver, a sharer that knows the direction), was
dropped after one check: neither tiny model learns motion in 500 steps, so there was no gap to keep.)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import miniature as mini

PAIRS = ("still", "denoise", "blind")
FILES = {"receiver": "receiver.safetensors", "sharer": "sharer.safetensors", "projector": "projector_c2c.safetensors"}
STAMP_VERSION = 1


def text_only_conditionings(videos_latent: torch.Tensor, classes: torch.Tensor, texts: torch.Tensor) -> dict:
    """The denoise pair's CONDITIONINGs: both models get the direction's text, neither an image."""
    n = videos_latent.shape[0]
    text, negative = texts[classes], texts[mini.DIRECTIONS:].expand(n, -1, -1)
    return {"receiver_positive": [[text.clone(), {}]], "receiver_negative": [[negative.clone(), {}]],
            "sharer_positive": [[text.clone(), {}]], "sharer_negative": [[negative.clone(), {}]]}


CONDITIONER = {"still": mini.conditionings, "denoise": text_only_conditionings, "blind": text_only_conditionings}
STARTS = {"still": ("tiny_wan_t2v_a", "tiny_wan_i2v"), "denoise": ("tiny_wan_t2v_b", "tiny_wan_t2v_a"),
          "blind": ("tiny_wan_t2v_b", "tiny_wan_t2v_a")}
DENOISE = {"still": 1.0, "denoise": 0.6, "blind": 0.6}    # the sampler's denoise: generate, or restore from partial noise
BORROWED_SHARER = ("denoise", "blind")          # their sharer is the still pair's trained receiver (not trained again)
BLIND_CHANNELS = slice(8, mini.CHANNELS)        # latent channels the blind receiver's patch embedding never reads


def make_blind(patcher) -> torch.Tensor:
    """Zero the patch embedding's weights of BLIND_CHANNELS: the model cannot read those channels of its input
    latent. Returns the weight's mask (0 on those channels) for a gradient hook that keeps them zero in training."""
    weight = patcher.model.diffusion_model.patch_embedding.weight
    with torch.no_grad():
        weight[:, BLIND_CHANNELS] = 0.0
    mask = torch.ones_like(weight)
    mask[:, BLIND_CHANNELS] = 0.0
    return mask


def settings_for(name: str) -> mini.Settings:
    """The still and blind pairs: the demo's recipe. The denoise pair: a weak receiver (100 steps), the same projector
    recipe."""
    if name == "denoise":
        return mini.Settings(kinds=("c2c",), base_steps=100)
    return mini.Settings.demo()


def _stamp(name: str, settings: mini.Settings, seed: int) -> dict:
    from dataclasses import asdict
    return {"version": STAMP_VERSION, "pair": name, "seed": seed, "settings": asdict(settings)}


def prepare(name: str, out: Path, settings: mini.Settings, seed: int = 0, log=print) -> dict:
    """Train ``name``'s pair and c2c projector into ``out/name`` unless a matching stamp says they are there."""
    folder = Path(out) / name
    paths = {role: folder / file for role, file in FILES.items()}
    stamp_path = folder / "stamp.json"
    wanted = json.loads(json.dumps(_stamp(name, settings, seed)))      # as the stamp file reads back (lists)
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
    roles = (("receiver", receiver),) if name in BORROWED_SHARER else (("receiver", receiver), ("sharer", sharer))
    if name == "blind":         # AdamW without weight decay leaves a weight whose gradient is 0 where it is
        mask = make_blind(receiver)
        receiver.model.diffusion_model.patch_embedding.weight.requires_grad_(True)
        receiver.model.diffusion_model.patch_embedding.weight.register_hook(lambda grad: grad * mask)
    for role, patcher in roles:
        losses = mini.train_base(training, patcher, videos, classes, texts, role, settings, seed,
                                 lambda m: log(f"[{name}] {m}"), conditioner=conditioner)
        loss[role] = sum(losses[-50:]) / len(losses[-50:])
        mini.save_model(patcher, paths[role])
    if name == "blind":
        assert not patcher.model.diffusion_model.patch_embedding.weight[:, BLIND_CHANNELS].any(), "blindness leaked"
    if name in BORROWED_SHARER:     # the sharer is the still pair's trained receiver: a T2V model that knows the data
        import shutil
        shutil.copyfile(prepare("still", out, settings_for("still"), seed, log)["receiver"], paths["sharer"])
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
    """Per-video quality (dB) of sampled model-space videos: still = first-frame PSNR, denoise and blind =
    whole-video PSNR."""
    if name == "still":
        return psnr(sampled[:, :, 0], videos[:, :, 0], peak)
    return psnr(sampled, videos, peak)
