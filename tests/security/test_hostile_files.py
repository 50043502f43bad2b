"""Each hostile file from issue 14, refused by the loader with a documented error and a short message."""
from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

import c2c_core.bundle_schema as bundle_schema
import c2c_core.tensorfile as tensorfile
from c2c_core import LayerMap, ModelSignature, ProjectorBank, TokenGrid, load_bundle, save_bundle
from c2c_core.align import RopeSpec
from c2c_core.checkpoint import prune_checkpoints
from c2c_core.errors import (BundleError, BundleUnknownProjectorError, FileChangedError, InvalidMetadataError,
                             MissingTensorError, NonFiniteWeightsError, NotSafetensorsError,
                             UnsafeFormatError)
from c2c_core.recording import DiskStore, KVRecording, RamStore, load_recording, save_recording

SIG = {"num_layers": 40, "num_heads": 2, "head_dim": 4, "name": "x"}
MAP = {"kind": "terminal", "sharer_layers": 40, "receiver_layers": 40, "pairs": {"0": 0}, "strengths": {}}


def header_only_bundle(path, kind="full", hparams=None, **overrides):
    meta = {"format_version": 1, "projector": {"kind": kind, "hparams": hparams or {}}, "sharer": SIG,
            "receiver": SIG, "layer_map": MAP} | overrides
    save_file({"a": torch.zeros(1)}, str(path), metadata={"c2c_bundle": json.dumps(meta)})
    return path


def real_bundle(path, kind="full", **hparams):
    sig = ModelSignature(2, 2, 4)
    layer_map = LayerMap.build("identity", 2, 2, layers=[1])
    save_bundle(path, ProjectorBank.build(kind, sig, sig, layer_map.layers, **hparams), layer_map)
    return path


def recording(tmp_path, steps=2, storage="ram", **meta_edit):
    sig = ModelSignature(2, 2, 4)
    store = DiskStore.temporary(tmp_path / "tmp") if storage == "disk" else RamStore()
    rec = KVRecording(sig, TokenGrid(1, 2, 2), RopeSpec(), [1.0, 0.5, 0.0][: steps + 1], (0, 1), (0,), "bf16", store, 1)
    for step in range(steps):
        for layer in (0, 1):
            rec.put(step, 0, layer, torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    return rec


def rewrite_recording_meta(src, dst, edit):
    """Copy a saved recording with its metadata JSON text edited (raw tokens like NaN allowed)."""
    data = open(src, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    text = edit(header["__metadata__"]["c2c_kv_recording"])
    header["__metadata__"]["c2c_kv_recording"] = text
    raw = json.dumps(header).encode()
    open(dst, "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return dst


# -- header-only amplification ------------------------------------------------------------------------

def test_a_small_header_claiming_100000_layers_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    path = header_only_bundle(tmp_path / "b.safetensors", hparams={"num_layers": 100000, "hidden_dim": 4})
    assert os.path.getsize(path) < 600
    built = []
    monkeypatch.setattr(bundle_schema, "build_projector", lambda *a, **k: built.append(a))
    with pytest.raises(InvalidMetadataError, match=r"num_layers=100000; expected at most 64"):
        load_bundle(path)
    assert built == []


@pytest.mark.parametrize("hparams", [{"hidden_dim": 2**40}, {"hidden_dim": 2**40, "num_layers": 3}])
@pytest.mark.parametrize("kind", ["full", "c2c", "gating"])
def test_a_petabyte_hidden_dim_is_refused_without_allocating(tmp_path, kind, hparams):
    path = header_only_bundle(tmp_path / "b.safetensors", kind, hparams)
    with pytest.raises(InvalidMetadataError, match=r"hidden_dim=1099511627776; expected at most 65536"):
        load_bundle(path)


def test_signature_sizes_that_would_overflow_are_refused(tmp_path):
    huge = SIG | {"num_heads": 2**62}
    path = header_only_bundle(tmp_path / "b.safetensors", sharer=huge, receiver=huge)
    with pytest.raises(InvalidMetadataError, match="num_heads is 4611686018427387904; expected at most 1024"):
        load_bundle(path)


def test_the_declared_tensors_must_match_the_file_before_the_bank_is_built(tmp_path, monkeypatch):
    path = header_only_bundle(tmp_path / "b.safetensors", hparams={"hidden_dim": 64, "num_layers": 64})
    built = []
    real = ProjectorBank.build
    monkeypatch.setattr(ProjectorBank, "build", classmethod(lambda cls, *a, **k: built.append(a) or real(*a, **k)))
    with pytest.raises(MissingTensorError):
        load_bundle(path)
    assert built == []


@pytest.mark.parametrize("kind_value", [["c2c"], {"a": 1}, 7, None])
def test_a_projector_kind_of_another_json_type_is_an_unknown_kind(tmp_path, kind_value):
    path = header_only_bundle(tmp_path / "b.safetensors", kind=kind_value)
    with pytest.raises(BundleUnknownProjectorError, match="projector kind"):
        load_bundle(path)


def test_a_header_length_that_looks_like_pickle_bytes_is_still_a_safetensors_file(tmp_path):
    path = real_bundle(tmp_path / "b.safetensors")
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    pad = (0x0480 - n) % 0x10000           # header length 0x..0480 starts with b"\x80\x04", like a pickle
    raw = data[8:8 + n] + b" " * pad
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    assert open(path, "rb").read(2) == b"\x80\x04"
    load_bundle(path)


# -- pickles never run --------------------------------------------------------------------------------

class _Boom:
    def __reduce__(self):
        return (open, (os.environ["C2C_PICKLE_MARKER"], "w"))


@pytest.mark.parametrize("protocol", [0, 4])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pickles_are_refused_and_never_executed(tmp_path, monkeypatch, protocol, suffix):
    marker = tmp_path / "ran"
    monkeypatch.setenv("C2C_PICKLE_MARKER", str(marker))
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps(_Boom(), protocol=protocol))
    for load in (load_bundle, load_recording):
        with pytest.raises((UnsafeFormatError, NotSafetensorsError)):
            load(path)
    assert not marker.exists()


def test_a_torch_zip_checkpoint_is_refused_and_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("C2C_PICKLE_MARKER", str(marker))
    path = tmp_path / "evil.safetensors"
    torch.save({"x": _Boom()}, path)
    with pytest.raises(UnsafeFormatError, match="zip archive"):
        load_bundle(path)
    assert not marker.exists()


# -- silent NaN --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,what", [(float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf"), (1e35, "a weight of magnitude 1e\\+35")])
def test_non_finite_or_absurd_weights_are_refused_at_load(tmp_path, value, what):
    path = real_bundle(tmp_path / "b.safetensors", "full", hidden_dim=4)
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], value)
    meta = tensorfile.snapshot(path).metadata
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(NonFiniteWeightsError, match=rf"tensor '{name}' holds {what}"):
        load_bundle(path)


