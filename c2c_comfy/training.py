"""Projector training on a ComfyUI Wan pair: training-sample files, the bridged training forward, the loop.

One implementation serves the Train C2C Projector node and ``tools/train_projector.py``; both call
:func:`train_projector`. The math lives in c2c_core (projectors, fusion, ``train_bank`` and its loss
builders); this module only feeds it ComfyUI models and data.

What is predicted. Wan is a flow model in ComfyUI: a clean latent x0 (after ``process_latent_in``)
is noised as ``x_t = sigma * noise + (1 - sigma) * x0`` (``model_sampling.noise_scaling``), the
diffusion model outputs the velocity v, and ``apply_model`` returns ``denoised = x_t - sigma * v``.
Training works in velocity space on the diffusion model's *raw* output, taken by a DIFFUSION_MODEL
wrapper rather than re-derived from ``denoised`` (which would divide by a small sigma). The velocity
target is ``noise - x0``; the distillation teacher is the sharer's raw velocity on the same x_t,
sigma and its own conditioning.

One training forward (:class:`TrainingPair`):
  1. the sharer runs under ``no_grad``; a self-attention hook records the K/V of the sharer layers
     the layer map reads (it stops after the last one unless the sharer's prediction is needed);
  2. the receiver runs with grad; its hook fuses the recorded sharer K/V into its own through
     ``c2c_core.runtime.FusionRun.fuse`` -- the one fusion path inference uses (keys re-rotated to the
     receiver's RoPE positions as with rope_alignment "auto", projected, blended at strength 1) --
     with the trainable bank used in place (never a placed copy), so gradients reach the projector
     bank and nothing else, and what is trained is exactly what the bridge runs.

Models are never changed: both are cloned, hooks live on the clones (``compat``), the clones
are what ComfyUI loads. The base weights' ``requires_grad`` flags are switched off for the run and
restored afterwards. ComfyUI executes nodes under ``torch.inference_mode``, so a model loaded by a
node holds *inference tensors*, which autograd may not save for backward; for such a receiver the
clone gets ComfyUI weight wrappers that hand each layer a normal copy of its weight per forward
(transient, the cost of ComfyUI's own LoRA trainer). Models loaded outside inference mode (the CLI)
skip that copy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

import comfy.patcher_extension

from c2c_core import (LOSS_KINDS, FusionSchedule, LayerMap, ProjectorBank, ProjectorBundle, TrainConfig,
                        distill_loss, kv_loss, save_bundle, save_tensors_with_meta, train_bank, velocity_loss)
from c2c_core.bundle import read_header, read_meta, tag_bank
from c2c_core.checkpoint import find_checkpoint
from c2c_core.errors import C2CError, TrainError
from c2c_core.health import FiniteWatch
from c2c_core.runtime import FusionRun
from . import compat, files

log = logging.getLogger("dit_cache_bridge")


SAMPLES_SUBFOLDER = "c2c_training"
SAMPLE_KEY = "c2c_training_sample"
SAMPLE_FORMAT_VERSION = 1
SAMPLE_PREFIX = "sample"
ROLES = ("receiver_positive", "receiver_negative", "sharer_positive", "sharer_negative")
_SAMPLE_NAME = re.compile(r"^sample_(\d{5,})\.safetensors$")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_WRAPPER_KEY = "dit_cache_bridge.training"


class TrainingDataError(ValueError):
    """A training-sample file or folder cannot be used; the message names the file and the fix.

    ``expected`` and ``fix``, where given, say what Train C2C Projector shows in place of its generic
    expectation and fix for its ``dataset`` input.
    """

    def __init__(self, message: str, expected: Optional[str] = None, fix: Optional[str] = None):
        super().__init__(message)
        self.expected, self.fix = expected, fix


_FINITE = "finite values (a latent from VAE Encode or a sampler, conditioning from the text/vision encoders)"


def _nonfinite_fix(folder: Path, names: list[str]) -> str:
    return (f"delete {', '.join(names)} from {folder} (or save it again from a finite latent and conditioning: "
            f"look upstream of Save C2C Training Sample for a node that produced NaN/Inf, e.g. fp16 overflow in "
            f"the VAE) and queue again")


# ------------------------------------------------------------------------------------------------
# Training-sample files: one .safetensors per latent, tensors + JSON metadata, nothing pickled
# ------------------------------------------------------------------------------------------------
def _json_value(value) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_json_value(v) for v in value)
    return False


def _batch_item(t: torch.Tensor, index: int, batch: int) -> torch.Tensor:
    """Row ``index`` of a tensor whose first dim is the latent batch; tensors of batch 1 are shared."""
    if batch > 1 and t.dim() > 0 and t.shape[0] == batch:
        return t[index:index + 1]
    return t


def flatten_conditioning(role: str, conditioning, index: int = 0, batch: int = 1):
    """CONDITIONING -> (tensors, JSON description) for one latent of a batch.

    Per entry ``j``: ``<role>.<j>.cross_attn``; every tensor extra under ``<role>.<j>.<key>``; lists
    of tensors (reference_latents) as ``<role>.<j>.<key>.<i>``; a CLIP-vision output as its
    ``penultimate_hidden_states`` (what Wan reads); JSON values (numbers, strings) in the
    description. Anything else (hooks, ControlNets) cannot be stored and is listed as dropped.
    """
    tensors: dict[str, torch.Tensor] = {}
    entries, dropped = [], []
    for j, item in enumerate(conditioning):
        cross_attn, extras = item[0], item[1]
        prefix = f"{role}.{j}"
        entry = {"tensors": [], "tensor_lists": {}, "clip_vision_output": False, "values": {}}
        if cross_attn is not None:
            tensors[f"{prefix}.cross_attn"] = _batch_item(cross_attn, index, batch)
        entry["cross_attn"] = cross_attn is not None
        for key, value in sorted(extras.items()):
            if torch.is_tensor(value):
                tensors[f"{prefix}.{key}"] = _batch_item(value, index, batch)
                entry["tensors"].append(key)
            elif key == "clip_vision_output" and torch.is_tensor(getattr(value, "penultimate_hidden_states", None)):
                tensors[f"{prefix}.clip_vision_output"] = _batch_item(value.penultimate_hidden_states, index, batch)
                entry["clip_vision_output"] = True
            elif isinstance(value, (list, tuple)) and value and all(torch.is_tensor(v) for v in value):
                for i, t in enumerate(value):
                    tensors[f"{prefix}.{key}.{i}"] = _batch_item(t, index, batch)
                entry["tensor_lists"][key] = len(value)
            elif _json_value(value):
                entry["values"][key] = list(value) if isinstance(value, tuple) else value
            else:
                dropped.append(f"{role}[{j}].{key} ({type(value).__name__})")
        entries.append(entry)
    return tensors, entries, dropped


def _next_index(folder: Path) -> int:
    found = [int(m.group(1)) for p in folder.iterdir() if (m := _SAMPLE_NAME.match(p.name))] if folder.is_dir() else []
    return max(found, default=0) + 1


def save_training_samples(folder, latent: torch.Tensor, conditionings: dict) -> list[Path]:
    """Write one sample file per latent of the batch into ``folder``; returns the paths.

    ``latent`` is a LATENT's ``samples`` (B, C, T, H, W) as the VAE gives it; ``conditionings`` maps
    each of :data:`ROLES` to a CONDITIONING. Conditioning tensors whose first dim equals B are split
    with the latent, others (batch 1) are stored with every latent.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if latent.dim() != 5:
        raise TrainingDataError(f"latent has shape {tuple(latent.shape)}; expected a video latent (B, C, T, H, W).")
    batch = latent.shape[0]
    first = _next_index(folder)
    paths = []
    for b in range(batch):
        tensors = {"latent": latent[b:b + 1]}
        roles, dropped = {}, []
        for role in ROLES:
            t, entries, d = flatten_conditioning(role, conditionings[role], b, batch)
            tensors.update(t)
            roles[role] = entries
            dropped += d
        meta = {"format_version": SAMPLE_FORMAT_VERSION, "latent_shape": list(tensors["latent"].shape), "roles": roles,
                "dropped": dropped, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        path = folder / f"{SAMPLE_PREFIX}_{first + b:05d}.safetensors"
        save_tensors_with_meta(path, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()},
                               meta, SAMPLE_KEY)
        paths.append(path)
    if dropped:
        log.warning("dit_cache_bridge: training samples do not store %s (not tensors or JSON values)", ", ".join(dropped))
    return paths


