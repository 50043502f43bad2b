"""Projector training on a ComfyUI Wan pair: the host glue around c2c_core's samples and loop.

One implementation serves the Train C2C Projector node and ``tools/train_projector.py``; both call
:func:`train_projector`. c2c_core holds the math (projectors, ``FusionRun``, loss builders), the sample
files and their seeded draws (``c2c_core.samples``) and the loop with checkpoints and torchrun
(``c2c_core.train.run_training``); this module converts CONDITIONING to and from sample tensors and runs
the bridged training forward on ComfyUI models, reaching ComfyUI only through ``compat``.

What is predicted. Wan is a flow model in ComfyUI: a clean latent x0 (after ``process_latent_in``)
is noised as ``x_t = sigma * noise + (1 - sigma) * x0``, the diffusion model outputs the velocity v,
and ``apply_model`` returns ``denoised = x_t - sigma * v``. Training works in velocity space on the
diffusion model's *raw* output (``compat.diffusion_model_output``), never re-derived from ``denoised``
(which would divide by a small sigma). The velocity target is ``noise - x0``; the distillation teacher
is the sharer's raw velocity on the same x_t, sigma and its own conditioning.

One training forward (:class:`TrainingPair`):
  1. the sharer runs under ``no_grad``; a self-attention hook records the K/V of the sharer layers
     the layer map reads (it stops after the last one unless the sharer's prediction is needed);
  2. the receiver runs with grad; its hook fuses the recorded sharer K/V into its own through
     ``c2c_core.runtime.FusionRun.fuse`` -- the one fusion path inference uses (keys re-rotated to the
     receiver's RoPE positions as with rope_alignment "auto", projected, blended at strength 1) --
     with the trainable bank used in place (never a placed copy), so gradients reach the projector
     bank and nothing else, and what is trained is exactly what the bridge runs.

Models are never changed: both are cloned, hooks live on the clones, the clones are what ComfyUI
loads. The base weights' ``requires_grad`` flags are switched off for the run and restored afterwards.
A model loaded by a node holds *inference tensors* (ComfyUI runs prompts under ``torch.inference_mode``);
its clone hands each layer a normal copy of its weight per forward (``compat.fresh_weights_per_forward``).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from c2c_core import (LOSS_KINDS, FusionSchedule, LayerMap, ProjectorBank, ProjectorBundle, distill_loss, kv_loss,
                      save_bundle, velocity_loss)
from c2c_core.bundle import tag_bank
from c2c_core.runtime import FusionRun
from c2c_core.samples import (CLIP_VISION, CROSS_ATTN, ROLES, Conditioning, Draw, SampleDraws, SampleHost,
                              TrainingDataError, TrainingSample, TrainingSet, json_value, save_sample)
from c2c_core.train import DataParallel, TrainSettings, provenance, run_training, trainable_copy
from . import compat, files

log = logging.getLogger("dit_cache_bridge")

SAMPLES_SUBFOLDER = "c2c_training"
#: the folder under SAMPLES_SUBFOLDER that holds Train C2C Projector's checkpoints: no sample folder may take its name
CHECKPOINTS_SUBFOLDER = "checkpoints"
SAMPLES = SampleHost("comfyui", ROLES, "Save C2C Training Sample")


# ------------------------------------------------------------------------------------------------
# CONDITIONING <-> sample tensors
# ------------------------------------------------------------------------------------------------
def _batch_item(t: torch.Tensor, index: int, batch: int) -> torch.Tensor:
    """Row ``index`` of a tensor whose first dim is the latent batch; tensors of batch 1 are shared."""
    if batch > 1 and t.dim() > 0 and t.shape[0] == batch:
        return t[index:index + 1]
    return t


def flatten_conditioning(role: str, conditioning, index: int = 0, batch: int = 1) -> tuple[Conditioning, list]:
    """A one-entry CONDITIONING -> (sample Conditioning, what could not be stored) for one latent of a batch.

    Tensors: ``cross_attn``; every tensor extra under its key; lists of tensors (reference_latents) as
    ``<key>.<i>``; a CLIP-vision output as its ``penultimate_hidden_states`` under ``clip_vision_output``
    (what Wan reads). JSON values (numbers, strings) are values. Anything else (hooks, ControlNets)
    cannot be stored and is listed as dropped.
    """
    if len(conditioning) != 1:
        raise TrainingDataError(f"{role} has {len(conditioning)} conditioning entries; expected exactly 1. Do not "
                                f"combine or area-split the conditioning you save for training.")
    (cross_attn, extras), = conditioning
    out, dropped = Conditioning(), []
    if cross_attn is not None:
        out.tensors[CROSS_ATTN] = _batch_item(cross_attn, index, batch)
    for key, value in sorted(extras.items()):
        if torch.is_tensor(value):
            out.tensors[key] = _batch_item(value, index, batch)
        elif key == CLIP_VISION and torch.is_tensor(getattr(value, "penultimate_hidden_states", None)):
            out.tensors[CLIP_VISION] = _batch_item(value.penultimate_hidden_states, index, batch)
        elif isinstance(value, (list, tuple)) and value and all(torch.is_tensor(v) for v in value):
            out.tensors.update({f"{key}.{i}": _batch_item(t, index, batch) for i, t in enumerate(value)})
        elif json_value(value):
            out.values[key] = value
        else:
            dropped.append(f"{role}.{key} ({type(value).__name__})")
    return out, dropped


def conditioning(role: Conditioning):
    """A sample's Conditioning -> the CONDITIONING it was saved from (one entry)."""
    extras, lists = dict(role.values), {}
    for name, tensor in role.tensors.items():
        key, _, position = name.rpartition(".")
        if key and position.isdigit():
            lists.setdefault(key, {})[int(position)] = tensor
        elif name == CLIP_VISION:
            extras[name] = compat.clip_vision_output(tensor)
        elif name != CROSS_ATTN:
            extras[name] = tensor
    extras.update({key: [items[i] for i in sorted(items)] for key, items in lists.items()})
    return [[role.tensors.get(CROSS_ATTN), extras]]


