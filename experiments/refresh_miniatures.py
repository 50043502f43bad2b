"""The three miniatures of the refresh frontier (experiments/run_refresh.py): trained pairs and their quality.

- **still**: the evidence experiment's pair (``miniature.py``, seed 0, the demo's recipe): a T2V receiver
  that knows the motion direction from its text, an I2V sharer that also sees the first frame. The
  sharer's knowledge (the first frame's colours, sizes and positions) is fixed before sampling starts:
  its K/V from step 0 already carry it. Task: generate (denoise 1); quality: first-frame PSNR against
  the true first frame.
- **denoise**: both models see the same text (the direction) and nothing else; the sharer is the still
  pair's trained T2V model (500 steps), the receiver the same architecture trained only 100 steps from
  another seed checkpoint: the sharer knows what the videos look like, the receiver hardly. What the
  sharer adds is about the current sample, so fresh K/V were expected to matter (they did not: on a
  deterministic sampler the step-0 latent already determines the answer). Task: restore held-out videos
  from partial noise (img2img, denoise 0.6, as a refine pass samples); quality: PSNR of the whole
  restored video against the truth. Its c2c projector: the still pair's recipe (900 steps).
- **rule**: the sharer knows a rule that ties one part of the sample to another, so what it adds depends on
  what the sample has become. Its data are the same videos with channels 8-15 of every pixel replaced by a
  fixed orthogonal map of channels 0-7 (``RULE``); it is a T2V model trained on them (500 steps, from the
  other seed checkpoint). The receiver is the still pair's trained T2V receiver, whose data had all 16
  channels independent: it paints channels 8-15 with colours of their own. Both see only the direction's
  text, and they generate (denoise 1) with euler_ancestral: fresh noise at every step decides the colours
  along the way, so no step's K/V know what a later step will need. Quality: the sample's rule SNR
  (``rule_snr``). Its projector: ``full`` (what it adds is a function of the sharer's K/V alone; c2c's trunk
  also reads the receiver's K/V and learns part of the rule itself), the still pair's recipe with 450
  steps instead of 900, trained on the rule's videos.

Pairs are trained once into ``<out>/<name>/`` (stamped, reused by later runs). A pair may borrow a trained model
of another pair (``BORROWED``) instead of training its own.

(Candidates dropped after one check each, see experiments/README.md: *motion* (an empty-text receiver, a
sharer that knows the direction: neither tiny model learns motion in 500 steps) and *blind* (the denoise task
with a receiver that cannot read channels 8-15: every 12 kept 104 % of the gain).)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import miniature as mini

PAIRS = ("still", "denoise", "rule")
STAMP_VERSION = 1


def text_only_conditionings(videos_latent: torch.Tensor, classes: torch.Tensor, texts: torch.Tensor) -> dict:
    """The denoise pair's CONDITIONINGs: both models get the direction's text, neither an image."""
    n = videos_latent.shape[0]
    text, negative = texts[classes], texts[mini.DIRECTIONS:].expand(n, -1, -1)
    return {"receiver_positive": [[text.clone(), {}]], "receiver_negative": [[negative.clone(), {}]],
            "sharer_positive": [[text.clone(), {}]], "sharer_negative": [[negative.clone(), {}]]}


CONDITIONER = {"still": mini.conditionings, "denoise": text_only_conditionings, "rule": text_only_conditionings}
STARTS = {"still": ("tiny_wan_t2v_a", "tiny_wan_i2v"), "denoise": ("tiny_wan_t2v_b", "tiny_wan_t2v_a"),
          "rule": ("tiny_wan_t2v_a", "tiny_wan_t2v_b")}
DENOISE = {"still": 1.0, "denoise": 0.6, "rule": 1.0}      # the sampler's denoise: generate, or restore from noise
SAMPLER = {"still": "euler", "denoise": "euler", "rule": "euler_ancestral"}    # rule: fresh noise each step
BORROWED = {"denoise": {"sharer": "receiver"}, "rule": {"receiver": "receiver"}}   # role: the still pair's model
RULE = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(19)))[0]    # orthogonal


def data(name: str, videos: torch.Tensor) -> torch.Tensor:
    """The pair's videos: the rule pair's have channels 8-15 of every pixel = RULE @ channels 0-7."""
    if name != "rule":
        return videos
    return torch.cat([videos[:, :8], torch.einsum("ij,bj...->bi...", RULE, videos[:, :8])], dim=1)


def settings_for(name: str) -> mini.Settings:
    """The still pair: the demo's recipe. The denoise pair: a weak receiver (100 steps), the same projector recipe.
    The rule pair: the demo's recipe with a 450-step full projector."""
    if name == "denoise":
        return mini.Settings(kinds=("c2c",), base_steps=100)
    if name == "rule":          # half the projector steps: trained on two crowded cores in the session that added it
        return mini.Settings(kinds=("full",), projector_steps=450)
    return mini.Settings.demo()