def _expected_tensors(path: Path, meta: dict) -> list[str]:
    """Tensor names a sample's metadata announces; raises TrainingDataError on a malformed description."""
    roles = meta.get("roles")
    if not isinstance(roles, dict) or sorted(roles) != sorted(ROLES):
        raise TrainingDataError(f"{path}: sample metadata names roles {sorted(roles) if isinstance(roles, dict) else roles!r}; "
                                f"expected {list(ROLES)}. Re-save it with Save C2C Training Sample.")
    names = ["latent"]
    for role in ROLES:
        entries = roles[role]
        if not isinstance(entries, list) or len(entries) != 1:
            raise TrainingDataError(
                f"{path}: {role} has {len(entries) if isinstance(entries, list) else 'no'} conditioning entries; "
                f"expected exactly 1. Do not combine or area-split the conditioning you save for training.")
        for j, entry in enumerate(entries):
            try:
                prefix = f"{role}.{j}"
                if entry["cross_attn"]:
                    names.append(f"{prefix}.cross_attn")
                names += [f"{prefix}.{key}" for key in entry["tensors"]]
                names += [f"{prefix}.{key}.{i}" for key, n in entry["tensor_lists"].items() for i in range(int(n))]
                if entry["clip_vision_output"]:
                    names.append(f"{prefix}.clip_vision_output")
                if not isinstance(entry["values"], dict):
                    raise TypeError("values")
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise TrainingDataError(f"{path}: {role} entry {j} is malformed ({e!r}); re-save the sample.") from None
    return names


