"""The K/V recording file format: tensor names, storage encoding, metadata, save and strict load.

A recording is one ``.safetensors`` file (written through ``c2c_core.tensorfile``): one tensor per
recorded model evaluation, CFG pass (kind 0 positive, 1 negative) and layer, named
``s<slot>.c<kind>.l<layer>.k|v`` and shaped (B, N, H*D) as the attention call hands K/V over, stored in
fp32/fp16/bf16 or fp8 (e4m3, with a ``.scale`` next to it so large values survive), plus the metadata
(:meth:`KVRecording.meta`) under ``c2c_kv_recording``. Loading (:func:`load_recording`) raises only the
BundleError family from ``c2c_core.errors`` (a missing file is also a FileNotFoundError): metadata and
every tensor's name, shape and dtype are checked against each other before the recording is handed out,
so a damaged file fails at Load KV Cache, not on KSampler.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor

from ..align import RopeSpec
from ..arch import ArchTag
from ..errors import (C2CError, FormatVersionError, InvalidMetadataError, MissingMetadataError, MissingTensorError,
                      ShapeMismatchError, SignatureError, UnexpectedTensorError, quote)
from ..signature import ModelSignature, TokenGrid
from ..tensorfile import parse_meta, short_path, snapshot, stream_tensors_with_meta
from .store import DiskStore, RamStore

__all__ = ["RECORDING_KEY", "RECORDING_VERSION", "STORAGE_DTYPES", "tensor_name", "encode", "decode",
           "MissingStepError", "KVRecording", "save_recording", "load_recording"]

RECORDING_KEY = "c2c_kv_recording"
RECORDING_VERSION = 1
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
if hasattr(torch, "float8_e4m3fn"):
    STORAGE_DTYPES["fp8_e4m3fn"] = torch.float8_e4m3fn
_FP8_MAX = 448.0


def tensor_name(step: int, kind: int, layer: int, which: str) -> str:
    """The stored name of one K or V: ``s<slot>.c<kind>.l<layer>.k|v``."""
    return f"s{step}.c{kind}.l{layer}.{which}"


def encode(t: Tensor, dtype_name: str) -> dict[str, Tensor]:
    """Tensor(s) to store for one K or V in the storage dtype (fp8 gets a scale next to it)."""
    dtype = STORAGE_DTYPES[dtype_name]
    if dtype_name.startswith("fp8"):
        scale = (t.detach().abs().amax().float() / _FP8_MAX).clamp_min(1e-12)
        return {"": (t.float() / scale).to(dtype), ".scale": scale.reshape(1)}
    return {"": t.detach().to(dtype)}


def decode(stored: Mapping[str, Tensor]) -> Tensor:
    t = stored[""]
    if ".scale" in stored:
        return t.float() * stored[".scale"].to(t.device)
    return t


class MissingStepError(MissingTensorError, KeyError):
    """Replay asked for a (step, kind, layer) the recording does not hold (also a KeyError)."""

    def __str__(self):
        return self.args[0] if self.args else ""

    @classmethod
    def at(cls, step: int, kind: int, layer: int) -> "MissingStepError":
        return cls(
            f"the K/V recording holds no step {step} of layer {layer} ({'negative' if kind else 'positive'} "
            f"pass); expected every step the receiver's sampler evaluates. Record with the receiver's "
            f"sampler, scheduler and steps.")


@dataclass(eq=False)
class KVRecording:
    """A sharer's K/V over one sampling run, with what is needed to check a replay fits."""
    signature: ModelSignature
    grid: TokenGrid
    rope: RopeSpec
    sigmas: list
    layers: tuple
    kinds: tuple = (0,)
    storage_dtype: str = "bf16"
    store: object = field(default_factory=RamStore)
    seed: int | None = None          # the noise seed the sharer was sampled with
    # sigma of each recorded model evaluation (samplers such as heun evaluate more than once per step);
    # tensors are then keyed by evaluation index in the s<index> slot. None: one evaluation per step.
    evaluations: list | None = None

    def put(self, step: int, kind: int, layer: int, k: Tensor, v: Tensor) -> None:
        tensors = {}
        for which, t in (("k", k), ("v", v)):
            for suffix, stored in encode(t, self.storage_dtype).items():
                tensors[tensor_name(step, kind, layer, which) + suffix] = stored
        self.store.put(step, tensors)

    def get(self, step: int, kind: int, layer: int) -> tuple[Tensor, Tensor]:
        out = []
        for which in ("k", "v"):
            base = tensor_name(step, kind, layer, which)
            stored = self.store.get([base, base + ".scale"])
            if base not in stored:
                raise MissingStepError.at(step, kind, layer)
            out.append(decode({s[len(base):]: t for s, t in stored.items()}))
        return out[0], out[1]

    def finish(self) -> None:
        """Recording is over: every tensor is stored (a failed background write raises here)."""
        finish = getattr(self.store, "finish", None)
        if finish is not None:
            finish()

    @property
    def batch_size(self) -> int:
        """Latent batch of the recorded K/V, from the stored shapes (nothing is read)."""
        name = tensor_name(0, self.kinds[0], self.layers[0], "k")
        shape = getattr(self.store, "shape", None)
        return int(shape(name)[0]) if shape is not None else int(self.get(0, self.kinds[0], self.layers[0])[0].shape[0])

    @property
    def steps(self) -> int:
        return max(1, len(self.sigmas) - 1)

    @property
    def slots(self) -> int:
        """Number of recorded model evaluations (the s<index> slots of the tensor names)."""
        return len(self.evaluations) if self.evaluations is not None else self.steps

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    def close(self) -> None:
        """Release the store (a temporary disk store deletes its folder)."""
        self.store.close()

    def meta(self) -> dict:
        return {"format_version": RECORDING_VERSION, "signature": self.signature.to_dict(),
                "grid": self.grid.to_dict(), "rope": self.rope.to_dict(), "sigmas": list(self.sigmas),
                "layers": list(self.layers), "kinds": list(self.kinds), "storage_dtype": self.storage_dtype,
                "seed": self.seed, **({} if self.evaluations is None else {"evaluations": list(self.evaluations)})}


