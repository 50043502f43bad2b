"""Recording and replay without stalling the sampling thread (c2c_core.recording), against the simple path.

Writes: a background writer keeps the order, stays bounded, makes the same files as a synchronous
write and raises its failure on the caller's thread. Reads: ``ReplayReader`` returns what
``KVRecording.get`` returns, bit for bit, with files opened once per run, fp8 decoded after the copy
and read-ahead that follows the replay's pattern. CUDA-only parts (pinned memory, events) are checked
for being asked for only when a CUDA device exists; this suite runs on the CPU.
"""

import os
import threading

import pytest
import torch

from c2c_core.recording import replay as replay_module
from c2c_core.recording import store as store_module
from c2c_core.errors import FileChangedError
from c2c_core.recording import (DiskStore, KVRecording, MissingStepError, RamStore, RecordingWriteError, ReplayReader,
                                load_recording, pinnable, save_recording)
from c2c_core import RopeSpec, TokenGrid
from core_helpers import signature

SIG = signature(layers=4, heads=2, head_dim=8)
GRID = TokenGrid(1, 2, 3)
LAYERS = (0, 2, 3)
SLOTS = 5


def recorded(store, dtype="bf16", slots=SLOTS, kinds=(0, 1)):
    """A recording of ``slots`` evaluations × ``kinds`` × LAYERS with distinct random K/V."""
    rec = KVRecording(signature=SIG, grid=GRID, rope=RopeSpec(), sigmas=[1.0 - i / slots for i in range(slots + 1)],
                      layers=LAYERS, kinds=kinds, storage_dtype=dtype, store=store)
    g = torch.Generator().manual_seed(0)
    for slot in range(slots):
        for kind in kinds:
            for layer in LAYERS:
                k, v = (torch.randn(1, GRID.numel, SIG.width, generator=g) * 3 for _ in range(2))
                rec.put(slot, kind, layer, k, v)
    rec.finish()
    return rec


def replay(reader, slots, kinds=(0, 1), layers=LAYERS):
    return [(s, kind, layer, reader.get(s, kind, layer)) for s in slots for kind in kinds for layer in layers]


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# --- background writer -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bf16", "fp8_e4m3fn"])
def test_background_writes_make_the_same_files_as_a_synchronous_write(tmp_path, dtype):
    (tmp_path / "bg").mkdir(), (tmp_path / "sync").mkdir()
    bg = recorded(DiskStore(tmp_path / "bg"), dtype)
    sync = recorded(DiskStore(tmp_path / "sync", background=False), dtype)
    names = sorted(os.listdir(tmp_path / "sync"))
    assert names == [f"step_{i:05d}.safetensors" for i in range(SLOTS)] == sorted(os.listdir(tmp_path / "bg"))
    for name in names:
        assert (tmp_path / "bg" / name).read_bytes() == (tmp_path / "sync" / name).read_bytes()
    save_recording(tmp_path / "bg.safetensors", bg)
    save_recording(tmp_path / "sync.safetensors", sync)
    assert (tmp_path / "bg.safetensors").read_bytes() == (tmp_path / "sync.safetensors").read_bytes()


def test_the_writer_writes_off_the_sampling_thread_in_order(tmp_path, monkeypatch):
    written = []
    real = store_module.save_tensors_with_meta
    monkeypatch.setattr(store_module, "save_tensors_with_meta",
                        lambda path, *a, **k: written.append((path.name, threading.current_thread().name))
                        or real(path, *a, **k))
    recorded(DiskStore(tmp_path))
    assert [name for name, _ in written] == [f"step_{i:05d}.safetensors" for i in range(SLOTS)]
    assert {thread for _, thread in written} == {"c2c-recording-writer"}


def test_the_writer_holds_at_most_two_steps_then_the_sampling_thread_waits(tmp_path, monkeypatch):
    release = threading.Event()
    real = store_module.save_tensors_with_meta
    monkeypatch.setattr(store_module, "save_tensors_with_meta", lambda *a, **k: release.wait() and real(*a, **k))
    store = DiskStore(tmp_path)
    t = torch.zeros(1, 2)
    for step in range(4):                  # step 0 is being written, 1 and 2 wait, 3 is still pending
        store.put(step, {f"s{step}.c0.l0.k": t})
    putter = threading.Thread(target=store.put, args=(4, {"s4.c0.l0.k": t}))
    putter.start()
    putter.join(timeout=0.5)
    assert putter.is_alive()               # handing over step 3 waits for room: memory stays bounded
    release.set()
    putter.join()
    store.finish()
    assert sorted(os.listdir(tmp_path)) == [f"step_{i:05d}.safetensors" for i in range(5)]


