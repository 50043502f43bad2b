"""Does a trained projector let a text-to-video receiver use what an image-to-video sharer knows?

A miniature of the Wan2.1 T2V + ChronoEdit pair, small enough for two CPU cores:

- data: synthetic latent videos (16 channels, 3 latent frames of 8 x 8) of coloured squares moving
  over a coloured background. The text (a fixed stand-in embedding per class) names only the motion
  direction; the colours, sizes and positions are random, so they are known only from the first frame.
- receiver: tiny Wan2.1 T2V (dim 256, 2 layers), trained here on text -> video;
- sharer: tiny Wan2.1 I2V (same width and depth, 36 input channels), trained here on text + first
  frame -> video, the way ChronoEdit / Wan I2V see their input image (concat latent + mask);
- then, with both frozen: projectors trained with the pack's trainer (velocity loss, held-out data
  for every number reported), training-free weighted fusion and plain weight merging
  (ComfyUI's ModelMergeSimple) at its best ratio on a validation split.

Metrics on held-out videos: velocity MSE of the flow-matching target averaged over a fixed grid of
noise levels, and the PSNR of the first frame of videos sampled with the stock KSampler (euler,
cfg 1) through the real bridge nodes (Capture KV Cache -> Fuse Caches).

Run through ``experiments/run_miniature.py``; this module is the per-seed pipeline.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

FRAMES, SIZE, CHANNELS, TEXT_TOKENS, DIRECTIONS = 3, 8, 16, 4, 4
SHIFT = 3.0                     # ModelSamplingSD3 shift of both models (training and sampling)
EVAL_T = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.95)   # noise levels t (sigma = shift(t)) of the velocity MSE


@dataclass
class Settings:
    """Sizes of one run; the defaults take about 7 minutes per seed on one CPU thread."""
    train_videos: int = 512
    val_videos: int = 32
    test_videos: int = 64
    base_steps: int = 500
    base_batch: int = 16
    base_lr: float = 5e-4
    projector_steps: int = 900
    projector_batch: int = 8
    projector_lr: float = 1e-3
    projector_hidden: int = 256
    sample_steps: int = 12
    sample_videos: int = 16
    kinds: tuple = ("gating", "full", "c2c")
    alphas: tuple = (0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0)
    merge_ratios: tuple = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
    reuse_base: bool = False     # load the seed's saved base models (same settings) instead of training them

    @classmethod
    def demo(cls) -> "Settings":
        """What ``make demo`` trains once (tools/make_demo_assets.py): seed 0's models and c2c projector."""
        return cls(kinds=("c2c",))

    @classmethod
    def quick(cls) -> "Settings":
        """A smoke-test size (about a minute): the pipeline runs, the numbers mean little."""
        return cls(train_videos=64, val_videos=8, test_videos=16, base_steps=20, projector_steps=10, sample_steps=3,
                   sample_videos=4, kinds=("c2c",), alphas=(0.5,), merge_ratios=(1.0, 0.5))