@dataclass
class TrainingSample:
    """One loaded sample: the clean latent as saved (VAE space) and the four conditionings."""
    path: Path
    latent: torch.Tensor
    conditioning: dict


class TrainingSet:
    """The sample files of one folder. Headers are validated up front; tensors are read per use."""

    def __init__(self, folder: Path, paths: list[Path], metas: list[dict]):
        self.folder, self.paths, self.metas = folder, paths, metas

    @classmethod
    def open(cls, folder) -> "TrainingSet":
        folder = Path(folder)
        if not folder.is_dir():
            raise TrainingDataError(f"training-sample folder {folder} does not exist")
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".safetensors"))
        if not paths:
            raise TrainingDataError(f"training-sample folder {folder} holds no .safetensors samples")
        metas = []
        for path in paths:
            try:
                meta = read_meta(path, SAMPLE_KEY)
                _, entries = read_header(path)
            except C2CError as e:
                raise TrainingDataError(f"{path} is not a training sample: {e}") from None
            if meta.get("format_version") != SAMPLE_FORMAT_VERSION:
                raise TrainingDataError(f"{path}: sample format {meta.get('format_version')!r}; expected "
                                        f"{SAMPLE_FORMAT_VERSION}. Update DiT Cache Bridge or re-save the sample.")
            expected = _expected_tensors(path, meta)
            missing = sorted(set(expected) - set(entries))
            unexpected = sorted(set(entries) - set(expected))
            if missing or unexpected:
                raise TrainingDataError(f"{path}: tensors {missing} are missing and {unexpected} unexpected; the "
                                        f"file does not match its metadata. Re-save the sample.")
            bad = [n for n in expected if entries[n][1] not in _FLOAT_DTYPES]
            shape = entries["latent"][0]
            if bad or len(shape) != 5 or shape[0] != 1:
                raise TrainingDataError(f"{path}: latent {list(shape)} / non-float tensors {bad}; expected a "
                                        f"(1, C, T, H, W) float latent and float conditioning.")
            metas.append(meta)
        _check_finite_latents(folder, paths)
        return cls(folder, paths, metas)

    def __len__(self) -> int:
        return len(self.paths)

    def latent_shape(self, index: int) -> tuple:
        return tuple(self.metas[index]["latent_shape"])

    def __getitem__(self, index: int) -> TrainingSample:
        from safetensors import safe_open

        path, meta = self.paths[index], self.metas[index]
        with safe_open(str(path), framework="pt", device="cpu") as f:
            def get(name):
                t = f.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise TrainingDataError(f"sample index {index} ({path.name}): tensor {name!r} holds NaN or Inf "
                                            f"values", _FINITE, _nonfinite_fix(self.folder, [path.name]))
                return t
            conditioning = {}
            for role in ROLES:
                items = []
                for j, entry in enumerate(meta["roles"][role]):
                    prefix = f"{role}.{j}"
                    extras = {key: get(f"{prefix}.{key}") for key in entry["tensors"]}
                    extras.update({key: [get(f"{prefix}.{key}.{i}") for i in range(int(n))]
                                   for key, n in entry["tensor_lists"].items()})
                    extras.update(entry["values"])
                    if entry["clip_vision_output"]:
                        extras["clip_vision_output"] = compat.clip_vision_output(get(f"{prefix}.clip_vision_output"))
                    items.append([get(f"{prefix}.cross_attn") if entry["cross_attn"] else None, extras])
                conditioning[role] = items
            return TrainingSample(path, get("latent"), conditioning)


