"""K/V recordings: a sharer's self-attention K/V over a whole sampling run, for replay.

Loading (:func:`load_recording`) raises only the BundleError family from ``c2c_core.errors``
(InvalidMetadataError, MissingTensorError, UnexpectedTensorError, ShapeMismatchError, ...; a missing
file is also a FileNotFoundError): metadata and every tensor's name, shape and dtype are checked
against each other before the recording is handed out, so a damaged file fails at Load KV Cache,
not on KSampler.

Recorded (low-VRAM) mode samples the sharer alone first, keeping the chosen layers' K/V per step
and CFG chunk kind, then replays them into the receiver's run, so only one model is resident at a
time. Entries are ``(step, kind, layer) -> (k, v)`` with k, v shaped (B, N, H*D) as the attention
call hands them over. Storage is RAM or safetensors files on disk (read back lazily, one step at a
time), in fp32/fp16/bf16 or fp8 (e4m3, with a per-tensor scale so large values survive).

Neither side stalls the sampling thread more than it must: tensors leave a CUDA device through pinned
memory without a sync, disk stores write their step files on a background thread (in order, at most
two steps queued, the first failure raised on the sampling thread as :class:`RecordingWriteError`),
and a replay reads through :class:`ReplayReader` (files opened once per run, fp8 decoded on the device,
pinned non-blocking copies and one step read ahead on CUDA).
"""
from __future__ import annotations

import math
import os
import queue
import re
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor

from .align import RopeSpec
from .bundle import _ALL_DTYPES, _identity, _parse_meta, _short_path, save_tensors_with_meta, snapshot, stream_tensors_with_meta
from .errors import (C2CError, FileChangedError, FormatVersionError, InvalidMetadataError, MissingMetadataError,
                     MissingTensorError, ShapeMismatchError, SignatureError, UnexpectedTensorError, quote)
from .arch import ArchTag
from .signature import ModelSignature, TokenGrid

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


class MissingStepError(MissingTensorError, KeyError):
    """Replay asked for a (step, kind, layer) the recording does not hold (also a KeyError)."""

    def __str__(self):
        return self.args[0] if self.args else ""


def _missing(step: int, kind: int, layer: int) -> MissingStepError:
    return MissingStepError(
        f"the K/V recording holds no step {step} of layer {layer} ({'negative' if kind else 'positive'} "
        f"pass); expected every step the receiver's sampler evaluates. Record with the receiver's "
        f"sampler, scheduler and steps.")


class RecordingWriteError(C2CError):
    """A step file of a disk recording could not be written (on the background writer); raised on the
    sampling thread by the next put or read, so the recording node can name it."""