def test_a_failed_background_write_is_raised_on_the_sampling_thread_and_nothing_follows_it(tmp_path, monkeypatch):
    real = store_module.save_tensors_with_meta

    def save(path, *a, **k):
        if path.name == "step_00001.safetensors":
            raise OSError(28, "No space left on device")
        return real(path, *a, **k)
    monkeypatch.setattr(store_module, "save_tensors_with_meta", save)
    store = DiskStore(tmp_path)
    rec = KVRecording(signature=SIG, grid=GRID, rope=RopeSpec(), sigmas=[1.0, 0.5, 0.0, 0.0], layers=(0,),
                      store=store)
    t = torch.zeros(1, GRID.numel, SIG.width)
    with pytest.raises(RecordingWriteError, match=r"step 1 of the K/V recording could not be written to "
                                                  r".*step_00001\.safetensors \('No space left on device'\)"):
        for step in range(3):
            rec.put(step, 0, 0, t, t)
        rec.finish()
    with pytest.raises(RecordingWriteError):           # raised again, never swallowed
        rec.put(3, 0, 0, t, t)
    assert sorted(os.listdir(tmp_path)) == ["step_00000.safetensors"]   # no file after the hole


def test_cpu_tensors_go_to_the_host_as_they_are_with_no_pinning(monkeypatch):
    asked = []
    monkeypatch.setattr(store_module, "_host_buffer", lambda *a: asked.append(a) or torch.empty(0))
    t = torch.ones(2, 3)
    host, event = store_module._to_host(t)
    assert host is t and event is None and asked == []
    store = RamStore()
    store.put(0, {"x": t})
    assert store.get(["x"])["x"] is t and asked == []


class FakeEvent:
    """Stands in for a CUDA event of a non-blocking device -> host copy (this suite has no GPU)."""

    def __init__(self, log, step):
        self.log, self.step = log, step

    def synchronize(self):
        self.log.append((self.step, threading.current_thread().name))


def as_if_from_cuda(monkeypatch):
    """_to_host as on a CUDA device: a copy plus an event that says when it landed; returns the sync log."""
    synced = []
    monkeypatch.setattr(store_module, "_to_host", lambda t: (t.clone(), FakeEvent(synced, int(t.flatten()[0]))))
    return synced


def test_a_ram_recording_from_the_device_waits_for_copies_two_steps_late(monkeypatch):
    synced = as_if_from_cuda(monkeypatch)
    store = RamStore()
    for step in range(4):
        store.put(step, {f"s{step}": torch.full((2,), float(step))})
        assert [s for s, _ in synced] == list(range(max(0, step - 1)))   # never the step being sampled or the last
    assert store.get(["s3"])["s3"].tolist() == [3.0, 3.0] and [s for s, _ in synced] == [0, 1, 2, 3]


def test_a_disk_recording_from_the_device_waits_for_copies_on_the_writer_thread(tmp_path, monkeypatch):
    synced = as_if_from_cuda(monkeypatch)
    store = DiskStore(tmp_path)
    for step in range(3):
        store.put(step, {f"s{step}.c0.l0.k": torch.full((2,), float(step))})
    store.finish()
    assert sorted(synced) == [(0, "c2c-recording-writer"), (1, "c2c-recording-writer"), (2, "c2c-recording-writer")]
    assert store.get(["s2.c0.l0.k"])["s2.c0.l0.k"].tolist() == [2.0, 2.0]


# --- replay reader -------------------------------------------------------------------------------
STORES = {
    "ram": lambda tmp: RamStore(),
    "disk": lambda tmp: DiskStore(tmp),
    "file": "file",            # recorded to disk, saved as one file, loaded back
}


def make(tmp_path, store, dtype):
    if store == "file":
        save_recording(tmp_path / "rec.safetensors", recorded(DiskStore(tmp_path / "parts"), dtype))
        return load_recording(tmp_path / "rec.safetensors")
    return recorded(STORES[store](tmp_path), dtype)