def save_training_samples(folder, latent: torch.Tensor, conditionings: dict) -> list[Path]:
    """Write one sample file per latent of the batch into ``folder``; returns the paths.

    ``latent`` is a LATENT's ``samples`` (B, C, T, H, W) as the VAE gives it; ``conditionings`` maps
    each of :data:`ROLES` to a CONDITIONING. Conditioning tensors whose first dim equals B are split
    with the latent, others (batch 1) are stored with every latent.
    """
    if latent.dim() != 5:
        raise TrainingDataError(f"latent has shape {tuple(latent.shape)}; expected a video latent (B, C, T, H, W).")
    batch = latent.shape[0]
    paths, dropped = [], []
    for b in range(batch):
        roles, dropped = {}, []
        for role in ROLES:
            roles[role], d = flatten_conditioning(role, conditionings[role], b, batch)
            dropped += d
        paths.append(save_sample(folder, SAMPLES, latent[b:b + 1], roles, dropped))
    if dropped:
        log.warning("dit_cache_bridge: training samples do not store %s (not tensors or JSON values)", ", ".join(dropped))
    return paths


def open_training_set(folder) -> TrainingSet:
    """The samples Save C2C Training Sample wrote into ``folder`` (format 1 files included), validated."""
    return TrainingSet.open(folder, SAMPLES)


# ------------------------------------------------------------------------------------------------
# Batches: what one training forward of the pair consumes
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainBatch:
    """One forward's worth of data, already encoded for both models.

    x0, noise: (B, C, T, H, W) in model space (after ``process_latent_in``); sigma: (B,).
    receiver_conds / sharer_conds: ``apply_model`` keyword tensors (c_crossattn, c_concat, clip_fea …)
    for B rows. cond_or_uncond: per row 0 (positive) or 1 (negative), as ComfyUI's samplers pass it.
    teacher: optional (B, C, T, H, W) velocity to distil toward instead of the sharer's prediction.
    """
    x0: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor
    receiver_conds: dict
    sharer_conds: dict
    cond_or_uncond: list
    teacher: Optional[torch.Tensor] = None

    @property
    def x_t(self) -> torch.Tensor:
        s = self.sigma.reshape(-1, *([1] * (self.x0.dim() - 1)))
        return s * self.noise + (1.0 - s) * self.x0

    @property
    def velocity_target(self) -> torch.Tensor:
        """Flow-matching target ``noise - x0`` (what a perfect Wan outputs at this x_t)."""
        return self.noise - self.x0

    def to(self, device) -> "TrainBatch":
        move = lambda d: {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in d.items()}  # noqa: E731
        return TrainBatch(self.x0.to(device), self.noise.to(device), self.sigma.to(device), move(self.receiver_conds),
                          move(self.sharer_conds), list(self.cond_or_uncond),
                          None if self.teacher is None else self.teacher.to(device))