def save_recording(path: str | os.PathLike, recording: KVRecording, overwrite: bool = False) -> None:
    """One .safetensors file: every recorded tensor plus the recording's metadata.

    Streams tensor by tensor (a disk recording is copied disk to disk, never read into memory), to a
    temp file that is renamed into place; raises FileExistsError rather than replace a file.
    """
    stream_tensors_with_meta(path, recording.store.sources(), recording.meta(), RECORDING_KEY, overwrite=overwrite)


#: bounds a stranger's header must respect before anything is built from it
MAX_STEPS = 10000
MAX_TOKENS = 2**24
MAX_SIGNATURE = {"num_layers": 1024, "num_heads": 1024, "head_dim": 4096}
_TENSOR_NAME = re.compile(r"^s(\d{1,6})\.c(\d)\.l(\d{1,5})\.([kv])(\.scale)?$")
_STORED_DTYPE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "fp8_e4m3fn": "F8_E4M3"}


class _Checker:
    """One message style for recording metadata: file, field, what was found, what was expected."""

    def __init__(self, path):
        self.where = short_path(path)

    def fail(self, name, value, expected):
        raise InvalidMetadataError(f"{self.where}: recording metadata {name} is {quote(value, 80)}; expected "
                                   f"{expected}. The file is damaged or not from Save KV Cache; record it again.")

    def int_(self, name, value, lo, hi):
        if type(value) is not int or not lo <= value <= hi:
            self.fail(name, value, f"an integer in {lo}..{hi}")
        return value

    def number(self, name, value, lo=-math.inf, hi=math.inf, positive=False):
        if type(value) is int and abs(value) > 2**53:
            value = math.inf
        if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi or (positive and value <= 0):
            self.fail(name, value, f"a finite number{' > 0' if positive else ''}"
                                   f"{f' in [{lo}, {hi}]' if math.isfinite(lo) or math.isfinite(hi) else ''}")
        return float(value)

    def obj(self, meta, name, kind=dict):
        if name not in meta:
            self.fail(name, "missing", "present")
        value = meta[name]
        if not isinstance(value, kind):
            self.fail(name, value, f"a JSON {'object' if kind is dict else 'list'}")
        return value

    def triple(self, name, value, positive):
        if not isinstance(value, list) or len(value) != 3:
            self.fail(name, value, "a list of three numbers (t, y, x)")
        return tuple(self.number(f"{name}[{i}]", v, positive=positive) for i, v in enumerate(value))