def pinnable(device) -> bool:
    """Pinned host memory pays off (and exists) only for copies to or from a CUDA device."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def _host_buffer(shape, dtype, pin: bool) -> Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def _to_host(t: Tensor):
    """(``t`` on the CPU, event or None) without stalling the caller: a CUDA tensor goes into pinned
    memory by a non-blocking copy whose event says when it has landed; a CPU tensor comes back as is."""
    if t.device.type == "cpu":
        return t, None
    if t.device.type != "cuda":
        return t.to("cpu"), None
    host = _host_buffer(t.shape, t.dtype, True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(t.device))
    return host, event


def _landed(events: list) -> None:
    for event in events:
        event.synchronize()
    events.clear()


class RamStore:
    """Recorded tensors kept in host memory.

    Tensors from a CUDA device arrive through pinned buffers by non-blocking copies; two steps later
    (when those copies have long landed) they are moved into ordinary memory and the pinned buffers go
    back to PyTorch's pinned-memory cache for the next steps, so at most about three steps are pinned.
    """

    def __init__(self):
        self.tensors: dict[str, Tensor] = {}
        self._inflight: list = []       # (step, name, pinned tensor, event) of copies from the device
        self._step = None

    def put(self, step: int, tensors: dict[str, Tensor]) -> None:
        if step != self._step:
            self._step = step
            self._retire(lambda s: s < step - 1)
        for name, t in tensors.items():
            host, event = _to_host(t)
            if event is None:
                self.tensors[name] = host
            else:
                self._inflight.append((step, name, host, event))

    def _retire(self, which) -> None:
        keep = []
        for entry in self._inflight:
            if not which(entry[0]):
                keep.append(entry)
                continue
            _, name, pinned, event = entry
            event.synchronize()
            self.tensors[name] = torch.empty(pinned.shape, dtype=pinned.dtype).copy_(pinned)
        self._inflight = keep

    def finish(self) -> None:
        """Every put tensor is in host memory (waits for pending copies from the device)."""
        self._retire(lambda s: True)

    def get(self, names) -> dict[str, Tensor]:
        self.finish()
        return {n: self.tensors[n] for n in names if n in self.tensors}

    def read_host(self, names, files, pin: bool) -> dict[str, Tensor]:
        """:meth:`get` for a replay: pinned copies when ``pin`` (call :meth:`finish` first)."""
        return {n: (self.tensors[n].pin_memory() if pin else self.tensors[n]) for n in names if n in self.tensors}

    def shape(self, name: str) -> tuple:
        self.finish()
        return tuple(self.tensors[name].shape)

    def all(self) -> dict[str, Tensor]:
        self.finish()
        return dict(self.tensors)

    def sources(self) -> dict:
        self.finish()
        return dict(self.tensors)

    def close(self) -> None:
        self.finish()
        self.tensors = {}

    @property
    def nbytes(self) -> int:
        self.finish()
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class _StepFile:
    """Writing one step's file: waits for its tensors' copies from the device, writes, snapshots it."""

    def __init__(self, path: Path, step: int, tensors: dict, events: list):
        self.path, self.step, self.tensors, self.events = path, step, tensors, events

    def __call__(self):
        _landed(self.events)
        save_tensors_with_meta(self.path, self.tensors, {"step": self.step}, RECORDING_KEY + "_part")
        return snapshot(self.path)


class _Writer:
    """One background thread writing step files in the order they were submitted.

    At most ``depth`` files wait (``submit`` blocks beyond that, so a slow disk slows sampling instead of
    filling RAM). The first failure stops later writes (no file after a hole) and is raised as
    :class:`RecordingWriteError` by every later ``submit`` or ``drain``, on the caller's thread. The
    thread exits when idle and is started again by the next ``submit``.
    """

    IDLE_S = 2.0

    def __init__(self, depth: int = 2):
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._life = threading.Lock()       # starting/stopping the thread vs. handing it work
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done: list = []
        self._error = None

    def submit(self, job: _StepFile) -> None:
        self.check()
        with self._life:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="c2c-recording-writer", daemon=True)
                self._thread.start()
            self._jobs.put(job)

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._life:
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            try:
                if self._error is None:
                    snap = job()
                    with self._lock:
                        self._done.append(snap)
            except BaseException as exc:   # kept for the caller's thread; nothing is written after it
                job.tensors, job.events = {}, []
                self._error = (job, exc)
            finally:
                self._jobs.task_done()

    def wait(self) -> None:
        """Block until every submitted file is written or skipped."""
        self._jobs.join()

    def drain(self) -> list:
        """Wait for every submitted file; the snapshots written since the last drain (or the failure)."""
        self.wait()
        self.check()
        with self._lock:
            done, self._done = self._done, []
        return done

    def check(self) -> None:
        if self._error is not None:
            job, exc = self._error
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise RecordingWriteError(f"step {job.step} of the K/V recording could not be written to "
                                      f"{_short_path(job.path)} ({quote(why, 200)})") from exc


class DiskStore:
    """Recorded tensors spilled to safetensors files, one per step; reads open them lazily.

    While recording, the current step's tensors are held in memory and handed, when the next step
    begins (or on the first read), to a background writer (``background=True``, the default) that
    writes each file once, in order, while sampling goes on; memory holds about three steps at most.
    Reads wait for the writer and raise its failure. A store made by :meth:`temporary` owns its folder
    and deletes it when closed, when it is garbage collected (ComfyUI dropped the cached recording) or
    at interpreter exit.
    """

    def __init__(self, folder: str | os.PathLike | None = None, files: list[Path] | None = None,
                 background: bool = True):
        self.folder = Path(folder) if folder is not None else None
        self.index: dict[str, tuple] = {}
        self._step: int | None = None
        self._pending: dict[str, Tensor] = {}
        self._events: list = []
        self._writer = _Writer() if background else None
        self._cleanup = None
        for path in files or []:
            self.add(snapshot(path))

    @classmethod
    def temporary(cls, parent: str | os.PathLike, prefix: str = "c2c_kv_") -> "DiskStore":
        Path(parent).mkdir(parents=True, exist_ok=True)
        store = cls(tempfile.mkdtemp(prefix=prefix, dir=parent))
        store._cleanup = weakref.finalize(store, shutil.rmtree, str(store.folder), ignore_errors=True)
        return store

    def add(self, snap) -> None:
        self.index.update({name: (snap, name) for name in snap.entries})

    def put(self, step: int, tensors: dict[str, Tensor]) -> None:
        if step != self._step:
            self.flush()
            self._step = step
        for name, t in tensors.items():
            self._pending[name], event = _to_host(t)
            if event is not None:
                self._events.append(event)

    def flush(self) -> None:
        """Hand the current step's tensors to the writer (or write them now, without one)."""
        if self._writer is not None:
            self._writer.check()
        if not self._pending:
            return
        job = _StepFile(self.folder / f"step_{self._step:05d}.safetensors", self._step, self._pending, self._events)
        self._pending, self._events = {}, []
        if self._writer is None:
            self.add(job())
        else:
            self._writer.submit(job)

    def finish(self) -> None:
        """Every put tensor is on disk and readable; a failed background write raises RecordingWriteError."""
        self.flush()
        if self._writer is not None:
            for snap in self._writer.drain():
                self.add(snap)

    def get(self, names) -> dict[str, Tensor]:
        self.finish()
        out, by_file = {}, {}
        for n in names:
            if n in self.index:
                snap, name = self.index[n]
                by_file.setdefault(id(snap), (snap, []))[1].append(name)
        for snap, group in by_file.values():
            out.update(snap.read(group))
        return out

    def read_host(self, names, files: "_OpenFiles", pin: bool) -> dict[str, Tensor]:
        """:meth:`get` for a replay: read through ``files`` (opened once per run) straight into host
        buffers, pinned when ``pin`` (call :meth:`finish` first)."""
        out = {}
        for n in names:
            if n in self.index:
                snap, name = self.index[n]
                e = snap.entries[name]
                out[n] = files.read_into(snap, e, _host_buffer(e.shape, _ALL_DTYPES[e.dtype][0], pin))
        return out

    def shape(self, name: str) -> tuple:
        self.finish()
        snap, entry = self.index[name]
        return tuple(snap.entries[entry].shape)

    def all(self) -> dict[str, Tensor]:
        self.finish()
        return self.get(list(self.index))

    def sources(self) -> dict:
        """name -> (Snapshot, name): what a streaming save copies from disk to disk."""
        self.finish()
        return dict(self.index)

    def close(self) -> None:
        """Delete the folder now (temporary stores), after the writer is done; reads fail afterwards."""
        self._pending, self._events = {}, []
        if self._writer is not None:
            self._writer.wait()
        if self._cleanup is not None:
            self._cleanup()

    @property
    def nbytes(self) -> int:
        self.finish()
        return sum(s.entries[n].end - s.entries[n].begin for s, n in self.index.values())


