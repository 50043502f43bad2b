"""Record KV Cache's background writer and the replay reader on the real ComfyUI host.

A disk recording (step files written off the sampling thread, read back through one handle per file)
replays bit for bit like a RAM recording; a write that fails on the background thread is raised by
Record KV Cache, naming the node, the storage input and the step, and leaves no temp folder behind.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

from bridge_helpers import empty_latent, ksample, load_model, pack_nodes

pytestmark = [pytest.mark.usefixtures("comfy"), pytest.mark.slow]


@pytest.fixture(scope="module")
def models(tiny_models):
    import host
    return {"a": load_model(tiny_models.path(host.T2V_A)), "b": load_model(tiny_models.path(host.T2V_B))}


@pytest.fixture(scope="module")
def conds():
    from comfy_test_nodes import wan_conditioning
    return {"pos": wan_conditioning(1), "neg": wan_conditioning(2), "sharer_pos": wan_conditioning(3),
            "sharer_neg": wan_conditioning(4)}


def record(models, conds, storage, storage_dtype="bf16"):
    return pack_nodes().RecordKVCache.execute(models["b"], conds["sharer_pos"], conds["sharer_neg"],
                                              empty_latent((1, 16, 3, 8, 8)), 7, 3, 4.0, "euler", "simple", 1.0,
                                              layers="all", storage_dtype=storage_dtype, storage=storage).args[0]


def replayed(models, conds, src):
    nodes = pack_nodes()
    proj = nodes.CreateC2CProjector.execute(models["b"], models["a"], "weighted", "identity", "all", alpha=0.5,
                                            hidden_dim=0, seed=0).args[0]
    fused = nodes.FuseCaches.execute(models["a"], src, proj, 1.0, 0.0, 1.0).args[0]
    return ksample(fused, conds["pos"], conds["neg"], cfg=4.0, seed=7, steps=3, latent=empty_latent((1, 16, 3, 8, 8)))


@pytest.mark.parametrize("storage_dtype", ["bf16", "fp8_e4m3fn"])
def test_a_disk_recording_replays_bit_for_bit_like_a_ram_recording(models, conds, storage_dtype):
    disk, ram = record(models, conds, "disk", storage_dtype), record(models, conds, "ram", storage_dtype)
    assert disk.recording.store.folder.is_dir() and len(os.listdir(disk.recording.store.folder)) == 3
    out = replayed(models, conds, disk)
    assert torch.equal(out, replayed(models, conds, ram))
    assert not torch.equal(out, ksample(models["a"], conds["pos"], conds["neg"], cfg=4.0, seed=7, steps=3,
                                        latent=empty_latent((1, 16, 3, 8, 8))))


def test_a_disk_recording_is_deleted_when_the_last_output_using_it_goes_not_at_the_next_garbage_collection(
        models, conds):
    """No reference cycle holds a replayed recording: its temp folder lives exactly as long as an output (Record KV
    Cache's, or a bridged model that replays it, as ComfyUI's node cache holds them) references it."""
    nodes = pack_nodes()
    proj = nodes.CreateC2CProjector.execute(models["b"], models["a"], "weighted", "identity", "all", alpha=0.5,
                                            hidden_dim=0, seed=0).args[0]
    gc.collect()
    gc.disable()                    # ComfyUI collects every few seconds at most; the folder must not wait for it
    try:
        src = record(models, conds, "disk")
        folder = src.recording.store.folder
        patched = nodes.FuseCaches.execute(models["a"], src, proj, 1.0, 0.0, 1.0).args[0]
        first = ksample(patched, conds["pos"], conds["neg"], steps=3, latent=empty_latent((1, 16, 3, 8, 8)))
        del src
        assert folder.is_dir()      # the bridged model still replays it, as the next prompt may
        assert torch.equal(ksample(patched, conds["pos"], conds["neg"], steps=3, latent=empty_latent((1, 16, 3, 8, 8))),
                           first)
        del patched
        assert not folder.exists()
    finally:
        gc.enable()


def test_a_dropped_recording_a_reference_cycle_still_holds_goes_before_the_next_disk_recording(models, conds):
    """ComfyUI keeps a failed node's inputs in its traceback (a reference cycle): such a recording is deleted when
    the next disk recording starts, not at ComfyUI's next periodic garbage collection."""
    gc.collect()
    gc.disable()
    try:
        held = record(models, conds, "disk")
        folder = held.recording.store.folder
        cycle = [held]
        cycle.append(cycle)
        del held, cycle
        assert folder.is_dir()
        src = record(models, conds, "disk")
        assert not folder.exists() and src.recording.store.folder.is_dir()
    finally:
        gc.enable()


def test_a_failed_background_write_is_raised_by_record_kv_cache(models, conds, monkeypatch):
    pack_nodes()
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    from c2c_core.recording import store as recording
    real = recording.save_tensors_with_meta
    folders = []

    def save(path, *a, **k):
        folders.append(path.parent)
        if path.name == "step_00001.safetensors":
            raise OSError(28, "No space left on device")
        return real(path, *a, **k)
    monkeypatch.setattr(recording, "save_tensors_with_meta", save)
    with pytest.raises(BridgeInputError, match=r"^Record KV Cache › storage: step 1 of the K/V recording could not be "
                                               r"written to .*step_00001\.safetensors \('No space left on device'\); "
                                               r"expected room for the recording's .* in ComfyUI's temp folder\. "
                                               r"Fix: free disk space there, or set storage to 'ram'$"):
        record(models, conds, "disk")
    assert folders and not folders[0].exists()               # the temp folder is gone
