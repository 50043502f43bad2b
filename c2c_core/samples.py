"""Training-sample files, one format for both hosts, and the seeded draws a training step takes from them.

A sample file is one clean latent and, per *role* (``receiver_positive``, ``receiver_negative``,
``sharer_positive``, ``sharer_negative``), the conditioning of one model as named tensors plus JSON
values: safetensors with JSON metadata under ``c2c_training_sample``, nothing pickled, the header
read (bounded) and checked against what the metadata announces before any tensor is. Each host
converts its own conditioning to and from named tensors (ComfyUI: CONDITIONING lists; diffusers:
prompt embeddings, image embeddings, image latents); this module knows nothing of either.

The latent is in the writing host's latent space (ComfyUI: as VAE Encode gives it; diffusers: the
pipeline's normalised latents) and image conditioning in its own representation, so a file names the
host that wrote it and a host reads only its own samples (the message says how to make them).

Format 2 (written here): tensors ``latent`` and ``<role>.<name>``; metadata ``{"format_version": 2,
"host", "latent_shape", "roles": {role: {"tensors": [names], "values": {...}}}, "dropped", "created"}``.
Format 1 (ComfyUI samples from before format 2, still read): ``<role>.0.<name>`` tensors and per role a
list of one ComfyUI conditioning entry.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .tensorfile import FLOAT_DTYPES, load_tensors, read_header, read_meta, save_tensors_with_meta
from .errors import C2CError
from .health import FiniteWatch

__all__ = ["SAMPLE_KEY", "FORMAT_VERSION", "ROLES", "CROSS_ATTN", "CLIP_VISION", "SIGMA_RANGE", "TrainingDataError",
           "SampleHost", "Conditioning", "TrainingSample", "TrainingSet", "save_sample", "json_value", "Draw",
           "SampleDraws", "seed_of"]

SAMPLE_KEY = "c2c_training_sample"
FORMAT_VERSION = 2
ROLES = ("receiver_positive", "receiver_negative", "sharer_positive", "sharer_negative")
# Tensor names both hosts give the same thing: text-encoder embeddings, image-encoder penultimate hidden states.
CROSS_ATTN, CLIP_VISION = "cross_attn", "clip_vision_output"
# Sigma range of hosts that draw sigma uniformly (diffusers); ComfyUI follows the receiver's own shift.
SIGMA_RANGE = (0.05, 0.95)
_OLD_DIFFUSERS_KEY = "c2c_diffusers_training_sample"
_SAMPLE_NAME = re.compile(r"^sample_(\d{5,})\.safetensors$")
_TENSOR_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,127}$")
_FINITE = "finite values (a latent from VAE Encode or a sampler, conditioning from the text/vision encoders)"
#: the largest latent value a sample may hold: VAE latents stay within a few tens, so 1e4 is data gone wrong
#: (a wrong scale, a broken encoder), which would otherwise surface as an infinite loss blamed on the projector
LATENT_LIMIT = 1e4


class TrainingDataError(C2CError, ValueError):
    """A training-sample file or folder cannot be used; the message names the file and the fix.

    ``found`` is what is wrong; ``expected`` and ``fix``, where given, complete the message and let a front
    end show them in its own form (Train C2C Projector's ``dataset`` input).
    """

    def __init__(self, found: str, expected: Optional[str] = None, fix: Optional[str] = None):
        super().__init__(found if fix is None else f"{found}; expected {expected}. Fix: {fix}")
        self.found, self.expected, self.fix = found, expected, fix


@dataclass(frozen=True)
class SampleHost:
    """Whose samples: the host's name in the file, the roles it needs, and what writes its samples (for messages)."""
    name: str
    roles: tuple
    writer: str


@dataclass
class Conditioning:
    """One role's conditioning: named float tensors and JSON values, as the host's conversion made them."""
    tensors: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)


@dataclass
class TrainingSample:
    """One loaded sample: the clean latent (1, C, T, H, W) as saved and the conditioning of each stored role."""
    path: Path
    index: int
    latent: Tensor
    roles: dict