def _check_finite_latents(folder: Path, paths: list[Path]) -> None:
    """Refuse samples whose latent holds NaN/Inf before any model loads (they would only show up as a NaN
    loss steps later). Every latent is read once; conditioning is checked as each sample is used."""
    from safetensors import safe_open

    watch = FiniteWatch()
    for index, path in enumerate(paths):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            watch.observe(index, f.get_tensor("latent"))
    bad = watch.bad_layers()
    if bad:
        shown = [f"index {i} ({paths[i].name})" for i in bad[:8]] + (["…"] if len(bad) > 8 else [])
        raise TrainingDataError(f"the latents of samples {', '.join(shown)} in {folder} hold NaN or Inf values",
                                _FINITE, _nonfinite_fix(folder, [paths[i].name for i in bad[:8]]))


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
    encoded = compat.encode_model_conds(patcher, conditioning, x0, prompt_type, device)
    if len(encoded) != 1:
        raise TrainingDataError(f"{prompt_type} conditioning has {len(encoded)} entries; expected 1")
    [entry] = encoded
    return {k: c.process_cond(batch_size=x0.shape[0], area=None) for k, c in entry["model_conds"].items()}


def collate(items: list[dict]) -> list[TrainBatch]:
    """Group items into as few batches as the models allow (equal latent shapes, concatenable conds)."""
    groups: list[list[dict]] = []
    for item in items:
        for group in groups:
            head = group[0]
            if head["x0"].shape == item["x0"].shape and all(
                    head[side].keys() == item[side].keys()
                    and all(head[side][k].can_concat(item[side][k]) for k in head[side])
                    for side in ("receiver", "sharer")):
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


def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & ((1 << 63) - 1)


class SampleBatches:
    """``batches(step)`` for c2c_core.train_bank: a pure function of (seed, step, rank).

    Samples are drawn without replacement in a fresh permutation per epoch, split across ranks;
    each item's noise, sigma and positive/negative choice come from its own seeded generator, never
    from torch's global RNG, so a resumed run sees exactly the batches of an uninterrupted one.
    Sigma follows the receiver's model_sampling (its shift): ``sigma = shift(t)``, t ~ U[0, 1).
    """

    def __init__(self, dataset: TrainingSet, pair: "TrainingPair", batch_size: int, seed: int,
                 negative_share: float = 0.1, rank: int = 0, world: int = 1):
        self.dataset, self.pair = dataset, pair
        self.batch_size, self.seed, self.negative_share = batch_size, seed, negative_share
        self.rank, self.world = rank, world
        self._perm: tuple[int, torch.Tensor] | None = None

    def _index(self, counter: int) -> int:
        epoch, position = divmod(counter, len(self.dataset))
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(_seed_of(self.seed, "epoch", epoch))
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=gen))
        return int(self._perm[1][position])

    def item(self, counter: int) -> dict:
        pair = self.pair
        sample = self.dataset[self._index(counter)]
        gen = torch.Generator().manual_seed(_seed_of(self.seed, "item", counter))
        x0 = pair.receiver.model.process_latent_in(sample.latent.float())
        noise = torch.randn(x0.shape, generator=gen)
        t, share = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        sigma = float(pair.model_sampling.percent_to_sigma(1.0 - t))
        kind = 1 if share < self.negative_share else 0
        which = "negative" if kind else "positive"
        device = pair.device
        try:
            receiver = encode_conditioning(pair.receiver, sample.conditioning[f"receiver_{which}"], x0, which, device)
            sharer = encode_conditioning(pair.sharer, sample.conditioning[f"sharer_{which}"], x0, which, device)
        except TrainingDataError as e:
            raise TrainingDataError(f"{sample.path}: {e}") from None
        return {"x0": x0, "noise": noise, "sigma": torch.tensor([sigma], dtype=torch.float32), "kind": kind,
                "receiver": receiver, "sharer": sharer}

    def __call__(self, step: int) -> list[TrainBatch]:
        first = (step * self.world + self.rank) * self.batch_size
        items = [self.item(first + j) for j in range(self.batch_size)]
        return [b.to(self.pair.device) for b in collate(items)]