def encode_conditioning(patcher, conditioning, x0: torch.Tensor, prompt_type: str, device) -> dict:
    """CONDITIONING -> the model's COND objects for latent x0 (the sampler's own encoding path).

    Uses the sampler's own cond encoding with the model's ``extra_conds``, so an I2V model gets its
    concat (mask + image latent) and CLIP-vision features exactly as in sampling. The latent being
    denoised starts empty, as in text/image-to-video sampling.
    """
    encoded = compat.processed_model_conds(patcher, conditioning, x0, prompt_type, device)
    if len(encoded) != 1:
        raise TrainingDataError(f"{prompt_type} conditioning has {len(encoded)} entries; expected 1")
    return encoded[0]


def collate(items: list[dict]) -> list[TrainBatch]:
    """Group items into as few batches as the models allow (equal latent shapes, concatenable conds)."""
    groups: list[list[dict]] = []
    for item in items:
        for group in groups:
            head = group[0]
            if head["x0"].shape == item["x0"].shape and all(
                    compat.conds_concatenable(head[side], item[side]) for side in ("receiver", "sharer")):
                group.append(item)
                break
        else:
            groups.append([item])
    batches = []
    for group in groups:
        conds = {side: compat.cond_cat([g[side] for g in group]) for side in ("receiver", "sharer")}
        batches.append(TrainBatch(torch.cat([g["x0"] for g in group]), torch.cat([g["noise"] for g in group]),
                                  torch.cat([g["sigma"] for g in group]), conds["receiver"], conds["sharer"],
                                  [g["kind"] for g in group]))
    return batches


class SampleBatches:
    """``batches(step)`` for c2c_core's loop: the step's seeded draws (``c2c_core.samples.SampleDraws``: a pure
    function of seed, step and rank) encoded for the pair. Sigma follows the receiver's model_sampling (its
    shift): ``sigma = shift(t)``, t ~ U[0, 1)."""

    def __init__(self, dataset: TrainingSet, pair: "TrainingPair", batch_size: int, seed: int,
                 negative_share: float = 0.1, rank: int = 0, world: int = 1):
        self.dataset, self.pair = dataset, pair
        self.draws = SampleDraws(dataset, seed, negative_share, batch_size, rank, world)

    def item(self, draw: Draw) -> dict:
        pair = self.pair
        sample: TrainingSample = self.dataset[draw.index]
        x0 = compat.process_latent_in(pair.receiver, sample.latent.float())
        sigma = float(compat.percent_to_sigma(pair.receiver)(1.0 - draw.t))
        which = "negative" if draw.negative else "positive"
        try:
            receiver = encode_conditioning(pair.receiver, conditioning(sample.roles[f"receiver_{which}"]), x0, which,
                                           pair.device)
            sharer = encode_conditioning(pair.sharer, conditioning(sample.roles[f"sharer_{which}"]), x0, which,
                                         pair.device)
        except TrainingDataError as e:
            raise TrainingDataError(f"{sample.path}: {e.found}", e.expected, e.fix) from None
        return {"x0": x0, "noise": draw.noise, "sigma": torch.tensor([sigma], dtype=torch.float32),
                "kind": int(draw.negative), "receiver": receiver, "sharer": sharer}

    def __call__(self, step: int) -> list[TrainBatch]:
        return [b.to(self.pair.device) for b in collate([self.item(d) for d in self.draws(step)])]


# ------------------------------------------------------------------------------------------------
# The bridged pair
# ------------------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised inside a forward once everything it was run for has been captured."""


@contextlib.contextmanager
def frozen(*modules):
    """Switch requires_grad off on every parameter of ``modules`` and restore the flags afterwards."""
    flipped = []
    seen = set()
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                p.requires_grad_(False)
                flipped.append(p)
    try:
        yield
    finally:
        for p in flipped:
            # an inference tensor's flag may only be set back inside inference mode
            with torch.inference_mode(p.is_inference()):
                p.requires_grad_(True)