# -- recordings --------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit,match", [
    (lambda t: t.replace('"theta": 10000.0', '"theta": Infinity'), "not valid JSON"),
    (lambda t: t.replace('"scale": [1.0, 1.0, 1.0]', '"scale": [NaN, 1.0, 1.0]'), "not valid JSON"),
    (lambda t: t.replace('"scale": [1.0, 1.0, 1.0]', '"scale": [1.0]'), r"rope.scale is \[1.0\]; expected a list of three"),
    (lambda t: t.replace('"scale": [1.0, 1.0, 1.0]', '"scale": "big"'), r"rope.scale is 'big'"),
    (lambda t: t.replace('"rope": {', '"rope": "x", "was": {'), r"rope is 'x'; expected a JSON object"),
    (lambda t: t.replace('"sigmas": [1.0, 0.5, 0.0]', '"sigmas": [1.0, 0.5, 0.2, 0.0]'), r"no K of layer 0 .* steps \[2\]"),
    (lambda t: t.replace('"num_heads": 2', '"num_heads": 4'), r"expected BF16 \(batch, 4, 16\)"),
    (lambda t: t.replace('"storage_dtype": "bf16"', '"storage_dtype": "fp64"'), "storage_dtype is 'fp64'"),
    (lambda t: t.replace('"seed": 1', '"seed": "' + "x" * 5_000_000 + '"'), r"seed is 'xxxx.*characters\)"),
])
def test_damaged_recording_metadata_is_refused_at_load_with_a_short_message(tmp_path, edit, match):
    src = tmp_path / "r.safetensors"
    save_recording(src, recording(tmp_path))
    path = rewrite_recording_meta(src, tmp_path / "bad.safetensors", edit)
    with pytest.raises(BundleError, match=match) as info:
        load_recording(path)
    assert len(str(info.value)) < 1000


def test_a_recording_replaced_after_loading_is_never_mixed_with_the_new_one(tmp_path):
    path = tmp_path / "r.safetensors"
    save_recording(path, recording(tmp_path))
    loaded = load_recording(path)
    save_recording(tmp_path / "other.safetensors", recording(tmp_path))
    os.replace(tmp_path / "other.safetensors", path)
    with pytest.raises(FileChangedError):
        loaded.get(0, 0, 0)


def test_a_missing_step_at_replay_is_a_documented_error_that_is_also_a_key_error(tmp_path):
    rec = recording(tmp_path)
    with pytest.raises(MissingTensorError, match="holds no step 5 of layer 0") as info:
        rec.get(5, 0, 0)
    assert isinstance(info.value, KeyError)


