"""Reading a recording back into the receiver's run, one model evaluation at a time, without stalls.

:class:`ReplayReader` hands over what ``KVRecording.get`` returns, bit for bit, on the receiver's
device, at less cost: files opened once per run, fp8 decoded on the device, pinned non-blocking copies
and one step read ahead on CUDA.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from ..errors import FileChangedError
from ..tensorfile import file_identity, short_path
from .format import KVRecording, MissingStepError, decode, tensor_name
from .store import pinnable

__all__ = ["ReplayReader"]


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
            raise FileChangedError(f"{short_path(snap.path)}: cannot reopen the file ({exc.strerror}); it was "
                                   f"moved or removed after it was loaded. Load it again.") from None
        if file_identity(os.fstat(f.fileno())) != snap.identity:
            f.close()
            raise FileChangedError(f"{short_path(snap.path)}: the file changed after its header was read "
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
            raise FileChangedError(f"{short_path(snap.path)}: the file is shorter than its header says "
                                   f"(truncated while in use); load it again.")
        return out

    def close(self) -> None:
        with self._lock:
            for _, f in self._files.values():
                f.close()
            self._files.clear()


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
            base = tensor_name(slot, kind, layer, which)
            if base not in host:
                raise MissingStepError.at(slot, kind, layer)
            stored = {s[len(base):]: _upload(t, self.device, self.pin) for s, t in host.items()
                      if s in (base, base + ".scale")}
            out.append(decode(stored))
        return out[0], out[1]

    def _read(self, slot, kind, layer) -> dict:
        names = [tensor_name(slot, kind, layer, w) + suffix for w in ("k", "v") for suffix in ("", ".scale")]
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