class _OpenFiles:
    """A replay run's recording files, each opened once (at most ``limit`` open at a time) and checked
    against its snapshot then; reads by offset, from any thread."""

    def __init__(self, limit: int = 8):
        self.limit = limit
        self.opened = 0
        self._files: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def _file(self, snap):
        f = self._files.get(id(snap))
        if f is not None:
            self._files.move_to_end(id(snap))
            return f[1]
        try:
            f = open(snap.path, "rb", buffering=0)
        except OSError as exc:
            raise FileChangedError(f"{_short_path(snap.path)}: cannot reopen the file ({exc.strerror}); it was "
                                   f"moved or removed after it was loaded. Load it again.") from None
        if _identity(os.fstat(f.fileno())) != snap.identity:
            f.close()
            raise FileChangedError(f"{_short_path(snap.path)}: the file changed after its header was read "
                                   f"(replaced or rewritten); refusing to mix two versions. Load it again.")
        self.opened += 1
        self._files[id(snap)] = (snap, f)          # the snapshot is kept so its id stays unique
        while len(self._files) > self.limit:
            self._files.popitem(last=False)[1][1].close()
        return f

    def read_into(self, snap, entry, out: Tensor) -> Tensor:
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        with self._lock:
            f = self._file(snap)
            f.seek(snap.data_start + entry.begin)
            got = f.readinto(view) if len(view) else 0
        if got != len(view):
            raise FileChangedError(f"{_short_path(snap.path)}: the file is shorter than its header says "
                                   f"(truncated while in use); load it again.")
        return out

    def close(self) -> None:
        with self._lock:
            for _, f in self._files.values():
                f.close()
            self._files.clear()


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
                tensors[_name(step, kind, layer, which) + suffix] = stored
        self.store.put(step, tensors)

    def get(self, step: int, kind: int, layer: int) -> tuple[Tensor, Tensor]:
        out = []
        for which in ("k", "v"):
            base = _name(step, kind, layer, which)
            stored = self.store.get([base, base + ".scale"])
            if base not in stored:
                raise _missing(step, kind, layer)
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
        name = _name(0, self.kinds[0], self.layers[0], "k")
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


def _upload(t: Tensor, device: torch.device, non_blocking: bool) -> Tensor:
    return t.to(device, non_blocking=non_blocking)