class TrainingPair:
    """A sharer and a receiver, cloned and hooked once, that run bridged training forwards.

    ``sharer`` / ``receiver``: ComfyUI MODELs (ModelPatchers); they are cloned, never changed.
    ``bank``: the trainable ProjectorBank (float32, on the receiver's device); ``layer_map`` pairs
    receiver layers with sharer layers; ``strength`` scales the fusion (training uses 1; 0 gives the
    receiver alone, for evaluation). Use inside :meth:`session` (loads and freezes the models).
    """

    def __init__(self, sharer, receiver, bank: ProjectorBank, layer_map: LayerMap, strength: float = 1.0):
        self.sharer_signature = compat.wan_signature(sharer)
        self.receiver_signature = compat.wan_signature(receiver)
        self.bank, self.layer_map, self.strength = bank, layer_map, float(strength)
        self.bundle = ProjectorBundle(bank=bank, layer_map=layer_map, sharer=bank.sharer, receiver=bank.receiver)
        self.fused_layers = list(layer_map.layers)
        self.sharer_layers = sorted(set(layer_map.pairs.values()))
        self.receiver = receiver.clone()
        self.sharer = sharer.clone()
        compat.hook_self_attention(self.receiver, self.fused_layers, self._receiver_hook)
        compat.hook_self_attention(self.sharer, self.sharer_layers, self._sharer_hook)
        compat.fresh_weights_per_forward(self.receiver)
        self.device = compat.load_device(self.receiver)
        self.sharer_rope = compat.rope_spec(self.sharer)
        self.receiver_rope = compat.rope_spec(self.receiver)
        self._runs: dict = {}        # token grid -> FusionRun (RoPE tables built once per grid)
        self.fusion_run(compat.token_grid((1, 1, 1, 1, 1)))      # refuses a map that does not fit the bank, now
        self._run: Optional[FusionRun] = None
        self._mode = None            # "capture" | "fuse" | "observe" while a forward runs
        self._captured: dict = {}    # sharer layer -> (k, v) as (B, N, H, D), as the sharer made them
        self._observed: dict = {}    # receiver layer -> (k, v) as (B, N, H, D)
        self._stop_after = None

    def __deepcopy__(self, memo):
        return self      # hooks in the clones' model_options reference this object

    @contextlib.contextmanager
    def session(self):
        """Load both clones the ComfyUI way, freeze the base weights, end the run cleanly.

        Forwards run in ComfyUI's training mode where the host has one (differentiable RoPE).
        """
        with compat.loaded_for_run([self.receiver, self.sharer]) as modules, frozen(*modules), \
                compat.training_mode():
            yield self

    # -- fusion --------------------------------------------------------------------------------
    def fusion_run(self, grid) -> FusionRun:
        """The FusionRun for latents on ``grid``: the inference runtime, with the trainable bank in place.

        Built as the bridge builds its run (schedule: the whole run; both models on the batch's grid;
        rope_alignment "auto"), except that no device/dtype is given, so the bank is used as it is
        (float32 master weights) instead of as a placed copy autograd would not reach, and no report
        statistics are kept. With a bank in the model's dtype the fused K/V equal inference's bit for bit.
        """
        run = self._runs.get(grid)
        if run is None:
            run = self._runs[grid] = FusionRun(self.bundle, FusionSchedule(), self.strength,
                                               sharer_rope=self.sharer_rope, receiver_rope=self.receiver_rope,
                                               sharer_grid=grid, receiver_grid=grid, rope_alignment="auto",
                                               stats=False)
        return run

    # -- hooks ---------------------------------------------------------------------------------
    def _sharer_hook(self, layer, q, k, v, heads, transformer_options):
        if self._mode is not None and layer in self.sharer_layers:
            kh = k.reshape(*k.shape[:2], heads, -1)
            self._captured[layer] = (kh, v.reshape(kh.shape))
            if layer == self._stop_after:
                raise _StopForward()
        return k, v

    def _receiver_hook(self, layer, q, k, v, heads, transformer_options):
        if self._mode == "fuse":
            run = self._run
            if run.strength(layer) == 0.0:
                return k, v
            sk, sv = self._captured[self.layer_map.pairs[layer]]
            return run.fuse_tokens(layer, k, v, sk, sv)
        if self._mode == "observe":
            self._observed[layer] = (k.reshape(*k.shape[:2], heads, -1), v.reshape(*v.shape[:2], heads, -1))
            if layer == self._stop_after:
                raise _StopForward()
        return k, v

    # -- forwards ------------------------------------------------------------------------------
    def _apply(self, patcher, batch: TrainBatch, conds: dict) -> Optional[torch.Tensor]:
        """One ``apply_model`` call on a clone; returns the raw velocity, None when stopped early."""
        try:
            return compat.diffusion_model_output(patcher, batch.x_t, batch.sigma, conds, batch.cond_or_uncond)
        except _StopForward:
            return None

    def _run_sharer(self, batch: TrainBatch, keep_prediction: bool) -> Optional[torch.Tensor]:
        self._captured = {}
        self._mode, self._stop_after = "capture", None if keep_prediction else self.sharer_layers[-1]
        try:
            with torch.no_grad():
                return self._apply(self.sharer, batch, batch.sharer_conds)
        finally:
            self._mode = self._stop_after = None

    def velocity(self, batch: TrainBatch, keep_teacher: bool = False):
        """Bridged receiver velocity (with grad to the bank) and the flow-matching target ``noise - x0``.

        With ``keep_teacher`` the sharer runs to the end and its velocity is returned third.
        """
        teacher = self._run_sharer(batch, keep_teacher)
        self._run = self.fusion_run(compat.token_grid(batch.x0.shape))
        self._run.begin_call(0.0)        # the whole run is the window: strength x the map's per-layer factor
        self._mode = "fuse"
        try:
            prediction = self._apply(self.receiver, batch, batch.receiver_conds)
        finally:
            self._mode, self._captured, self._run = None, {}, None
        return prediction.float(), batch.velocity_target.float(), None if teacher is None else teacher.float()

    def distill(self, batch: TrainBatch):
        """Bridged receiver velocity and the teacher: ``batch.teacher`` or the sharer's own velocity."""
        prediction, _, teacher = self.velocity(batch, keep_teacher=batch.teacher is None)
        return prediction, (batch.teacher.float() if batch.teacher is not None else teacher)

    def kv_triples(self, batch: TrainBatch) -> dict:
        """{receiver layer: {"k"|"v": (sharer, receiver, target)}} for c2c_core.kv_loss.

        Sharer K/V as ``FusionRun.fuse`` sees them before projecting (keys re-rotated to the receiver's
        positions: ``FusionRun.align``), the receiver's own un-fused K/V,
        and as target the sharer's K/V: this objective teaches the projector to reproduce the
        sharer's cache in the receiver (a cheap warm start; needs equal attention shapes).
        """
        self._run_sharer(batch, keep_prediction=False)
        captured = self._captured
        self._observed, self._mode, self._stop_after = {}, "observe", self.fused_layers[-1]
        try:
            with torch.no_grad():
                self._apply(self.receiver, batch, batch.receiver_conds)
            observed = self._observed
        finally:
            self._mode = self._stop_after = None
            self._observed, self._captured = {}, {}
        run = self.fusion_run(compat.token_grid(batch.x0.shape))
        out = {}
        for layer in self.fused_layers:
            rk, rv = observed[layer]
            sk, sv = run.align(*captured[self.layer_map.pairs[layer]], like=rk)
            out[layer] = {"k": (sk, rk, sk), "v": (sv, rv, sv)}
        return out