# ------------------------------------------------------------------------------------------------
# The bridged pair
# ------------------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised inside a forward once everything it was run for has been captured."""


def _fresh_weight(weight: torch.Tensor) -> torch.Tensor:
    """ComfyUI weight wrapper: a normal copy of an inference-mode weight, so autograd may save it."""
    return weight.clone() if weight.is_inference() else weight


def _has_inference_weights(patcher) -> bool:
    return any(p.is_inference() for p in patcher.model.diffusion_model.parameters())


@contextlib.contextmanager
def _frozen(*modules):
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
        if _has_inference_weights(self.receiver):
            for name, module in self.receiver.model.named_modules():
                if hasattr(module, "weight_function"):
                    for attr in ("weight", "bias"):
                        if getattr(module, attr, None) is not None:
                            self.receiver.add_weight_wrapper(f"{name}.{attr}", _fresh_weight)
        self.device = self.receiver.load_device
        self.model_sampling = self.receiver.get_model_object("model_sampling")
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
        patchers = [self.receiver] + ([self.sharer] if self.sharer.model is not self.receiver.model else [])
        compat.load_models_gpu(patchers)
        with _frozen(*(p.model for p in patchers)), compat.training_mode():
            for p in patchers:
                p.pre_run()
            try:
                yield self
            finally:
                for p in patchers:
                    p.cleanup()

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
            kh, vh = k.reshape(*k.shape[:2], heads, -1), v.reshape(*v.shape[:2], heads, -1)
            k2, v2 = run.fuse(layer, kh, vh, sk, sv)
            return k2.reshape(k.shape), v2.reshape(v.shape)
        if self._mode == "observe":
            self._observed[layer] = (k.reshape(*k.shape[:2], heads, -1), v.reshape(*v.shape[:2], heads, -1))
            if layer == self._stop_after:
                raise _StopForward()
        return k, v

    # -- forwards ------------------------------------------------------------------------------
    def _apply(self, patcher, batch: TrainBatch, conds: dict) -> Optional[torch.Tensor]:
        """One ``apply_model`` call on a clone; returns the raw velocity, None when stopped early."""
        raw = {}

        def keep_raw(executor, *args, **kwargs):
            raw["out"] = executor(*args, **kwargs)
            return raw["out"]

        options = dict(patcher.model_options.get("transformer_options", {}))
        wrappers = {kind: {key: list(fns) for key, fns in table.items()}
                    for kind, table in options.get("wrappers", {}).items()}
        for kind, table in patcher.wrappers.items():
            for key, fns in table.items():
                wrappers.setdefault(kind, {}).setdefault(key, []).extend(fns)
        wrappers.setdefault(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})[_WRAPPER_KEY] = [keep_raw]
        options.update(wrappers=wrappers, cond_or_uncond=list(batch.cond_or_uncond), sigmas=batch.sigma,
                       uuids=[None] * len(batch.cond_or_uncond))
        try:
            patcher.model.apply_model(batch.x_t, batch.sigma, **conds, transformer_options=options)
        except _StopForward:
            return None
        return raw["out"]

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
# Data-parallel training (torchrun): same weights on every rank, gradients averaged
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "DataParallel":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def active(self) -> bool:
        return self.world > 1

    def broadcast(self, bank: ProjectorBank) -> None:
        """Every rank starts from rank 0's weights."""
        if self.active:
            with torch.no_grad():
                for tensor in list(bank.parameters()) + list(bank.buffers()):
                    dist.broadcast(tensor, 0)

    def reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Average gradients over ranks in one flat all-reduce (fixed order: identical on every rank)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n