@pytest.mark.parametrize("store", sorted(STORES))
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8_e4m3fn"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_the_reader_returns_what_get_returns_bit_for_bit(tmp_path, store, dtype, prefetch):
    (tmp_path / "parts").mkdir()
    rec = make(tmp_path, store, dtype)
    reader = ReplayReader(rec, "cpu", prefetch=prefetch)
    try:
        for slot, kind, layer, (k, v) in replay(reader, range(SLOTS)):
            ek, ev = rec.get(slot, kind, layer)
            assert same(k, ek) and same(v, ev)
    finally:
        reader.close()
    if prefetch:          # from the second slot on, every read was made ahead in the first slot's pattern
        assert reader.spot_reads == 2 * len(LAYERS) + 1 and reader.hits == (SLOTS - 1) * 2 * len(LAYERS) - 1
    else:
        assert reader.hits == 0 and reader.spot_reads == SLOTS * 2 * len(LAYERS)


def test_read_ahead_follows_a_refresh_stride_and_survives_a_wrong_guess(tmp_path):
    rec = make(tmp_path, "disk", "bf16")
    reader = ReplayReader(rec, "cpu", prefetch=True)
    order = [0, 2, 4, 1, 3]                                 # stride 2, then an unpredicted slot
    got = replay(reader, order, kinds=(1, 0), layers=(3, 0, 2))
    reader.close()
    for slot, kind, layer, (k, v) in got:
        ek, ev = rec.get(slot, kind, layer)
        assert same(k, ek) and same(v, ev)
    assert reader.hits > 0


def test_a_layer_asked_twice_in_a_slot_is_read_once(tmp_path):
    rec = make(tmp_path, "disk", "bf16")
    reader = ReplayReader(rec, "cpu")
    for _ in range(3):                                      # e.g. a map feeding sharer layer 2 to three receiver layers
        reader.get(0, 0, 2)
    reader.close()
    assert reader.spot_reads == 1


def test_a_run_opens_each_recording_file_once(tmp_path, monkeypatch):
    rec = make(tmp_path, "file", "bf16")
    opened = []
    real_open = open
    monkeypatch.setattr(replay_module, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k),
                        raising=False)
    for prefetch in (False, True):
        reader = ReplayReader(rec, "cpu", prefetch=prefetch)
        replay(reader, range(SLOTS))
        reader.close()
    assert len(opened) == 2 and reader.files.opened == 1       # one open per run, not per step or layer


def test_fp8_is_copied_as_fp8_and_decoded_after_the_copy(tmp_path, monkeypatch):
    rec = make(tmp_path, "disk", "fp8_e4m3fn")
    copied = []
    real = replay_module._upload
    monkeypatch.setattr(replay_module, "_upload", lambda t, *a: copied.append(t.dtype) or real(t, *a))
    reader = ReplayReader(rec, "cpu")
    k, _ = reader.get(1, 0, 2)
    reader.close()
    assert sorted(map(str, set(copied))) == ["torch.float32", "torch.float8_e4m3fn"]
    assert copied.count(torch.float8_e4m3fn) == 2 and copied.count(torch.float32) == 2    # K, V and their scales
    assert k.dtype == torch.float32 and same(k, rec.get(1, 0, 2)[0])


def test_pinned_memory_and_read_ahead_are_asked_for_only_with_a_cuda_device(tmp_path, monkeypatch):
    rec = make(tmp_path, "disk", "bf16")
    asked = []
    real = store_module._host_buffer
    monkeypatch.setattr(store_module, "_host_buffer", lambda shape, dtype, pin: asked.append(pin) or real(shape, dtype, pin))
    reader = ReplayReader(rec, "cpu")
    replay(reader, range(2))
    reader.close()
    assert reader.pin is False and reader.prefetch is False and asked and not any(asked)
    assert pinnable("cpu") is False and pinnable("cuda") is torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pinnable("cuda:0") is True
    cuda = ReplayReader(rec, "cuda")                         # nothing touches the device before a read
    assert cuda.pin is True and cuda.prefetch is True
    cuda.close()


def test_a_recording_file_replaced_during_a_run_is_refused(tmp_path):
    rec = make(tmp_path, "file", "bf16")
    reader = ReplayReader(rec, "cpu")
    path = tmp_path / "rec.safetensors"
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)                                   # same bytes, another file
    with pytest.raises(FileChangedError, match="changed after its header was read"):
        reader.get(0, 0, 0)
    reader.close()


def test_the_reader_names_a_missing_slot(tmp_path):
    rec = make(tmp_path, "ram", "bf16")
    reader = ReplayReader(rec, "cpu")
    with pytest.raises(MissingStepError, match="holds no step 9 of layer 0"):
        reader.get(9, 0, 0)
    reader.close()