def make_loss(pair: TrainingPair, kind: str) -> Callable:
    """``loss_fn(bank, batches)`` for train_bank: c2c_core's loss per batch, weighted by batch rows."""
    if kind == "velocity":
        per_batch = velocity_loss(lambda bank, b: pair.velocity(b)[:2])
    elif kind == "distill":
        teachers = {}

        def predict(bank, b):   # the sharer's velocity comes out of the same forward as its K/V
            prediction, teachers[id(b)] = pair.distill(b)
            return prediction

        per_batch = distill_loss(predict, lambda b: teachers.pop(id(b)))
    elif kind == "kv":
        def per_batch(bank, b):
            return kv_loss(bank, pair.kv_triples(b))
    else:
        raise ValueError(f"loss {kind!r}; expected one of {LOSS_KINDS}")

    def loss_fn(bank, batches: list[TrainBatch]):
        total = sum(b.x0.shape[0] for b in batches)
        return sum(per_batch(bank, b) * (b.x0.shape[0] / total) for b in batches)

    return loss_fn


# ------------------------------------------------------------------------------------------------
# What the node and the CLI call
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainOutcome:
    bundle: ProjectorBundle
    losses: list[float]
    last_checkpoint: Optional[str]
    resumed_at: int = 0
    output_path: Optional[Path] = None