def _parse_arch(c: "_Checker", d, values: Mapping) -> Optional[ArchTag]:
    """The sharer's architecture tag (recordings saved before tags existed have none), checked against the
    signature it travels with, so a loaded recording is held to a projector's tag as a fresh one is."""
    if d is None:
        return None
    try:
        arch = ArchTag.from_dict(d)
    except SignatureError as e:
        c.fail("signature.arch", d, f"a valid architecture tag ({e})")
    if (arch.num_layers, arch.num_heads, arch.dim) != (values["num_layers"], values["num_heads"],
                                                        values["num_heads"] * values["head_dim"]):
        c.fail("signature.arch", arch.describe(), f"a tag matching the signature ({values['num_layers']} layers, "
                                                  f"{values['num_heads']} heads × {values['head_dim']})")
    return arch


def _parse_recording_meta(path, meta: Mapping) -> KVRecording:
    c = _Checker(path)
    version = c.obj(meta, "format_version", int)
    if type(version) is int and version > RECORDING_VERSION:
        raise FormatVersionError(f"{c.where}: recording format {quote(version, 40)} is newer than this version understands "
                                 f"({RECORDING_VERSION}); update DiT Cache Bridge.")
    c.int_("format_version", version, 1, RECORDING_VERSION)
    dtype = meta.get("storage_dtype")
    if not isinstance(dtype, str) or dtype not in STORAGE_DTYPES:
        c.fail("storage_dtype", dtype, f"one of {sorted(STORAGE_DTYPES)}")
    sig = c.obj(meta, "signature")
    values = {f: c.int_(f"signature.{f}", sig.get(f), 1, hi) for f, hi in MAX_SIGNATURE.items()}
    name = sig.get("name", "")
    if not isinstance(name, str) or len(name) > 256:
        c.fail("signature.name", name, "a short string")
    arch = _parse_arch(c, sig.get("arch"), values)
    grid_d = c.obj(meta, "grid")
    grid = TokenGrid(**{f: c.int_(f"grid.{f}", grid_d.get(f), 1, MAX_TOKENS) for f in ("frames", "height", "width")})
    if grid.numel > MAX_TOKENS:
        c.fail("grid", grid.shape, f"at most {MAX_TOKENS} tokens")
    rope_d = c.obj(meta, "rope")
    rope = RopeSpec(theta=c.number("rope.theta", rope_d.get("theta", 10000.0), positive=True),
                    scale=c.triple("rope.scale", rope_d.get("scale", [1.0, 1.0, 1.0]), positive=True),
                    shift=c.triple("rope.shift", rope_d.get("shift", [0.0, 0.0, 0.0]), positive=False))
    sigmas = c.obj(meta, "sigmas", list)
    if not 2 <= len(sigmas) <= MAX_STEPS + 1:
        c.fail("sigmas", f"a list of {len(sigmas)}", f"2..{MAX_STEPS + 1} noise levels")
    sigmas = [c.number(f"sigmas[{i}]", s, lo=0.0) for i, s in enumerate(sigmas)]
    layers = c.obj(meta, "layers", list)
    if not layers or len(set(map(repr, layers))) != len(layers):
        c.fail("layers", layers, "a non-empty list of distinct layer indices")
    layers = tuple(c.int_("layers[]", i, 0, values["num_layers"] - 1) for i in layers)
    kinds = c.obj(meta, "kinds", list)
    if not kinds or len(kinds) > 2 or len(set(map(repr, kinds))) != len(kinds):
        c.fail("kinds", kinds, "[0] or [0, 1] (positive, and negative pass)")
    kinds = tuple(c.int_("kinds[]", k, 0, 1) for k in kinds)
    seed = meta.get("seed")
    if seed is not None:
        c.int_("seed", seed, -2**63, 2**64 - 1)
    evaluations = meta.get("evaluations")
    if evaluations is not None:
        if not isinstance(evaluations, list) or not 1 <= len(evaluations) <= 4 * MAX_STEPS:
            c.fail("evaluations", evaluations, f"a list of 1..{4 * MAX_STEPS} noise levels (one per model evaluation)")
        evaluations = [c.number(f"evaluations[{i}]", s, lo=0.0) for i, s in enumerate(evaluations)]
    return KVRecording(signature=ModelSignature(name=name, arch=arch, **values), grid=grid, rope=rope, sigmas=sigmas,
                       layers=layers, kinds=kinds, storage_dtype=dtype, seed=seed, evaluations=evaluations)


