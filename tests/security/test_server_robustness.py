"""A real ComfyUI server under interrupts, kill -9 and a soak of mixed prompts (issue 14).

- POST /interrupt during a bridged run and during a disk recording: no temp folder survives and the
  next prompt equals the same prompt run before.
- kill -9 of the server while Save KV Cache writes: the file it copies is intact, no partial file is
  ever loadable, start-up removes the dead writer's temp file, and the next save works.
- 30 queued prompts (live, recorded on disk, plain, broken): every good output equals the same prompt's
  first output, every broken prompt fails with the node's own message, resident memory grows by less
  than SOAK_RSS_BOUND_MB after warm-up, and at most one temp recording (the cached one) is left.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import host

SOAK_RSS_BOUND_MB = 120
LATENT = {"width": 32, "height": 32, "length": 5, "batch_size": 1}     # 2 latent frames of 4×4: 8 tokens


def base_graph(seed: int, steps: int = 2) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": host.T2V_A, "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": host.T2V_B, "weight_dtype": "default"}},
        "3": {"class_type": "DCBTestWanConditioning", "inputs": {"seed": 1, "length": 8, "batch_size": 1}},
        "4": {"class_type": "DCBTestWanConditioning", "inputs": {"seed": 2, "length": 5, "batch_size": 1}},
        "5": {"class_type": "DiTCacheBridge_CreateC2CProjector",
              "inputs": {"sharer": ["2", 0], "receiver": ["1", 0], "kind": "weighted", "mapping": "identity",
                         "layers": "all", "alpha": 0.5, "hidden_dim": 0, "seed": 0}},
        "6": {"class_type": "EmptyHunyuanLatentVideo", "inputs": dict(LATENT)},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "seed": seed, "steps": steps, "cfg": 4.0,
            "sampler_name": "euler", "scheduler": "simple", "latent_image": ["6", 0], "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"soak/s{seed}"}},
    }


def plain(seed, steps=2):
    graph = base_graph(seed, steps)
    del graph["5"]
    return graph


def live(seed, steps=2):
    graph = base_graph(seed, steps)
    graph["7a"] = {"class_type": "DiTCacheBridge_CaptureKVCache", "inputs": {
        "sharer": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "layers": "auto", "refresh_every": 1,
        "grid_alignment": "refuse", "rope_alignment": "auto"}}
    graph["7"] = {"class_type": "DiTCacheBridge_FuseCaches", "inputs": {
        "model": ["1", 0], "kv_source": ["7a", 0], "projector": ["5", 0], "strength": 1.0, "start_percent": 0.0,
        "end_percent": 1.0}}
    graph["8"]["inputs"]["model"] = ["7", 0]
    return graph


def recorded(seed, steps=2):
    graph = live(seed, steps)
    graph["7a"] = {"class_type": "DiTCacheBridge_RecordKVCache", "inputs": {
        "sharer": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["6", 0], "seed": seed,
        "steps": steps, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
        "layers": "auto", "storage_dtype": "fp32", "storage": "disk", "refresh_every": 1,
        "rope_alignment": "auto", "grid_alignment": "refuse", "projector": ["5", 0]}}
    return graph


def broken_kind(seed):
    graph = live(seed)
    graph["5"]["inputs"]["kind"] = "banana"          # ComfyUI does not check V3 combo values in API prompts
    return graph, r"Create C2C Projector › kind: 'banana'"


def broken_prefix(seed):
    graph = recorded(seed)
    graph["10"] = {"class_type": "DiTCacheBridge_SaveKVCache", "inputs": {"kv_source": ["7a", 0],
                                                                         "filename_prefix": "../../escape"}}
    return graph, r"Save KV Cache › filename_prefix: the prefix '\.\./\.\./escape'"


def latent_of(server, entry) -> torch.Tensor:
    import safetensors.torch
    (path,) = server.output_files(entry, "9")
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def rss_mb(server) -> float:
    for line in Path(f"/proc/{server._process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def temp_recordings(server) -> list[str]:
    return sorted(p.name for p in server.temp_dir.glob("c2c_kv_*")) if server.temp_dir.is_dir() else []


def error_text(entry) -> str:
    return " ".join(str(m) for m in entry.get("status", {}).get("messages", []))


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    with host.ComfyServer(tmp_path_factory.mktemp("robust_server"), tiny_models.root) as srv:
        yield srv


# -- soak -------------------------------------------------------------------------------------------

def test_thirty_queued_prompts_stay_correct_lean_and_clean(server):
    goods = [("live", live, 11), ("recorded", recorded, 12), ("plain", plain, 13), ("live", live, 14)]
    references = {}
    for name, make, seed in goods:                      # on the fresh server, before anything else ran
        references[(name, seed)] = latent_of(server, server.run(make(seed), timeout=300))
    plan = []
    for i in range(30):
        if i % 5 == 4:
            plan.append(("broken",) + (broken_kind if i % 10 == 4 else broken_prefix)(20 + i))
        else:
            name, make, seed = goods[i % len(goods)]
            plan.append((name, make(seed), (name, seed)))
    warm_rss = None
    ids = []
    for index, (kind, graph, expected) in enumerate(plan):
        ids.append(server.post_prompt(graph))
        if index == 7:                                  # warm-up: every kind has run at least once
            for pid in ids:
                server.wait(pid, timeout=300, check=False)
            warm_rss = rss_mb(server)
    for (kind, graph, expected), pid in zip(plan, ids):
        entry = server.wait(pid, timeout=300, check=False)
        status = entry["status"]["status_str"]
        if kind == "broken":
            assert status == "error"
            import re
            assert re.search(expected, error_text(entry)), error_text(entry)[:500]
        else:
            assert status == "success", error_text(entry)[:500]
            assert torch.equal(latent_of(server, entry), references[expected]), f"{kind} {expected} differs"
    growth = rss_mb(server) - warm_rss
    assert growth < SOAK_RSS_BOUND_MB, f"RSS grew {growth:.1f} MB over 22 prompts"
    time.sleep(1.0)
    assert len(temp_recordings(server)) <= 1, temp_recordings(server)


# -- interrupts ---------------------------------------------------------------------------------------

def wait_running(server, prompt_id, timeout=60):
    import requests
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = requests.get(f"{server.url}/queue", timeout=10).json()["queue_running"]
        if any(item[1] == prompt_id for item in running):
            return
        time.sleep(0.05)
    raise TimeoutError(prompt_id)


@pytest.mark.parametrize("make", [live, recorded], ids=["bridged", "recording"])
def test_interrupt_leaves_no_temp_folder_and_the_next_prompt_correct(server, make):
    reference = latent_of(server, server.run(plain(31), timeout=300))
    pid = server.post_prompt(make(32, steps=1000))
    wait_running(server, pid)
    time.sleep(1.5)
    server.interrupt()
    entry = server.wait(pid, timeout=300, check=False)
    assert entry["status"]["status_str"] == "error"
    assert not server.output_files(entry, "9") if entry.get("outputs", {}).get("9") else True
    time.sleep(0.5)
    assert len(temp_recordings(server)) <= 1          # at most the cached recording of an earlier prompt
    assert torch.equal(latent_of(server, server.run(plain(31), timeout=300)), reference)


# -- kill -9 ------------------------------------------------------------------------------------------

def big_recording(path: Path) -> str:
    """~200 MB recording written from the test process: copying it takes long enough to be killed."""
    from c2c_core import ModelSignature, TokenGrid
    from c2c_core.align import RopeSpec
    from c2c_core.recording import KVRecording, RamStore, save_recording
    torch.manual_seed(0)
    rec = KVRecording(ModelSignature(2, 2, 128), TokenGrid(4, 32, 32), RopeSpec(), [1.0, 0.5, 0.0], (0, 1), (0,),
                      "fp32", RamStore(), 1)
    for step in range(2):
        for layer in (0, 1):
            for _ in range(1):
                rec.put(step, 0, layer, torch.randn(3, 4096, 256), torch.randn(3, 4096, 256))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_recording(path, rec)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_prompt(name: str) -> dict:
    return {"1": {"class_type": "DiTCacheBridge_LoadKVCache", "inputs": {"kv_cache": name, "refresh_every": 1,
                                                                        "grid_alignment": "refuse"}},
            "2": {"class_type": "DiTCacheBridge_SaveKVCache", "inputs": {"kv_source": ["1", 0],
                                                                        "filename_prefix": "copies/copy"}}}


def test_kill_9_while_saving_leaves_the_source_intact_and_no_loadable_half_file(tiny_models, tmp_path):
    from c2c_core.errors import BundleError
    from c2c_core.recording import load_recording
    srv = host.ComfyServer(tmp_path / "killed", tiny_models.root)
    source = srv.output_dir / "kv_cache" / "big.safetensors"
    digest = big_recording(source)
    copies = srv.output_dir / "kv_cache" / "copies"
    killed = False
    with srv:
        for attempt in range(6):
            pid = srv.post_prompt(copy_prompt("big.safetensors"))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed:
                if copies.is_dir() and any(p.suffix == ".tmp" for p in copies.iterdir()):
                    os.killpg(srv._process.pid, signal.SIGKILL)
                    srv._process.wait(timeout=30)
                    killed = True
                elif srv.history(pid):
                    break
                time.sleep(0.001)
            if killed:
                break
        assert killed, "the save was never caught in progress"
        leftovers = [p for p in copies.iterdir() if p.suffix == ".tmp"]
        assert leftovers, "the kill should have left the temp file of the interrupted save"
        for done in copies.glob("*.safetensors"):       # earlier attempts that finished: complete and loadable
            load_recording(done)
        for partial in leftovers:
            with pytest.raises(BundleError):
                load_recording(partial)
        assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
        srv.stop()
        srv.start()                                    # start-up removes the dead writer's temp file
        assert not [p for p in copies.iterdir() if p.suffix == ".tmp"]
        entry = srv.run(copy_prompt("big.safetensors"), timeout=300)
        (saved,) = entry["outputs"]["2"]["kv_cache"]
        copy = load_recording(copies / saved["filename"])
        original = load_recording(source)
        assert all(torch.equal(a, b) for a, b in zip(copy.get(1, 0, 1), original.get(1, 0, 1)))