def json_value(value) -> bool:
    """Whether ``value`` can be stored as a JSON value of a sample (finite numbers, strings, lists of them)."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(json_value(v) for v in value)
    return False


# ------------------------------------------------------------------------------------------------
# Writing: never overwrites, numbered sample_NNNNN.safetensors
# ------------------------------------------------------------------------------------------------
def _next_index(folder: Path) -> int:
    found = [int(m.group(1)) for p in folder.iterdir() if (m := _SAMPLE_NAME.match(p.name))]
    return max(found, default=0) + 1


def save_sample(folder, host: SampleHost, latent: Tensor, roles: dict, dropped=()) -> Path:
    """Write one sample into ``folder`` as the next ``sample_NNNNN.safetensors`` (never replacing a file).

    ``latent``: (1, C, T, H, W); ``roles``: {role: Conditioning} holding at least ``host.roles``;
    ``dropped``: what the host's conversion could not store (listed in the file). Returns the path.
    """
    if latent.dim() != 5 or latent.shape[0] != 1 or not latent.is_floating_point():
        raise TrainingDataError(f"latent of shape {tuple(latent.shape)} and dtype {latent.dtype}; expected one float "
                                f"video latent (1, C, T, H, W).")
    missing = [r for r in host.roles if r not in roles]
    unknown = sorted(set(roles) - set(ROLES))
    if missing or unknown:
        raise TrainingDataError(f"sample roles {sorted(roles)}: {missing} missing, {unknown} unknown; expected "
                                f"{list(host.roles)} (of {list(ROLES)}).")
    tensors = {"latent": latent}
    described = {}
    for role, cond in roles.items():
        for name, t in cond.tensors.items():
            if not _TENSOR_NAME.match(name) or not torch.is_tensor(t) or not t.is_floating_point():
                raise TrainingDataError(f"{role} tensor {name!r} ({type(t).__name__}"
                                        f"{'' if not torch.is_tensor(t) else ' ' + str(t.dtype)}); expected a float "
                                        f"tensor named with letters, digits, '_' or '.'.")
            tensors[f"{role}.{name}"] = t
        bad = [k for k, v in cond.values.items() if not isinstance(k, str) or not json_value(v)]
        if bad:
            raise TrainingDataError(f"{role} values {bad} are not JSON numbers, strings or lists of them.")
        described[role] = {"tensors": sorted(cond.tensors),
                           "values": {k: list(v) if isinstance(v, tuple) else v for k, v in cond.values.items()}}
    meta = {"format_version": FORMAT_VERSION, "host": host.name, "latent_shape": list(latent.shape),
            "roles": described, "dropped": list(dropped),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    floats = {k: v.float() for k, v in tensors.items()}
    index = _next_index(folder)
    while True:     # a second writer may take a number between the scan and the write: take the next
        path = folder / f"sample_{index:05d}.safetensors"
        try:
            save_tensors_with_meta(path, floats, meta, SAMPLE_KEY, overwrite=False)
            return path
        except FileExistsError:
            index += 1


# ------------------------------------------------------------------------------------------------
# Reading: headers checked up front, tensors read per use
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """Where a sample's tensors are: {role: {name: stored tensor name}} and each role's JSON values."""
    host: str
    names: dict
    values: dict


def _layout_v2(path: Path, meta: dict, writer: str) -> _Layout:
    roles = meta.get("roles")
    if not isinstance(roles, dict) or not isinstance(meta.get("host"), str):
        raise TrainingDataError(f"{path}: sample metadata without roles or host; re-save it with {writer}.")
    names, values = {}, {}
    for role, entry in roles.items():
        try:
            tensors, vals = entry["tensors"], entry["values"]
            if not all(isinstance(n, str) and _TENSOR_NAME.match(n) for n in tensors) or not isinstance(vals, dict):
                raise TypeError("tensors/values")
        except (KeyError, TypeError) as e:
            raise TrainingDataError(f"{path}: {role} is malformed ({e!r}); re-save the sample.") from None
        names[role] = {n: f"{role}.{n}" for n in tensors}
        values[role] = vals
    return _Layout(meta["host"], names, values)


def _layout_v1(path: Path, meta: dict, writer: str) -> _Layout:
    """Format 1 (ComfyUI only): per role a list of exactly one conditioning entry, tensors ``<role>.0.<name>``."""
    roles = meta.get("roles")
    if not isinstance(roles, dict) or sorted(roles) != sorted(ROLES):
        raise TrainingDataError(f"{path}: sample metadata names roles {sorted(roles) if isinstance(roles, dict) else roles!r}; "
                                f"expected {list(ROLES)}. Re-save it with {writer}.")
    names, values = {}, {}
    for role in ROLES:
        entries = roles[role]
        if not isinstance(entries, list) or len(entries) != 1:
            raise TrainingDataError(
                f"{path}: {role} has {len(entries) if isinstance(entries, list) else 'no'} conditioning entries; "
                f"expected exactly 1. Do not combine or area-split the conditioning you save for training.")
        entry, prefix = entries[0], f"{role}.0"
        try:
            found = ([CROSS_ATTN] if entry["cross_attn"] else []) + list(entry["tensors"])
            found += [f"{key}.{i}" for key, n in entry["tensor_lists"].items() for i in range(int(n))]
            found += [CLIP_VISION] if entry["clip_vision_output"] else []
            if not isinstance(entry["values"], dict):
                raise TypeError("values")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TrainingDataError(f"{path}: {role} entry 0 is malformed ({e!r}); re-save the sample.") from None
        names[role] = {n: f"{prefix}.{n}" for n in found}
        values[role] = entry["values"]
    return _Layout("comfyui", names, values)


def _read_layout(path: Path, host: SampleHost, index: int) -> _Layout:
    try:
        meta = read_meta(path, SAMPLE_KEY)
    except C2CError as e:
        try:
            read_meta(path, _OLD_DIFFUSERS_KEY)
        except C2CError:
            raise TrainingDataError(f"{path} is not a training sample: {e}") from None
        raise TrainingDataError(f"{path} was written by an earlier c2c_diffusers (metadata {_OLD_DIFFUSERS_KEY!r}), "
                                f"whose samples this version does not read; write it again with {host.writer}.") from None
    version = meta.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise TrainingDataError(f"{path}: sample format {version!r}; expected 1 or {FORMAT_VERSION}. Update DiT "
                                f"Cache Bridge or re-save the sample.")
    layout = (_layout_v1 if version == 1 else _layout_v2)(path, meta, host.writer)
    if layout.host != host.name:
        raise TrainingDataError(f"sample index {index}: {path} was written by the {layout.host} host; this is the "
                                f"{host.name} host, whose latent space and image conditioning differ. Save the "
                                f"sample with {host.writer}.")
    missing = [r for r in host.roles if r not in layout.names]
    unknown = sorted(set(layout.names) - set(ROLES))
    if missing or unknown:
        raise TrainingDataError(f"{path}: sample metadata names roles {sorted(layout.names)}; expected "
                                f"{list(host.roles)}. Re-save it with {host.writer}.")
    return layout


def _nonfinite_fix(folder: Path, names: list, writer: str) -> str:
    return (f"delete {', '.join(names)} from {folder} (or save it again from a finite latent and conditioning: "
            f"look upstream of {writer} for what produced NaN/Inf, e.g. fp16 overflow in the VAE) and run again")


class TrainingSet:
    """The sample files of one folder for one host. Headers are validated up front; tensors are read per use."""

    def __init__(self, folder: Path, host: SampleHost, paths: list, layouts: list, shapes: list,
                 text_widths: Optional[list] = None):
        self.folder, self.host, self.paths = folder, host, paths
        self._layouts, self._shapes = layouts, shapes
        self._text_widths = text_widths or [{} for _ in paths]     # per sample {role: width of its cross_attn}

    @classmethod
    def open(cls, folder, host: SampleHost) -> "TrainingSet":
        folder = Path(folder)
        if not folder.is_dir():
            raise TrainingDataError(f"training-sample folder {folder} does not exist")
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(".safetensors"))
        if not paths:
            raise TrainingDataError(f"training-sample folder {folder} holds no .safetensors samples")
        layouts, shapes, widths = [], [], []
        for index, path in enumerate(paths):
            layout = _read_layout(path, host, index)
            try:
                _, entries = read_header(path)
            except C2CError as e:
                raise TrainingDataError(f"{path} is not a training sample: {e}") from None
            expected = ["latent"] + [stored for names in layout.names.values() for stored in names.values()]
            missing = sorted(set(expected) - set(entries))
            unexpected = sorted(set(entries) - set(expected))
            if missing or unexpected:
                raise TrainingDataError(f"{path}: tensors {missing} are missing and {unexpected} unexpected; the "
                                        f"file does not match its metadata. Re-save the sample.")
            bad = [n for n in expected if entries[n][1] not in FLOAT_DTYPES]
            shape = entries["latent"][0]
            if bad or len(shape) != 5 or shape[0] != 1:
                raise TrainingDataError(f"{path}: latent {list(shape)} / non-float tensors {bad}; expected a "
                                        f"(1, C, T, H, W) float latent and float conditioning.")
            layouts.append(layout)
            shapes.append(tuple(shape))
            widths.append({role: entries[names[CROSS_ATTN]][0][-1] for role, names in layout.names.items()
                           if CROSS_ATTN in names and entries[names[CROSS_ATTN]][0]})
        data = cls(folder, host, paths, layouts, shapes, widths)
        data._check_finite_latents()
        return data

    def __len__(self) -> int:
        return len(self.paths)

    def latent_shape(self, index: int) -> tuple:
        return self._shapes[index]

    def roles(self, index: int) -> list:
        """The roles sample ``index`` stores."""
        return sorted(self._layouts[index].names)

    def __getitem__(self, index: int) -> TrainingSample:
        path, layout = self.paths[index], self._layouts[index]
        stored = ["latent"] + [s for names in layout.names.values() for s in names.values()]
        tensors = load_tensors(path, stored)
        for name in stored:
            t = tensors[name]
            if not bool(torch.isfinite(t).all()):
                raise TrainingDataError(f"sample index {index} ({path.name}): tensor {name!r} holds NaN or Inf "
                                        f"values", _FINITE, _nonfinite_fix(self.folder, [path.name], self.host.writer))
        roles = {role: Conditioning({name: tensors[s] for name, s in names.items()}, dict(layout.values[role]))
                 for role, names in layout.names.items()}
        return TrainingSample(path, index, tensors["latent"], roles)

    def check_models(self, receiver, sharer) -> None:
        """Refuse samples made for other models before any of them loads: the latent's channels must be the
        receiver's (``ArchTag.out_channels``) and each role's text embedding as wide as its model's text input
        (``ArchTag.text_dim``). Untagged models (None) are not checked. Raises TrainingDataError."""
        for side, arch in (("receiver", receiver), ("sharer", sharer)):
            if arch is None:
                continue
            for index, path in enumerate(self.paths):
                channels = self._shapes[index][1]
                if side == "receiver" and channels != arch.out_channels:
                    raise TrainingDataError(
                        f"sample index {index} ({path.name}) in {self.folder}: the latent has {channels} channels",
                        f"the models' {arch.out_channels}-channel latent ({arch.family})",
                        f"save samples for these models with {self.host.writer} (its latent encoded by these models' "
                        f"VAE), or pick the dataset made for them")
                for role, width in sorted(self._text_widths[index].items()):
                    if role.startswith(side) and width != arch.text_dim:
                        raise TrainingDataError(
                            f"sample index {index} ({path.name}) in {self.folder}: {role} has text embeddings "
                            f"{width} wide", f"the {side}'s text width {arch.text_dim} ({arch.describe()})",
                            f"save samples with the {side}'s own text encoder through {self.host.writer}, or pick "
                            f"the dataset made for these models")

    def _check_finite_latents(self) -> None:
        """Refuse samples whose latent holds NaN/Inf or absurd magnitudes before any model loads (they would only
        show up as a NaN or infinite loss steps later, blamed on the projector). Every latent is read once;
        conditioning is checked as each sample is used."""
        watch = FiniteWatch()
        huge = {}
        for index, path in enumerate(self.paths):
            latent = load_tensors(path, ["latent"])["latent"]
            watch.observe(index, latent)
            worst = float(latent.abs().amax()) if latent.numel() else 0.0
            if math.isfinite(worst) and worst > LATENT_LIMIT:
                huge[index] = worst
        bad = watch.bad_layers()
        if bad:
            shown = [f"index {i} ({self.paths[i].name})" for i in bad[:8]] + (["…"] if len(bad) > 8 else [])
            raise TrainingDataError(f"the latents of samples {', '.join(shown)} in {self.folder} hold NaN or Inf values",
                                    _FINITE, _nonfinite_fix(self.folder, [self.paths[i].name for i in bad[:8]],
                                                            self.host.writer))
        if huge:
            ids = sorted(huge)[:8]
            shown = [f"index {i} ({self.paths[i].name}, up to {huge[i]:.3g})" for i in ids] + (["…"] if len(huge) > 8 else [])
            raise TrainingDataError(f"the latents of samples {', '.join(shown)} in {self.folder} hold values far beyond "
                                    f"any VAE latent; this is the data, not the projector",
                                    f"latent values within ±{LATENT_LIMIT:g} (a latent from VAE Encode or a sampler)",
                                    f"delete {', '.join(self.paths[i].name for i in ids)} from {self.folder} (or "
                                    f"save it again from VAE Encode's output: look upstream of {self.host.writer} "
                                    f"for a scaling node or a broken encoder) and run again")


# ------------------------------------------------------------------------------------------------
# Draws: which sample, noise, time and branch a training item uses -- a pure function of (seed, counter)
# ------------------------------------------------------------------------------------------------
def seed_of(*parts) -> int:
    """A 63-bit seed from any parts (a seed, a purpose, a counter): stable across processes and runs."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Draw:
    """One training item: sample ``index``, its ``noise`` (the latent's shape), ``t`` in [0, 1) for the host to
    turn into a sigma, and whether it trains the ``negative`` roles."""
    counter: int
    index: int
    noise: Tensor
    t: float
    negative: bool