def train_projector(sharer, receiver, projector: ProjectorBundle, dataset: TrainingSet, settings: TrainSettings, *,
                    checkpoint_dir=None, resume: bool = True, output_path=None,
                    progress: Optional[Callable[[int, int, float], None]] = None) -> TrainOutcome:
    """Train a copy of ``projector``'s bank for the pair on ``dataset``; the input bundle is not changed.

    Checkpoints, resume and torchrun as in ``c2c_core.train.run_training``. Returns the trained bundle
    (CPU, eval mode, tagged with the pair's architectures) and the loss of every step; rank 0 saves it
    to ``output_path`` (never replacing a file there: name_00001 etc.).

    Runs in ComfyUI's training mode where the host has one (its RoPE kernel may have no gradient
    otherwise) and raises ``compat.HostFeatureMissing`` at once on a host whose RoPE cannot be trained through.
    """
    parallel = DataParallel.current()
    device = compat.load_device(receiver)
    with torch.inference_mode(False), torch.enable_grad():
        with compat.training_mode():
            compat.check_rope_gradient(device)     # fail in a second, not after the first forward
        bank = trainable_copy(projector).to(device)
        pair = TrainingPair(sharer, receiver, bank, projector.layer_map)
        _check_latent_formats(pair)
        dataset.check_models(pair.receiver_signature.arch, pair.sharer_signature.arch)
        batches = SampleBatches(dataset, pair, settings.batch_size, settings.seed, settings.negative_share,
                                parallel.rank, parallel.world)
        with pair.session():
            result = run_training(bank, projector.layer_map, batches, make_loss(pair, settings.loss), settings,
                                  checkpoint_dir=checkpoint_dir, resume=resume, progress=progress, parallel=parallel)
        bank = tag_bank(bank.cpu().eval(), compat.wan_signature(sharer), compat.wan_signature(receiver))
    info = provenance("DiT Cache Bridge training", settings, result, len(dataset), parallel.world)
    bundle = ProjectorBundle(bank=bank, layer_map=projector.layer_map, sharer=bank.sharer,
                             receiver=bank.receiver, provenance=info, metadata={})
    outcome = TrainOutcome(bundle, result.losses, result.last_checkpoint, result.resumed_at)
    if parallel.rank == 0 and output_path is not None:
        outcome.output_path = files.save_unique(
            output_path, lambda p: save_bundle(p, bank, projector.layer_map, info, overwrite=False))
    return outcome


def evaluate_projector(sharer, receiver, projector: ProjectorBundle, dataset: TrainingSet, loss: str = "distill",
                       batches: int = 8, batch_size: int = 1, seed: int = 1_000_003, negative_share: float = 0.0,
                       strength: float = 1.0) -> list[float]:
    """The loss of ``projector`` (eval mode, no grad) on fixed batches: the same draws for every projector.

    ``seed`` picks the draws (sample order, noise, sigma); use one that training did not. Returns one
    value per batch. ``strength=0`` measures the receiver alone.
    """
    with torch.inference_mode(False), torch.no_grad():
        bank = trainable_copy(projector).to(compat.load_device(receiver)).eval()
        pair = TrainingPair(sharer, receiver, bank, projector.layer_map, strength)
        dataset.check_models(pair.receiver_signature.arch, pair.sharer_signature.arch)
        feed = SampleBatches(dataset, pair, batch_size, seed, negative_share)
        loss_fn = make_loss(pair, loss)
        with pair.session():
            return [float(loss_fn(bank, feed(i))) for i in range(batches)]


def _check_latent_formats(pair: TrainingPair) -> None:
    (r, _), (s, _) = compat.latent_format(pair.receiver), compat.latent_format(pair.sharer)
    if r != s:
        raise TrainingDataError(f"the receiver's latent format is {r} and the sharer's {s}; expected the same "
                                f"(both models denoise one latent)")
