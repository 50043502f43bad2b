"""Where a recording's tensors live while it is made and replayed: host memory or step files on disk.

Neither store stalls the sampling thread more than it must: tensors leave a CUDA device through pinned
memory without a sync (:class:`RamStore` moves them into ordinary memory two steps later), and a
:class:`DiskStore` writes one safetensors file per step on a background thread (in order, at most two
steps queued, the first failure raised on the sampling thread as :class:`RecordingWriteError`). Both
count their bytes (``nbytes``) for the memory report. The stores know tensor names, not what they mean:
the names and the saved file are ``format.py``'s.
"""
from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import torch
from torch import Tensor

from ..errors import C2CError, quote
from ..tensorfile import SAFETENSORS_DTYPES, save_tensors_with_meta, short_path, snapshot

__all__ = ["STEP_FILE_KEY", "RecordingWriteError", "pinnable", "RamStore", "DiskStore"]

#: metadata key of a disk store's step files (temporary; a saved recording is one file, see format.py)
STEP_FILE_KEY = "c2c_kv_recording_part"


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
        save_tensors_with_meta(self.path, self.tensors, {"step": self.step}, STEP_FILE_KEY)
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
                                      f"{short_path(job.path)} ({quote(why, 200)})") from exc


_temporaries: "weakref.WeakSet[DiskStore]" = weakref.WeakSet()


class DiskStore:
    """Recorded tensors spilled to safetensors files, one per step; reads open them lazily.

    While recording, the current step's tensors are held in memory and handed, when the next step
    begins (or on the first read), to a background writer (``background=True``, the default) that
    writes each file once, in order, while sampling goes on; memory holds about three steps at most.
    Reads wait for the writer and raise its failure. A store made by :meth:`temporary` owns its folder
    and deletes it when closed, when its last reference goes (the hosts' sources and runs hold no
    reference cycle, so that is when ComfyUI's cache drops the last output using the recording, not
    at the next garbage collection) or at interpreter exit.
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
        _temporaries.add(store)
        return store

    @staticmethod
    def temporaries() -> int:
        """How many temporary stores still hold their folder (referenced, or dropped inside a reference cycle)."""
        return sum(1 for store in list(_temporaries) if store._cleanup.alive)

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

    def read_host(self, names, files, pin: bool) -> dict[str, Tensor]:
        """:meth:`get` for a replay: read through ``files`` (opened once per run) straight into host
        buffers, pinned when ``pin`` (call :meth:`finish` first)."""
        out = {}
        for n in names:
            if n in self.index:
                snap, name = self.index[n]
                e = snap.entries[name]
                out[n] = files.read_into(snap, e, _host_buffer(e.shape, SAFETENSORS_DTYPES[e.dtype][0], pin))
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