class SampleDraws:
    """``draws(step)``: this rank's items of a training step, a pure function of (seed, step, rank).

    Samples are drawn without replacement in a fresh permutation per epoch, split across ranks; each
    item's noise, time and branch come from its own seeded generator, never from torch's global RNG, so
    a resumed run sees exactly the items of an uninterrupted one. Rank r's item j of step s is item
    r*B+j of the one-process step with the same global batch.
    """

    def __init__(self, dataset: TrainingSet, seed: int, negative_share: float = 0.0, batch_size: int = 1,
                 rank: int = 0, world: int = 1):
        self.dataset, self.seed, self.negative_share = dataset, seed, negative_share
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self._perm: Optional[tuple] = None

    def _index(self, counter: int) -> int:
        epoch, position = divmod(counter, len(self.dataset))
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(seed_of(self.seed, "epoch", epoch))
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=gen))
        return int(self._perm[1][position])

    def draw(self, counter: int) -> Draw:
        index = self._index(counter)
        gen = torch.Generator().manual_seed(seed_of(self.seed, "item", counter))
        noise = torch.randn(self.dataset.latent_shape(index), generator=gen)
        t, share = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        return Draw(counter, index, noise, t, share < self.negative_share)

    def __call__(self, step: int) -> list:
        first = (step * self.world + self.rank) * self.batch_size
        return [self.draw(first + j) for j in range(self.batch_size)]