# ------------------------------------------------------------------------------------------------
# The loop shared by the node and the CLI
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainSettings(TrainConfig):
    """c2c_core's TrainConfig (optimisation, checkpoints, the checks) plus what feeding the pair needs:
    latents per step and the share of steps that train on the negative prompts."""
    batch_size: int = 1
    negative_share: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise TrainError(f"TrainConfig.batch_size={self.batch_size!r}; expected an integer >= 1.")
        if isinstance(self.negative_share, bool) or not isinstance(self.negative_share, (int, float)) \
                or not 0.0 <= self.negative_share <= 1.0:
            raise TrainError(f"TrainConfig.negative_share={self.negative_share!r}; expected a number in [0, 1].")


@dataclass
class TrainOutcome:
    bundle: ProjectorBundle
    losses: list[float]
    last_checkpoint: Optional[str]
    resumed_at: int = 0
    output_path: Optional[Path] = None
    plot_path: Optional[Path] = None
    plot: Optional[torch.Tensor] = field(default=None, repr=False)


def trainable_copy(bundle: ProjectorBundle) -> ProjectorBank:
    """A fresh float32 bank with the bundle's weights (inference-mode tensors from a node become normal ones)."""
    bank = bundle.bank
    with torch.inference_mode(False):
        fresh = ProjectorBank.build(bank.kind, bank.sharer, bank.receiver, bank.layers, **bank.hparams)
        with torch.no_grad():
            fresh.load_state_dict({k: v.detach().clone().float() for k, v in bank.state_dict().items()})
    return fresh.float()


def has_checkpoint(folder) -> bool:
    try:
        find_checkpoint(folder)
        return True
    except C2CError:
        return False