def _stamp(name: str, settings: mini.Settings, seed: int) -> dict:
    from dataclasses import asdict
    return {"version": STAMP_VERSION, "pair": name, "seed": seed, "settings": asdict(settings)}


def prepare(name: str, out: Path, settings: mini.Settings, seed: int = 0, log=print) -> dict:
    """Train ``name``'s pair and c2c projector into ``out/name`` unless a matching stamp says they are there."""
    folder = Path(out) / name
    kind = settings.kinds[0]            # the projector's kind
    paths = {"receiver": folder / "receiver.safetensors", "sharer": folder / "sharer.safetensors",
             "projector": folder / f"projector_{kind}.safetensors"}
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
    videos = data(name, videos)
    receiver_start, sharer_start = STARTS[name]
    receiver = mini.with_shift(comfy.sd.load_diffusion_model(str(mini.tiny_model_path(receiver_start))))
    sharer = mini.with_shift(comfy.sd.load_diffusion_model(str(mini.tiny_model_path(sharer_start))))
    torch.manual_seed(seed)
    loss = {}
    borrowed = BORROWED.get(name, {})
    for role, patcher in (("receiver", receiver), ("sharer", sharer)):
        if role in borrowed:        # a trained model of the still pair (whose data have no rule)
            import shutil
            shutil.copyfile(prepare("still", out, settings_for("still"), seed, log)[borrowed[role]], paths[role])
            continue
        losses = mini.train_base(training, patcher, videos, classes, texts, role, settings, seed,
                                 lambda m: log(f"[{name}] {m}"), conditioner=conditioner)
        loss[role] = sum(losses[-50:]) / len(losses[-50:])
        mini.save_model(patcher, paths[role])
    receiver, sharer = (mini.with_shift(comfy.sd.load_diffusion_model(str(paths[r]))) for r in ("receiver", "sharer"))
    base_seconds = time.monotonic() - clock
    dataset = mini.save_samples(training, receiver, videos, classes, texts, folder / "samples", conditioner)
    with torch.inference_mode(False):
        torch.manual_seed(seed)
        fresh = nodes.CreateC2CProjector.execute(sharer, receiver, kind, "identity", "all", 0.5,
                                                 settings.projector_hidden, seed).args[0]
    log(f"[{name}] {kind} projector: {settings.projector_steps} steps ...")
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


def rule_snr(sampled: torch.Tensor) -> torch.Tensor:
    """Per-video SNR (dB) of the rule in a sampled video: the energy of channels 8-15 and of what the rule says
    they should be (RULE @ channels 0-7), over the energy of their difference. Scale-free: independent colours
    score about 0 dB, and so do washed-out channels (a blur does not satisfy the rule)."""
    said, made = torch.einsum("ij,bj...->bi...", RULE, sampled[:, :8]), sampled[:, 8:]
    dims = tuple(range(1, sampled.dim()))
    energy = (said ** 2).sum(dims) + (made ** 2).sum(dims)
    return 10 * torch.log10(energy / ((made - said) ** 2).sum(dims).clamp_min(1e-12))


def quality(name: str, sampled: torch.Tensor, videos: torch.Tensor, classes: torch.Tensor, peak: float) -> torch.Tensor:
    """Per-video quality (dB) of sampled model-space videos: still = first-frame PSNR, denoise = whole-video PSNR,
    rule = the rule's SNR (no truth: the rule pair generates freely)."""
    if name == "still":
        return psnr(sampled[:, :, 0], videos[:, :, 0], peak)
    if name == "rule":
        return rule_snr(sampled)
    return psnr(sampled, videos, peak)