class ReplayReader:
    """One replay run's reads of a recording, handed over on the receiver's ``device``.

    ``get(slot, kind, layer)`` returns what ``KVRecording.get`` returns, bit for bit, moved to
    ``device``, at less cost: each file is opened once per run (``_OpenFiles``), fp8 tensors are copied
    as their fp8 bytes plus scale and decoded on the device (a quarter of the float32 bytes), and for a
    CUDA device host buffers are pinned and copies non-blocking. The current slot's host tensors are
    kept (up to ``HOLD_BYTES``) for layers asked twice (a layer map that feeds one sharer layer to
    several receiver layers, the evaluations of a refresh window). With ``prefetch`` (default: on CUDA)
    a background thread reads ahead while the receiver computes: the rest of the current slot and the
    next one (at the stride of the last two slots, so refresh windows are followed), in the order the
    slot before asked for them, at most ``PREFETCH_BYTES`` ahead; a read that was not predicted is made
    on the spot. On the CPU nothing is pinned or read ahead.
    """

    PREFETCH_BYTES = 2 * 2**30
    HOLD_BYTES = 2 * 2**30

    def __init__(self, recording: KVRecording, device="cpu", prefetch: bool | None = None, pin: bool | None = None):
        self.recording = recording
        self.device = torch.device(device)
        self.pin = pinnable(self.device) if pin is None else bool(pin)
        self.prefetch = (self.device.type == "cuda") if prefetch is None else bool(prefetch)
        recording.finish()
        self.files = _OpenFiles()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="c2c-replay") if self.prefetch else None
        self._ahead: dict = {}          # (slot, kind, layer) -> Future of the host tensors
        self._slot = None
        self._order: dict = {}          # (kind, layer) in the order the current slot asked for them
        self._held: dict = {}           # (kind, layer) -> host tensors of the current slot
        self._held_bytes = 0
        self._bytes: dict = {}          # (kind, layer) -> bytes of one read
        self.spot_reads = 0             # reads made on the spot (not predicted)
        self.hits = 0                   # reads served by the read-ahead

    def get(self, slot: int, kind: int, layer: int) -> tuple[Tensor, Tensor]:
        key = (kind, layer)
        if slot != self._slot:
            self._enter(slot, key)
        self._order.setdefault(key, None)
        host = self._held.get(key)
        if host is None:
            future = self._ahead.pop((slot, kind, layer), None)
            if future is not None and not future.cancelled():
                host = future.result()
                self.hits += 1
            else:
                host = self._read(slot, kind, layer)
                self.spot_reads += 1
            nbytes = self._bytes[key] = sum(t.numel() * t.element_size() for t in host.values())
            if self._held_bytes + nbytes <= self.HOLD_BYTES:
                self._held[key], self._held_bytes = host, self._held_bytes + nbytes
        out = []
        for which in ("k", "v"):
            base = _name(slot, kind, layer, which)
            if base not in host:
                raise _missing(slot, kind, layer)
            stored = {s[len(base):]: _upload(t, self.device, self.pin) for s, t in host.items()
                      if s in (base, base + ".scale")}
            out.append(decode(stored))
        return out[0], out[1]

    def _read(self, slot, kind, layer) -> dict:
        names = [_name(slot, kind, layer, w) + suffix for w in ("k", "v") for suffix in ("", ".scale")]
        store = self.recording.store
        if hasattr(store, "read_host"):
            return store.read_host(names, self.files, self.pin)
        return store.get(names)

    def _enter(self, slot: int, first) -> None:
        """A new slot: forget the last one's tensors, read ahead in its pattern (this slot, the next)."""
        previous, pattern = self._slot, list(self._order)
        self._slot, self._order, self._held, self._held_bytes = slot, {}, {}, 0
        for key in [k for k in self._ahead if k[0] != slot]:
            self._ahead.pop(key).cancel()
        if self._pool is None or previous is None or not pattern:
            return
        slots = [slot] + ([slot + (slot - previous)] if slot > previous and 2 * slot - previous < self.recording.slots else [])
        budget = self.PREFETCH_BYTES
        for s in slots:
            for kind, layer in pattern:
                if (s == slot and (kind, layer) == first) or (s, kind, layer) in self._ahead:
                    continue
                budget -= self._bytes.get((kind, layer), 0)
                if budget < 0:
                    return
                self._ahead[(s, kind, layer)] = self._pool.submit(self._read, s, kind, layer)

    def close(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead, self._held = {}, {}
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.files.close()


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
        self.where = _short_path(path)

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
    where = _short_path(path)
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
        raise MissingMetadataError(f"{_short_path(path)}: no '{RECORDING_KEY}' metadata; this is not a K/V recording "
                                   f"saved by Save KV Cache. Pick a file written by Save KV Cache.")
    meta = _parse_meta(Path(path), snap.metadata, RECORDING_KEY)
    try:
        rec = _parse_recording_meta(path, meta)
    except C2CError as e:
        if isinstance(e, (InvalidMetadataError, FormatVersionError)):
            raise
        raise InvalidMetadataError(f"{_short_path(path)}: recording metadata is malformed ({quote(str(e), 200)}); "
                                   f"record it again.") from None
    _check_recording_tensors(path, rec, snap.header())
    store = DiskStore()
    store.add(snap)
    rec.store = store
    return rec