# ------------------------------------------------------------------------------------------------
# ComfyUI and the pack, set up as tools/train_projector.py does
# ------------------------------------------------------------------------------------------------
def load_cli():
    spec = importlib.util.spec_from_file_location("_dcb_train_projector", REPO_ROOT / "tools" / "train_projector.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def setup():
    cli = load_cli()
    cli.setup_comfyui(cpu=True, local_rank=0)
    training, nodes = cli.import_pack()
    return training, nodes


def tiny_model_path(name: str) -> Path:
    """The tiny seeded checkpoint (made by tools/make_tiny_models.py if missing) the base models start from."""
    path = REPO_ROOT / ".models" / "diffusion_models" / f"{name}.safetensors"
    if not path.is_file():
        import subprocess
        subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_tiny_models.py"), "--only", name], check=True)
    return path


# ------------------------------------------------------------------------------------------------
# Data: moving squares; the text knows the direction, only the first frame knows the appearance
# ------------------------------------------------------------------------------------------------
DIRECTION_STEPS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def make_videos(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(videos (count, 16, 3, 8, 8) in model space, direction classes (count,))."""
    g = torch.Generator().manual_seed(seed)
    videos = torch.empty(count, CHANNELS, FRAMES, SIZE, SIZE)
    classes = torch.randint(0, DIRECTIONS, (count,), generator=g)
    for i in range(count):
        background = 0.4 * torch.randn(CHANNELS, 1, 1, generator=g)
        layer = torch.zeros(CHANNELS, SIZE, SIZE)
        mask = torch.zeros(1, SIZE, SIZE)
        for _ in range(2):
            side = int(torch.randint(2, 4, (1,), generator=g))
            y, x = torch.randint(0, SIZE - side + 1, (2,), generator=g).tolist()
            colour = torch.randn(CHANNELS, 1, 1, generator=g)
            layer[:, y:y + side, x:x + side] = colour
            mask[:, y:y + side, x:x + side] = 1.0
        dy, dx = DIRECTION_STEPS[int(classes[i])]
        for t in range(FRAMES):
            shifted = torch.roll(layer, shifts=(t * dy, t * dx), dims=(1, 2))
            shifted_mask = torch.roll(mask, shifts=(t * dy, t * dx), dims=(1, 2))
            videos[i, :, t] = shifted * shifted_mask + background * (1 - shifted_mask)
    return videos, classes


def text_embeddings(seed: int = 0) -> torch.Tensor:
    """(directions + 1, tokens, 4096) stand-in umT5 embeddings: one per direction, the last is the negative."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(DIRECTIONS + 1, TEXT_TOKENS, 4096, generator=g)


def conditionings(videos_latent: torch.Tensor, classes: torch.Tensor, texts: torch.Tensor) -> dict:
    """The four CONDITIONINGs of a batch, as ComfyUI nodes make them (text for both, image for the sharer).

    videos_latent is in the VAE's latent space (what a LATENT holds); the sharer's image latent is
    the first frame followed by zeros, with concat_mask 0 on the known frame (WanImageToVideo's layout).
    """
    n = videos_latent.shape[0]
    text = texts[classes]
    negative = texts[DIRECTIONS:].expand(n, -1, -1).clone()
    image = torch.zeros_like(videos_latent)
    image[:, :, :1] = videos_latent[:, :, :1]
    mask = torch.ones(1, 1, FRAMES, SIZE, SIZE)
    mask[:, :, :1] = 0.0
    extras = {"concat_latent_image": image, "concat_mask": mask}
    return {"receiver_positive": [[text, {}]], "receiver_negative": [[negative, {}]],
            "sharer_positive": [[text, dict(extras)]], "sharer_negative": [[negative, dict(extras)]]}


# ------------------------------------------------------------------------------------------------
# Base models: trained here with plain flow matching on the data above
# ------------------------------------------------------------------------------------------------
def with_shift(model):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    return ModelSamplingSD3().patch(model, SHIFT)[0]


def model_kwargs(training, patcher, conditioning, x0):
    """apply_model keyword tensors for a batch (the sampler's own conditioning encoding)."""
    conds = training.encode_conditioning(patcher, conditioning, x0, "positive", patcher.load_device)
    return {k: c.cond for k, c in conds.items()}


def sigma_of(model_sampling, t: torch.Tensor) -> torch.Tensor:
    return torch.tensor([float(model_sampling.percent_to_sigma(1.0 - float(v))) for v in t], dtype=torch.float32)


def train_base(training, patcher, videos, classes, texts, role: str, settings: Settings, seed: int, log,
               conditioner=None) -> list:
    """Flow-matching training of a whole tiny Wan model (``role`` 'receiver' or 'sharer' picks its inputs from
    ``conditioner``, by default :func:`conditionings`)."""
    conditioner = conditioner or conditionings
    model = patcher.model
    ms = patcher.get_model_object("model_sampling")
    params = [p for p in model.diffusion_model.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.base_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed * 7919 + (1 if role == "sharer" else 0))
    latents = model.process_latent_out(videos)
    losses = []
    raw = {}

    def keep(executor, *args, **kwargs):
        raw["v"] = executor(*args, **kwargs)
        return raw["v"]

    import comfy.patcher_extension
    from dit_cache_bridge.c2c_comfy import compat
    options = {"wrappers": {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"experiment": [keep]}}}
    model.train()
    with compat.training_mode():        # the pack trainer's switch: differentiable RoPE on hosts that need it
        compat.check_rope_gradient()
        for step in range(settings.base_steps):
            warmup = min(1.0, (step + 1) / 20)
            lr = settings.base_lr * warmup * 0.5 * (1 + math.cos(math.pi * step / settings.base_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = torch.randint(0, videos.shape[0], (settings.base_batch,), generator=g)
            x0 = videos[idx]
            noise = torch.randn(x0.shape, generator=g)
            sigma = sigma_of(ms, torch.rand(settings.base_batch, generator=g))
            x_t = ms.noise_scaling(sigma, noise, x0)
            cond = conditioner(latents[idx], classes[idx], texts)[f"{role}_positive"]
            kwargs = model_kwargs(training, patcher, cond, x0)
            model.apply_model(x_t, sigma, transformer_options=options, **kwargs)
            loss = torch.nn.functional.mse_loss(raw["v"].float(), noise - x0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if (step + 1) % max(1, settings.base_steps // 5) == 0:
                recent = losses[-20:]
                log(f"  {role} base step {step + 1}/{settings.base_steps} loss {sum(recent) / len(recent):.4f}")
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return losses


def save_model(patcher, path: Path) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}, str(path))


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def eval_batches(training, pair, videos, classes, texts, seed: int, batch: int = 16):
    """Fixed held-out TrainBatches: every video at every noise level of EVAL_T, same noise for every method."""
    ms = pair.receiver.get_model_object("model_sampling")
    latents = pair.receiver.model.process_latent_out(videos)
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in EVAL_T:
        noise_all = torch.randn(videos.shape, generator=g)
        for start in range(0, videos.shape[0], batch):
            sl = slice(start, start + batch)
            x0, noise = videos[sl], noise_all[sl]
            conds = conditionings(latents[sl], classes[sl], texts)
            sigma = torch.full((x0.shape[0],), float(ms.percent_to_sigma(1.0 - t)))
            device = pair.device
            rc = training.encode_conditioning(pair.receiver, conds["receiver_positive"], x0, "positive", device)
            sc = training.encode_conditioning(pair.sharer, conds["sharer_positive"], x0, "positive", device)
            out.append((t, training.TrainBatch(x0, noise, sigma, {k: c.cond for k, c in rc.items()},
                                               {k: c.cond for k, c in sc.items()}, [0] * x0.shape[0])))
    return out


def velocity_mse(training, sharer, receiver, bundle, videos, classes, texts, seed, strength=1.0, use_sharer=False):
    """Mean velocity MSE over EVAL_T (and per t) of the bridged receiver (or the sharer itself)."""
    from c2c_core.train import trainable_copy

    with torch.inference_mode(False), torch.no_grad():
        bank = trainable_copy(bundle).eval()
        pair = training.TrainingPair(sharer, receiver, bank, bundle.layer_map, strength)
        per_t: dict[float, list[float]] = {}
        with pair.session():
            for t, b in eval_batches(training, pair, videos, classes, texts, seed):
                prediction, target, teacher = pair.velocity(b, keep_teacher=use_sharer)
                value = torch.nn.functional.mse_loss(teacher if use_sharer else prediction, target)
                per_t.setdefault(t, []).append(float(value) * b.x0.shape[0])
    n = videos.shape[0]
    curve = {t: sum(v) / n for t, v in per_t.items()}
    return sum(curve.values()) / len(curve), curve


def first_frame_psnr(nodes, model, positive, negative, videos, seed, steps, peak) -> float:
    """Sample with the stock KSampler (euler, cfg 1) and compare the first frame with the truth."""
    import nodes as comfy_nodes
    latent = {"samples": torch.zeros(videos.shape[0], CHANNELS, FRAMES, SIZE, SIZE)}
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, 1.0, "euler", "simple", positive, negative, latent)
    sampled = model.model.process_latent_in(out["samples"])
    mse = torch.mean((sampled[:, :, 0] - videos[:, :, 0]) ** 2, dim=(1, 2, 3))
    return float(torch.mean(10 * torch.log10(peak ** 2 / mse.clamp_min(1e-12))))


# ------------------------------------------------------------------------------------------------
# Steps shared by the experiment (run_seed) and the demo's assets (make_demo_assets)
# ------------------------------------------------------------------------------------------------
def train_pair(training, videos, classes, texts, settings: Settings, seed: int, receiver_path: Path,
               sharer_path: Path, log=print):
    """Train the tiny receiver and sharer from their seeded tiny checkpoints, save them, reload them.

    Returns (receiver, sharer, final loss by role): fresh patchers of the saved files (what a user
    would load with UNETLoader), with the ModelSamplingSD3 shift of the experiment.
    """
    import comfy.sd

    receiver = with_shift(comfy.sd.load_diffusion_model(str(tiny_model_path("tiny_wan_t2v_a"))))
    sharer = with_shift(comfy.sd.load_diffusion_model(str(tiny_model_path("tiny_wan_i2v"))))
    torch.manual_seed(seed)
    final_loss = {}
    for role, patcher, path in (("receiver", receiver, receiver_path), ("sharer", sharer, sharer_path)):
        losses = train_base(training, patcher, videos, classes, texts, role, settings, seed, log)
        final_loss[role] = sum(losses[-50:]) / len(losses[-50:])
        save_model(patcher, path)
    receiver = with_shift(comfy.sd.load_diffusion_model(str(receiver_path)))
    sharer = with_shift(comfy.sd.load_diffusion_model(str(sharer_path)))
    return receiver, sharer, final_loss


def save_samples(training, receiver, videos, classes, texts, folder: Path, conditioner=None):
    """The projector's training data as the pack's sample files (emptied first); returns the TrainingSet."""
    conditioner = conditioner or conditionings
    folder = Path(folder)
    if folder.exists():
        for p in folder.iterdir():
            p.unlink()
    latents = receiver.model.process_latent_out(videos)
    for start in range(0, videos.shape[0], 64):
        sl = slice(start, start + 64)
        training.save_training_samples(folder, latents[sl], conditioner(latents[sl], classes[sl], texts))
    return training.open_training_set(folder)


def train_and_save_projector(training, sharer, receiver, fresh, dataset, settings: Settings, seed: int, path: Path):
    """Train ``fresh`` (a projector bundle) with the pack's trainer, velocity loss; save it to ``path``."""
    from c2c_core import save_bundle
    from c2c_core.train import TrainSettings

    train_settings = TrainSettings(loss="velocity", steps=settings.projector_steps, batch_size=settings.projector_batch,
                                   lr=settings.projector_lr, warmup_steps=min(20, settings.projector_steps // 5),
                                   checkpoint_every=0, seed=seed, negative_share=0.0)
    outcome = training.train_projector(sharer, receiver, fresh, dataset, train_settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_bundle(path, outcome.bundle.bank, outcome.bundle.layer_map, outcome.bundle.provenance)
    return outcome.bundle


# ------------------------------------------------------------------------------------------------
# One seed, end to end
# ------------------------------------------------------------------------------------------------
@dataclass
class SeedResult:
    seed: int
    mse: dict = field(default_factory=dict)          # method -> mean velocity MSE (test)
    mse_curve: dict = field(default_factory=dict)    # method -> {t: MSE}
    psnr: dict = field(default_factory=dict)         # method -> first-frame PSNR (dB) of sampled videos
    chosen: dict = field(default_factory=dict)       # weighted alpha, merge ratio picked on validation
    alpha_gap: dict = field(default_factory=dict)    # weighted alpha -> gap closed on validation (the choice's view)
    seconds: dict = field(default_factory=dict)      # wall time per phase
    base_loss: dict = field(default_factory=dict)


def run_seed(seed: int, settings: Settings, out_dir: Path, log=print) -> SeedResult:
    torch.set_num_threads(1)
    training, nodes = setup()

    result = SeedResult(seed)
    clock = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = text_embeddings(0)
    train_v, train_c = make_videos(settings.train_videos, 1000 * seed + 1)
    val_v, val_c = make_videos(settings.val_videos, 1000 * seed + 2)
    test_v, test_c = make_videos(settings.test_videos, 1000 * seed + 3)
    peak = float(test_v.max() - test_v.min())

    # 1. base models (or the ones a previous run of this seed saved, with their final losses)
    if settings.reuse_base:
        import comfy.sd
        receiver, sharer = (with_shift(comfy.sd.load_diffusion_model(str(out_dir / f"{role}.safetensors")))
                            for role in ("receiver", "sharer"))
        saved = out_dir / "base_loss.json"
        result.base_loss = json.loads(saved.read_text()) if saved.is_file() else {}
    else:
        receiver, sharer, result.base_loss = train_pair(training, train_v, train_c, texts, settings, seed,
                                                        out_dir / "receiver.safetensors",
                                                        out_dir / "sharer.safetensors", log)
        (out_dir / "base_loss.json").write_text(json.dumps(result.base_loss))
    result.seconds["base models"] = time.monotonic() - clock

    # 2. training samples for the projectors (the pack's sample files)
    clock = time.monotonic()
    dataset = save_samples(training, receiver, train_v, train_c, texts, out_dir / "samples")

    def projector(kind, **hp):
        mapping = "identity"
        with torch.inference_mode(False):
            torch.manual_seed(seed)
            return nodes.CreateC2CProjector.execute(sharer, receiver, kind, mapping, "all", hp.get("alpha", 0.5),
                                                    hp.get("hidden_dim", 0), seed).args[0]

    evaluate = lambda bundle, v, c, **kw: velocity_mse(training, sharer, receiver, bundle, v, c, texts,  # noqa: E731
                                                      seed=99 + seed, **kw)
    identity = projector("identity")
    result.mse["receiver alone"], result.mse_curve["receiver alone"] = evaluate(identity, test_v, test_c, strength=0.0)
    result.mse["sharer alone"], result.mse_curve["sharer alone"] = evaluate(identity, test_v, test_c, use_sharer=True)

    # 3. training-free weighted fusion, alpha chosen on validation
    val_scores = {a: evaluate(projector("weighted", alpha=a) if a < 1.0 else identity, val_v, val_c)[0]
                  for a in settings.alphas}
    val_receiver = evaluate(identity, val_v, val_c, strength=0.0)[0]
    val_sharer = evaluate(identity, val_v, val_c, use_sharer=True)[0]
    result.alpha_gap = {a: (val_receiver - m) / (val_receiver - val_sharer) for a, m in val_scores.items()}
    alpha = min(val_scores, key=val_scores.get)
    result.chosen["weighted alpha"] = alpha
    weighted = projector("weighted", alpha=alpha) if alpha < 1.0 else identity
    result.mse["weighted fusion"], result.mse_curve["weighted fusion"] = evaluate(weighted, test_v, test_c)

    # 4. weight merging (ModelMergeSimple), ratio chosen on validation
    from comfy_extras.nodes_model_merging import ModelMergeSimple
    merged = {r: ModelMergeSimple().merge(receiver, sharer, r)[0] for r in settings.merge_ratios}
    merge_scores = {r: velocity_mse(training, sharer, m, identity, val_v, val_c, texts, 99 + seed, strength=0.0)[0]
                    for r, m in merged.items()}
    ratio = min(merge_scores, key=merge_scores.get)
    result.chosen["merge ratio (receiver share)"] = ratio
    result.mse["weight merge"], result.mse_curve["weight merge"] = velocity_mse(
        training, sharer, merged[ratio], identity, test_v, test_c, texts, 99 + seed, strength=0.0)
    result.seconds["baselines"] = time.monotonic() - clock

    # 5. trained projectors
    trained = {}
    for kind in settings.kinds:
        clock = time.monotonic()
        fresh = projector(kind, hidden_dim=settings.projector_hidden)
        trained[kind] = train_and_save_projector(training, sharer, receiver, fresh, dataset, settings, seed,
                                                 out_dir / f"projector_{kind}.safetensors")
        name = f"{kind} projector (trained)"
        result.mse[name], result.mse_curve[name] = evaluate(trained[kind], test_v, test_c)
        result.seconds[f"train {kind}"] = time.monotonic() - clock
        log(f"  seed {seed}: {name} MSE {result.mse[name]:.4f} "
            f"(receiver {result.mse['receiver alone']:.4f}, sharer {result.mse['sharer alone']:.4f})")

    # 6. first-frame PSNR of sampled videos (stock KSampler through the bridge nodes)
    clock = time.monotonic()
    n = settings.sample_videos
    sv, sc = test_v[:n], test_c[:n]
    conds = conditionings(receiver.model.process_latent_out(sv), sc, texts)
    rp, rn, sp, sn = (conds[k] for k in ("receiver_positive", "receiver_negative", "sharer_positive",
                                          "sharer_negative"))
    sample_seed = 5000 + seed
    steps = settings.sample_steps

    def bridged(bundle):
        src = nodes.CaptureKVCache.execute(sharer=sharer, positive=sp, negative=sn).args[0]
        return nodes.FuseCaches.execute(model=receiver, kv_source=src, projector=bundle, strength=1.0,
                                        start_percent=0.0, end_percent=1.0).args[0]

    with torch.inference_mode():
        result.psnr["receiver alone"] = first_frame_psnr(nodes, receiver, rp, rn, sv, sample_seed, steps, peak)
        result.psnr["sharer alone"] = first_frame_psnr(nodes, sharer, sp, sn, sv, sample_seed, steps, peak)
        result.psnr["weighted fusion"] = first_frame_psnr(nodes, bridged(weighted), rp, rn, sv, sample_seed, steps, peak)
        result.psnr["weight merge"] = first_frame_psnr(nodes, merged[ratio], rp, rn, sv, sample_seed, steps, peak)
        for kind, bundle in trained.items():
            result.psnr[f"{kind} projector (trained)"] = first_frame_psnr(nodes, bridged(bundle), rp, rn, sv,
                                                                          sample_seed, steps, peak)
    result.seconds["sampling"] = time.monotonic() - clock
    (out_dir / "result.json").write_text(json.dumps(result.__dict__, indent=1, default=str))
    return result



# ------------------------------------------------------------------------------------------------
# The demo's embedded default: the pair and a c2c projector of one seed (tools/make_demo_assets.py)
# ------------------------------------------------------------------------------------------------
DEMO_FILES = {"receiver": "demo_wan_t2v_receiver.safetensors", "sharer": "demo_wan_i2v_sharer.safetensors",
              "projector": "demo_c2c_projector.safetensors"}


def demo_test_videos(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out videos of ``seed`` (the experiment's test split): (videos (count, 16, 3, 8, 8), classes)."""
    return make_videos(count, 1000 * seed + 3)


def make_demo_assets(out_dir: Path, settings: Settings, seed: int = 0, threads: int = 2, log=print) -> dict:
    """Train the tiny pair and a c2c projector exactly as ``run_seed(seed)`` does; no evaluation.

    Writes ``DEMO_FILES`` (UNETLoader-loadable diffusion models and a projector bundle) into
    ``out_dir``; the training-sample folder is deleted afterwards. Returns the paths by role and the
    wall time and final base-model losses.
    """
    import shutil

    torch.set_num_threads(threads)
    training, nodes = setup()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {role: out_dir / name for role, name in DEMO_FILES.items()}
    clock = time.monotonic()
    texts = text_embeddings(0)
    train_v, train_c = make_videos(settings.train_videos, 1000 * seed + 1)
    receiver, sharer, base_loss = train_pair(training, train_v, train_c, texts, settings, seed, paths["receiver"],
                                             paths["sharer"], log)
    seconds = {"base models": time.monotonic() - clock}
    clock = time.monotonic()
    folder = out_dir / "samples"
    dataset = save_samples(training, receiver, train_v, train_c, texts, folder)
    with torch.inference_mode(False):
        torch.manual_seed(seed)
        fresh = nodes.CreateC2CProjector.execute(sharer, receiver, "c2c", "identity", "all", 0.5,
                                                 settings.projector_hidden, seed).args[0]
    log(f"  c2c projector: {settings.projector_steps} steps ...")
    train_and_save_projector(training, sharer, receiver, fresh, dataset, settings, seed, paths["projector"])
    shutil.rmtree(folder)
    seconds["c2c projector"] = time.monotonic() - clock
    return {"paths": paths, "seconds": seconds, "base_loss": base_loss}