def clear_checkpoints(folder) -> None:
    """Remove the step_NNNNNN[.state].safetensors files this trainer wrote (and nothing else)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if re.fullmatch(r"step_\d{6,}(\.state)?\.safetensors", p.name):
                p.unlink()


def train_projector(sharer, receiver, projector: ProjectorBundle, dataset: TrainingSet, settings: TrainSettings, *,
                    checkpoint_dir=None, resume: bool = True, output_path=None, plot_path=None,
                    progress: Optional[Callable[[int, int, float], None]] = None) -> TrainOutcome:
    """Train a copy of ``projector``'s bank for the pair on ``dataset``; the input bundle is not changed.

    Checkpoints go to ``checkpoint_dir`` (default ``settings.checkpoint_dir``) every
    ``settings.checkpoint_every`` steps (rank 0 only);
    with ``resume`` a run continues from the latest checkpoint there (same settings required).
    ``progress(done, total, loss)`` runs after every step (raise from it to stop: the checkpoints
    stay). Under torchrun every rank calls this with the same arguments; each trains on its own share
    of the batches, gradients are averaged, rank 0 writes files. Returns the trained bundle (CPU,
    eval mode), the loss of every step, and where files went.

    Runs in ComfyUI's training mode where the host has one (its RoPE kernel may have no gradient
    otherwise) and raises ``compat.HostFeatureMissing`` at once on a host whose RoPE cannot be trained through.
    """
    parallel = DataParallel.current()
    with torch.inference_mode(False), torch.enable_grad():
        with compat.training_mode():
            compat.check_rope_gradient(receiver.load_device)     # fail in a second, not after the first forward
        bank = trainable_copy(projector)
        pair_device = receiver.load_device
        bank.to(pair_device)
        parallel.broadcast(bank)
        pair = TrainingPair(sharer, receiver, bank, projector.layer_map)
        _check_latent_formats(pair)
        batches = SampleBatches(dataset, pair, settings.batch_size, settings.seed, settings.negative_share,
                                parallel.rank, parallel.world)
        writer = parallel.rank == 0
        checkpoint_dir = checkpoint_dir if checkpoint_dir is not None else settings.checkpoint_dir
        keeps = writer and checkpoint_dir is not None
        config = dataclasses.replace(settings, checkpoint_dir=str(checkpoint_dir) if keeps else None,
                                     checkpoint_every=settings.checkpoint_every if keeps else 0)
        resume_from = None
        if checkpoint_dir is not None:
            if not resume and writer:
                clear_checkpoints(checkpoint_dir)
            if parallel.active:
                dist.barrier()
            if resume and has_checkpoint(checkpoint_dir):
                resume_from = str(checkpoint_dir)
        ran = [0]

        def on_step(done, value):
            ran[0] += 1
            if progress is not None:
                progress(done, settings.steps, value)

        with pair.session():
            result = train_bank(bank, projector.layer_map, batches, make_loss(pair, settings.loss), config,
                                resume=resume_from, progress=on_step,
                                reduce_grads=parallel.reduce_grads if parallel.active else None)
        bank = tag_bank(bank.cpu().eval(), compat.wan_signature(sharer), compat.wan_signature(receiver))
    provenance = {"tool": "DiT Cache Bridge training", "loss": settings.loss, "steps": settings.steps,
                  "batch_size": settings.batch_size, "lr": settings.lr, "seed": settings.seed,
                  "final_loss": result.losses[-1] if result.losses else None, "samples": len(dataset),
                  "processes": parallel.world,
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    bundle = ProjectorBundle(bank=bank, layer_map=projector.layer_map, sharer=bank.sharer,
                             receiver=bank.receiver, provenance=provenance, metadata={})
    outcome = TrainOutcome(bundle, result.losses, result.last_checkpoint, len(result.losses) - ran[0])
    if writer and output_path is not None:
        # never replaces a bundle already there (an earlier run's, or one the user put there): name_00001 etc.
        outcome.output_path = files.save_unique(
            output_path, lambda p: save_bundle(p, bank, projector.layer_map, provenance, overwrite=False))
    outcome.plot = loss_plot(result.losses, f"{settings.loss} loss, {bank.kind} projector")
    if writer and plot_path is not None:
        plot_path = Path(plot_path)
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        _write_png(outcome.plot, plot_path)
        outcome.plot_path = plot_path
    return outcome


def evaluate_projector(sharer, receiver, projector: ProjectorBundle, dataset: TrainingSet, loss: str = "distill",
                       batches: int = 8, batch_size: int = 1, seed: int = 1_000_003, negative_share: float = 0.0,
                       strength: float = 1.0) -> list[float]:
    """The loss of ``projector`` (eval mode, no grad) on fixed batches: the same draws for every projector.

    ``seed`` picks the draws (sample order, noise, sigma); use one that training did not. Returns one
    value per batch. ``strength=0`` measures the receiver alone.
    """
    with torch.inference_mode(False), torch.no_grad():
        bank = trainable_copy(projector).to(receiver.load_device).eval()
        pair = TrainingPair(sharer, receiver, bank, projector.layer_map, strength)
        feed = SampleBatches(dataset, pair, batch_size, seed, negative_share)
        loss_fn = make_loss(pair, loss)
        with pair.session():
            return [float(loss_fn(bank, feed(i))) for i in range(batches)]


def _check_latent_formats(pair: TrainingPair) -> None:
    r, s = pair.receiver.model.latent_format, pair.sharer.model.latent_format
    if type(r) is not type(s):
        raise TrainingDataError(f"the receiver's latent format is {type(r).__name__} and the sharer's "
                                f"{type(s).__name__}; expected the same (both models denoise one latent)")


# ------------------------------------------------------------------------------------------------
# Loss curve
# ------------------------------------------------------------------------------------------------
def loss_plot(losses: list[float], title: str = "loss") -> torch.Tensor:
    """The loss curve as a ComfyUI IMAGE (1, H, W, 3) float in [0, 1]: raw per-step loss and a moving mean."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    import numpy as np

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = np.arange(1, len(losses) + 1)
    values = np.asarray(losses, dtype=np.float64)
    if len(values):
        ax.plot(steps, values, color="#9db4d6", linewidth=0.8, label="per step")
        window = max(1, len(values) // 20)
        if window > 1:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color="#1f4e99", linewidth=1.6, label=f"mean of {window}")
        if (values > 0).all():
            ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0).unsqueeze(0)


def _write_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image
    array = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array).save(path)