def _check_recording_tensors(path, rec: KVRecording, entries: Mapping) -> None:
    """Every tensor is a known (step, kind, layer) with the right shape and dtype, and every kind and
    layer holds K and V of every step (the stock samplers evaluate the model once or more per step)."""
    where = short_path(path)
    width, tokens = rec.signature.width, rec.grid.numel
    fp8 = rec.storage_dtype.startswith("fp8")
    stored = _STORED_DTYPE[rec.storage_dtype]
    steps_of: dict[tuple, set] = {(kind, layer, w): set() for kind in rec.kinds for layer in rec.layers for w in "kv"}
    batch = None
    for name, (shape, dtype) in entries.items():
        m = _TENSOR_NAME.match(name)
        if not m:
            raise UnexpectedTensorError(f"{where}: tensor {quote(name, 80)} is not a recorded K/V name "
                                        f"(s<step>.c<kind>.l<layer>.k|v); the file is not from Save KV Cache.")
        step, kind, layer, which, scale = int(m[1]), int(m[2]), int(m[3]), m[4], m[5]
        if step >= rec.slots or kind not in rec.kinds or layer not in rec.layers:
            raise UnexpectedTensorError(f"{where}: tensor {quote(name, 80)} is outside the metadata's {rec.slots} "
                                        f"steps, passes {list(rec.kinds)} and layers {quote(list(rec.layers), 80)}.")
        if scale:
            if not fp8 or tuple(shape) != (1,) or dtype != "F32":
                raise ShapeMismatchError(f"{where}: tensor {name!r} is a {dtype} {list(shape)} scale; expected a F32 [1] "
                                         f"scale only next to fp8 tensors.")
            continue
        if dtype != stored or len(shape) != 3 or shape[1] != tokens or shape[2] != width or shape[0] < 1:
            raise ShapeMismatchError(
                f"{where}: tensor {name!r} is {dtype} {quote(list(shape), 60)}; expected {stored} (batch, {tokens}, {width}) "
                f"for the metadata's {rec.grid.frames}×{rec.grid.height}×{rec.grid.width} grid and "
                f"{rec.signature.num_heads}×{rec.signature.head_dim} heads. Record it again.")
        if batch is not None and shape[0] != batch:
            raise ShapeMismatchError(f"{where}: tensor {name!r} has batch {shape[0]}; the others have {batch}.")
        batch = shape[0]
        if fp8 and name + ".scale" not in entries:
            raise MissingTensorError(f"{where}: fp8 tensor {name!r} has no '.scale' next to it; record it again.")
        steps_of[(kind, layer, which)].add(step)
    every = set(range(rec.slots))
    for (kind, layer, which), steps in steps_of.items():
        if steps != every:
            raise MissingTensorError(
                f"{where}: the recording has no {which.upper()} of layer {layer} ({'negative' if kind else 'positive'} "
                f"pass) for steps {sorted(every - steps)[:5]}; expected all {rec.slots} steps of its sigmas for every "
                f"layer and pass. The file is incomplete; record it again.")


def load_recording(path: str | os.PathLike) -> KVRecording:
    """Open a saved recording; tensors stay on disk and are read step by step during replay.

    Metadata and tensors come from one version of the file: if it is replaced after loading, reads
    raise FileChangedError instead of mixing two recordings.
    """
    snap = snapshot(path)
    if RECORDING_KEY not in snap.metadata:
        raise MissingMetadataError(f"{short_path(path)}: no '{RECORDING_KEY}' metadata; this is not a K/V recording "
                                   f"saved by Save KV Cache. Pick a file written by Save KV Cache.")
    meta = parse_meta(Path(path), snap.metadata, RECORDING_KEY)
    try:
        rec = _parse_recording_meta(path, meta)
    except C2CError as e:
        if isinstance(e, (InvalidMetadataError, FormatVersionError)):
            raise
        raise InvalidMetadataError(f"{short_path(path)}: recording metadata is malformed ({quote(str(e), 200)}); "
                                   f"record it again.") from None
    _check_recording_tensors(path, rec, snap.header())
    store = DiskStore()
    store.add(snap)
    rec.store = store
    return rec

