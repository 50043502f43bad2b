"""K/V recordings: a sharer's self-attention K/V over a whole sampling run, for replay.

Recorded (low-VRAM) mode samples the sharer alone first, keeping the chosen layers' K/V per step
and CFG chunk kind, then replays them into the receiver's run, so only one model is resident at a
time. Entries are ``(step, kind, layer) -> (k, v)`` with k, v shaped (B, N, H*D) as the attention
call hands them over. Storage is RAM or safetensors files on disk (read back lazily, one step at a
time), in fp32/fp16/bf16 or fp8 (e4m3, with a per-tensor scale so large values survive).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from torch import Tensor

from .align import RopeSpec
from .bundle import read_header, save_tensors_with_meta
from .errors import BundleError, FormatVersionError, InvalidMetadataError, MissingMetadataError
from .kv import ModelSignature, TokenGrid

RECORDING_KEY = "c2c_kv_recording"
RECORDING_VERSION = 1
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
if hasattr(torch, "float8_e4m3fn"):
    STORAGE_DTYPES["fp8_e4m3fn"] = torch.float8_e4m3fn
_FP8_MAX = 448.0


def _name(step: int, kind: int, layer: int, which: str) -> str:
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


class RamStore:
    """Recorded tensors kept in (CPU or device) memory."""

    def __init__(self):
        self.tensors: dict[str, Tensor] = {}

    def put(self, step: int, tensors: dict[str, Tensor]) -> None:
        self.tensors.update({k: v.to("cpu") if v.device.type != "cpu" else v for k, v in tensors.items()})

    def get(self, names) -> dict[str, Tensor]:
        return {n: self.tensors[n] for n in names if n in self.tensors}

    def all(self) -> dict[str, Tensor]:
        return dict(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class DiskStore:
    """Recorded tensors spilled to safetensors files, one per step; reads open them lazily.

    While recording, the current step's tensors are held in memory and written once, when the next
    step begins (or on the first read), so memory holds about one step and every file is written once.
    """

    def __init__(self, folder: str | os.PathLike | None = None, files: list[Path] | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.index: dict[str, Path] = {}
        self._step: int | None = None
        self._pending: dict[str, Tensor] = {}
        for path in files or []:
            _, entries = read_header(path)
            self.index.update({name: Path(path) for name in entries})

    def put(self, step: int, tensors: dict[str, Tensor]) -> None:
        if step != self._step:
            self.flush()
            self._step = step
        self._pending.update({k: v.to("cpu") for k, v in tensors.items()})

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.folder / f"step_{self._step:05d}.safetensors"
        save_tensors_with_meta(path, self._pending, {"step": self._step}, RECORDING_KEY + "_part")
        self.index.update({name: path for name in self._pending})
        self._pending = {}

    def get(self, names) -> dict[str, Tensor]:
        self.flush()
        out, by_file = {}, {}
        for n in names:
            if n in self.index:
                by_file.setdefault(self.index[n], []).append(n)
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                out.update({n: f.get_tensor(n) for n in group})
        return out

    def all(self) -> dict[str, Tensor]:
        self.flush()
        return self.get(list(self.index))

    @property
    def nbytes(self) -> int:
        self.flush()
        return sum(p.stat().st_size for p in set(self.index.values()))


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

    def put(self, step: int, kind: int, layer: int, k: Tensor, v: Tensor) -> None:
        tensors = {}
        for which, t in (("k", k), ("v", v)):
            for suffix, stored in encode(t, self.storage_dtype).items():
                tensors[_name(step, kind, layer, which) + suffix] = stored
        self.store.put(step, tensors)

    def get(self, step: int, kind: int, layer: int) -> tuple[Tensor, Tensor]:
        out = []
        for which in ("k", "v"):
            base = _name(step, kind, layer, which)
            stored = self.store.get([base, base + ".scale"])
            if base not in stored:
                raise KeyError((step, kind, layer))
            out.append(decode({s[len(base):]: t for s, t in stored.items()}))
        return out[0], out[1]

    @property
    def steps(self) -> int:
        return max(1, len(self.sigmas) - 1)

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    def meta(self) -> dict:
        return {"format_version": RECORDING_VERSION, "signature": self.signature.to_dict(),
                "grid": self.grid.to_dict(), "rope": self.rope.to_dict(), "sigmas": list(self.sigmas),
                "layers": list(self.layers), "kinds": list(self.kinds), "storage_dtype": self.storage_dtype,
                "seed": self.seed}


def save_recording(path: str | os.PathLike, recording: KVRecording) -> None:
    """One .safetensors file: every recorded tensor plus the recording's metadata."""
    save_tensors_with_meta(path, recording.store.all(), recording.meta(), RECORDING_KEY)


def load_recording(path: str | os.PathLike) -> KVRecording:
    """Open a saved recording; tensors stay on disk and are read step by step during replay."""
    metadata, _ = read_header(path)
    if RECORDING_KEY not in metadata:
        raise MissingMetadataError(f"{path}: no '{RECORDING_KEY}' metadata; this is not a K/V recording saved by "
                                   f"Save KV Cache. Pick a file written by Save KV Cache.")
    import json
    try:
        meta = json.loads(metadata[RECORDING_KEY])
        version = int(meta["format_version"])
        if version > RECORDING_VERSION:
            raise FormatVersionError(f"{path}: recording format {version} is newer than this version understands "
                                     f"({RECORDING_VERSION}); update DiT Cache Bridge.")
        if meta["storage_dtype"] not in STORAGE_DTYPES:
            raise InvalidMetadataError(f"{path}: storage dtype {meta['storage_dtype']!r} is not supported here.")
        return KVRecording(signature=ModelSignature.from_dict(meta["signature"]), grid=TokenGrid.from_dict(meta["grid"]),
                           rope=RopeSpec.from_dict(meta["rope"]), sigmas=[float(s) for s in meta["sigmas"]],
                           layers=tuple(int(i) for i in meta["layers"]), kinds=tuple(int(i) for i in meta["kinds"]),
                           storage_dtype=meta["storage_dtype"], store=DiskStore(files=[Path(path)]),
                           seed=None if meta.get("seed") is None else int(meta["seed"]))
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidMetadataError(f"{path}: recording metadata is malformed ({e}); re-record it with "
                                   f"Capture KV Cache in recorded mode.") from e