# -- no data loss ------------------------------------------------------------------------------------

def test_a_recording_save_never_replaces_a_file(tmp_path):
    path = tmp_path / "r.safetensors"
    save_recording(path, recording(tmp_path))
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_recording(path, recording(tmp_path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["r.safetensors"]


def test_disk_recordings_stream_to_a_file_equal_to_the_ram_one(tmp_path):
    torch.manual_seed(0)
    ram = recording(tmp_path)
    torch.manual_seed(0)
    disk = recording(tmp_path, storage="disk")
    save_recording(tmp_path / "ram.safetensors", ram)
    save_recording(tmp_path / "disk.safetensors", disk)
    a, b = load_recording(tmp_path / "ram.safetensors"), load_recording(tmp_path / "disk.safetensors")
    for step in range(2):
        for layer in (0, 1):
            assert all(torch.equal(x, y) for x, y in zip(a.get(step, 0, layer), b.get(step, 0, layer)))


def test_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"rec_00001.safetensors.{dead_pid}.abc123.tmp"
    mine = tmp_path / f"rec_00002.safetensors.{os.getpid()}.def456.tmp"
    other = tmp_path / "notes.tmp"
    for p in (stale, mine, other):
        p.write_bytes(b"partial")
    assert tensorfile.remove_stale_temp_files(tmp_path) == [stale]
    assert mine.exists() and other.exists() and not stale.exists()


def test_checkpoint_pruning_keeps_the_newest_complete_pairs(tmp_path):
    for step in (1, 2, 3, 4, 5):
        for name in (f"step_{step:06d}.safetensors", f"step_{step:06d}.state.safetensors"):
            (tmp_path / name).write_bytes(b"x")
    (tmp_path / "step_000006.safetensors").write_bytes(b"x")   # a bundle whose state is not written yet
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_000004.safetensors", "step_000004.state.safetensors", "step_000005.safetensors",
        "step_000005.state.safetensors", "step_000006.safetensors"]


def test_a_failed_write_leaves_the_previous_file_and_no_temp_file(tmp_path, monkeypatch):
    path = real_bundle(tmp_path / "b.safetensors")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tensorfile, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        real_bundle(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["b.safetensors"]


def test_loaded_weights_are_bit_identical_with_the_bounded_reader(tmp_path):
    path = real_bundle(tmp_path / "b.safetensors", "c2c", hidden_dim=8)
    from safetensors.torch import load_file
    reference = load_file(str(path))
    loaded = load_bundle(path).bank.state_dict()
    assert set(loaded) == set(reference) and all(torch.equal(loaded[n], reference[n]) for n in reference)


def test_every_tensor_dtype_of_the_format_reads_back_exactly(tmp_path):
    tensors = {"f64": torch.randn(3, dtype=torch.float64), "bf16": torch.randn(2, 3).to(torch.bfloat16),
               "i64": torch.arange(4), "u8": torch.arange(5, dtype=torch.uint8), "b": torch.tensor([True, False]),
               "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    if hasattr(torch, "float8_e4m3fn"):
        tensors["f8"] = torch.randn(4).to(torch.float8_e4m3fn)
    path = tmp_path / "t.safetensors"
    tensorfile.stream_tensors_with_meta(path, tensors, {"a": 1}, "k")
    got = tensorfile.load_tensors(path, list(tensors))
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else got[name],
                           t.view(torch.uint8) if t.dtype.itemsize == 1 and t.is_floating_point() else t)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(tensors)


def test_a_checkpoint_with_a_nan_loss_is_refused_when_resuming_not_when_saving(tmp_path):
    from c2c_core import ResumeError, TrainConfig, train_bank
    sig = ModelSignature(2, 2, 4)
    layer_map = LayerMap.build("identity", 2, 2)
    config = TrainConfig(steps=2, checkpoint_every=1, checkpoint_dir=str(tmp_path), warmup_steps=0)

    def run(resume=None):
        bank = ProjectorBank.build("full", sig, sig, layer_map.layers, hidden_dim=4)
        return train_bank(bank, layer_map, lambda step: torch.randn(1, 3, 2, 4),
                          lambda b, x: (b.project(0, "k", x, x) ** 2).mean(), config, resume=resume)

    run()
    state = tmp_path / "step_000002.state.safetensors"
    rewrite_recording_meta_key(state, "c2c_trainer_state", lambda t: t.replace('"losses": [', '"losses": [NaN, '))
    with pytest.raises(ResumeError, match="cannot be resumed.*not valid JSON"):
        run(resume=str(tmp_path))


def rewrite_recording_meta_key(path, key, edit):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"][key] = edit(header["__metadata__"][key])
    raw = json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
