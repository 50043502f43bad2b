"""A real ComfyUI server under interrupts, kill -9 and a soak of mixed prompts (issue 14).

One server serves the module (starts cost seconds): the soak runs first on it, fresh.
- 30 queued prompts (live, recorded on disk, plain, broken): every good output equals the same prompt's
  first output; the 30th is the fresh server's very first prompt, so it is compared bit for bit with a
  fresh server's first run of it (state leaking across prompts would show); every broken prompt fails
  with the node's own message or, on hosts that check combo values themselves, is refused by the host
  naming the same input; resident memory grows by less than SOAK_RSS_BOUND_MB after warm-up, and at
  most one temp recording (the cached one) is left.
- POST /interrupt during a bridged run and during a disk recording: no temp folder survives and the
  next prompt equals the same prompt run before.
- kill -9 of the server while Save KV Cache writes: the file it copies is intact, no partial file is
  ever loadable, start-up removes the dead writer's temp file, and the next save works.
- kill -9 of the server while Train C2C Projector writes a checkpoint: the old checkpoints load, the
  temp file does not, start-up removes it, and resuming ends where an uninterrupted run does, bit for bit.
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import host
from c2c_core.tensorfile import PAUSE_ENV, PAUSE_FILE

COPIES = Path("kv_cache") / "copies"                    # where the kill -9 save test's copy is written
CHECKPOINTS, KILLED = Path("c2c_training") / "checkpoints", "killed"   # the killed training run's checkpoints

pytestmark = [pytest.mark.server, pytest.mark.slow(seconds=40)]

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


@dataclass(frozen=True)
class Broken:
    """A prompt the UI would not produce: ``node``'s ``input_name`` holds ``value``; ``message`` is the
    node's own error (a regex)."""
    graph: dict
    node: str
    input_name: str
    value: str
    message: str


def broken_kind(seed) -> Broken:
    graph = live(seed)
    graph["5"]["inputs"]["kind"] = "banana"          # some hosts check V3 combo values in API prompts, some not
    return Broken(graph, "5", "kind", "banana", r"Create C2C Projector › kind: 'banana'")


def broken_prefix(seed) -> Broken:
    graph = recorded(seed)
    graph["10"] = {"class_type": "DiTCacheBridge_SaveKVCache", "inputs": {"kv_source": ["7a", 0],
                                                                         "filename_prefix": "../../escape"}}
    return Broken(graph, "10", "filename_prefix", "../../escape",
                  r"Save KV Cache › filename_prefix: the prefix '\.\./\.\./escape'")


def assert_host_refused(rejected: host.PromptRejected, broken: Broken) -> None:
    """The host's own validation refused the prompt: it must name the node and input we broke."""
    errors = rejected.node_errors.get(broken.node, {}).get("errors", [])
    named = [e for e in errors if e.get("extra_info", {}).get("input_name") == broken.input_name]
    assert named, f"the host refused the prompt without naming {broken.node}.{broken.input_name}: {rejected}"
    assert any(e["extra_info"].get("received_value") == broken.value for e in named), named


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
    """Temp recording folders: ComfyUI's temp folder is ``temp/`` inside the server's --temp-directory."""
    return sorted(p.name for p in server.temp_dir.glob("**/c2c_kv_*") if p.is_dir())


def error_text(entry) -> str:
    return " ".join(str(m) for m in entry.get("status", {}).get("messages", []))


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    """One server for the whole module (each start costs seconds): the soak first, then interrupts, then the
    kill -9 tests, which restart it. Its own c2c_projectors folder receives what training writes."""
    base = tmp_path_factory.mktemp("robust_server")
    with pytest.MonkeyPatch.context() as mp:     # the kill -9 tests arm c2c_core's test pause in their folders
        mp.setenv(PAUSE_ENV, "1")
        with host.ComfyServer(base, own_models_root(tiny_models, base / "models"), startup_timeout=300,
                              extra_args=classic_cache_args(host.comfyui_path())) as srv:
            yield srv


def classic_cache_args(comfyui: Path) -> tuple[str, ...]:
    """``--cache-classic`` on hosts that have it (feature, not version). Their default, RAM-pressure caching,
    keeps earlier prompts' node outputs while RAM allows: a recording a cached output holds stays alive by design
    (a re-queued prompt reuses it). The classic cache keeps only the current graph's outputs, so the soak's bound
    on temp recordings measures what the pack removes, not what the host chooses to cache."""
    cli_args = (comfyui / "comfy" / "cli_args.py").read_text(encoding="utf-8")
    return ("--cache-classic",) if '"--cache-classic"' in cli_args else ()


@pytest.fixture
def running(server):
    """The module's server, started again if an earlier kill -9 test failed before restarting it."""
    if not server.running:
        server.stop()
        server.start()
    return server


# -- soak -------------------------------------------------------------------------------------------

def test_thirty_queued_prompts_stay_correct_lean_and_clean(server):
    import requests
    assert requests.get(f"{server.url}/history", timeout=30).json() == {}, "the soak needs a fresh server"
    goods = [("recorded", recorded, 12), ("live", live, 11), ("plain", plain, 13), ("live", live, 14)]
    references = {}
    for name, make, seed in (goods[0], goods[3], goods[1], goods[2]):     # the first differs from plan[0]
        references[(name, seed)] = latent_of(server, server.run(make(seed), timeout=300))
    plan = []
    for i in range(30):
        if i % 5 == 3:
            plan.append(("broken", (broken_kind if i % 10 == 3 else broken_prefix)(20 + i)))
        else:
            name, make, seed = goods[(i + 3) % len(goods)]
            plan.append((name, (make(seed), (name, seed))))
    # the 30th prompt is the server's very first one: a fresh server's first run, so state that leaks
    # across the 29 prompts in between would show
    assert plan[-1][1][1] == (goods[0][0], goods[0][2])
    warm_rss = None
    ids = []
    alive, done = [], threading.Event()

    def poll():         # temp recordings alive while the queue runs: at most the one a cached output still uses
        while not done.is_set():
            alive.append(temp_recordings(server))
            time.sleep(0.02)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    for index, (kind, case) in enumerate(plan):
        try:
            ids.append(server.post_prompt(case.graph if kind == "broken" else case[0]))
        except host.PromptRejected as rejected:         # the host checks combo values itself (feature, not version)
            assert kind == "broken", f"a good {kind} prompt was refused: {rejected}"
            assert_host_refused(rejected, case)
            ids.append(None)
        if index == 8:                                  # warm-up: every kind has run at least once
            for pid in filter(None, ids):
                server.wait(pid, timeout=300, check=False)
            warm_rss = rss_mb(server)
    outputs = []
    for (kind, case), pid in zip(plan, ids):
        if pid is None:
            continue
        entry = server.wait(pid, timeout=300, check=False)
        status = entry["status"]["status_str"]
        if kind == "broken":
            assert status == "error"
            assert re.search(case.message, error_text(entry)), error_text(entry)[:500]
        else:
            assert status == "success", error_text(entry)[:500]
            outputs.append(latent_of(server, entry))
            assert torch.equal(outputs[-1], references[case[1]]), f"{kind} {case[1]} differs"
    done.set()
    poller.join()
    growth = rss_mb(server) - warm_rss
    assert growth < SOAK_RSS_BOUND_MB, f"RSS grew {growth:.1f} MB over 21 prompts"
    time.sleep(1.0)
    assert max(map(len, alive)) <= 1, max(alive, key=len)
    assert len(temp_recordings(server)) <= 1, temp_recordings(server)
    assert torch.equal(outputs[-1], references[goods[0][0], goods[0][2]])


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
    assert not entry.get("outputs", {}).get("9"), "the interrupted prompt reported a saved latent"
    assert not list(server.output_dir.glob("soak/s32_*")), "the interrupted prompt saved a latent"
    time.sleep(0.5)
    assert len(temp_recordings(server)) <= 1          # at most the cached recording of an earlier prompt
    assert torch.equal(latent_of(server, server.run(plain(31), timeout=300)), reference)


# -- kill -9 ------------------------------------------------------------------------------------------

def recording_to_copy(path: Path) -> str:
    """A small recording written from the test process (the server's copy of it pauses half-way: kill_at_pause)."""
    from c2c_core import ModelSignature, TokenGrid
    from c2c_core.align import RopeSpec
    from c2c_core.recording import KVRecording, RamStore, save_recording
    torch.manual_seed(0)
    rec = KVRecording(ModelSignature(2, 2, 128), TokenGrid(2, 8, 8), RopeSpec(), [1.0, 0.5, 0.0], (0, 1), (0,),
                      "fp32", RamStore(), 1)
    for step in range(2):
        for layer in (0, 1):
            rec.put(step, 0, layer, torch.randn(3, 128, 256), torch.randn(3, 128, 256))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_recording(path, rec)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_prompt(name: str) -> dict:
    return {"1": {"class_type": "DiTCacheBridge_LoadKVCache", "inputs": {"kv_cache": name, "refresh_every": 1,
                                                                        "grid_alignment": "refuse"}},
            "2": {"class_type": "DiTCacheBridge_SaveKVCache", "inputs": {"kv_source": ["1", 0],
                                                                        "filename_prefix": f"{COPIES.name}/copy"}}}


def kill_at_pause(srv, folder: Path, prompt: dict, after_states: int = 0, timeout: float = 300) -> None:
    """Queue ``prompt`` with c2c_core's test pause armed in ``folder`` (PAUSE_FILE) and SIGKILL the server's
    process group while its writer is paused half-way there, once ``after_states`` checkpoints are complete
    (earlier writes are let go on). Waits on the writer's marker file: the kill lands mid-write on the first try."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PAUSE_FILE).touch()
    try:
        _kill_at_pause(srv, folder, srv.post_prompt(prompt), after_states, timeout)
    finally:
        (folder / PAUSE_FILE).unlink()


def _kill_at_pause(srv, folder: Path, prompt_id: str, after_states: int, timeout: float) -> None:
    deadline = next_look = time.monotonic()
    deadline += timeout
    while time.monotonic() < deadline:
        markers = sorted(folder.glob("*.tmp.paused"))
        if markers:
            states = sum(n.endswith(".state.safetensors") for n in os.listdir(folder))
            if states >= after_states:
                os.killpg(srv._process.pid, signal.SIGKILL)
                srv._process.wait(timeout=30)
                for marker in markers:
                    marker.unlink()
                return
            for marker in markers:                     # not yet: let this write finish
                marker.unlink()
        elif time.monotonic() > next_look:            # ask the server now and then, not every look
            assert not srv.history(prompt_id), f"the prompt finished without a write paused in {folder}"
            next_look = time.monotonic() + 0.5
        time.sleep(0.01)
    raise TimeoutError(f"no write paused in {folder}")


def test_kill_9_while_saving_leaves_the_source_intact_and_no_loadable_half_file(running):
    from c2c_core.errors import BundleError
    from c2c_core.recording import load_recording
    srv = running
    source = srv.output_dir / "kv_cache" / "to_copy.safetensors"
    digest = recording_to_copy(source)
    copies = srv.output_dir / COPIES
    kill_at_pause(srv, copies, copy_prompt("to_copy.safetensors"), timeout=120)
    leftovers = [p for p in copies.iterdir() if p.suffix == ".tmp"]
    assert leftovers, "the kill should have left the temp file of the interrupted save"
    assert not list(copies.glob("*.safetensors")), "the killed save published a file"
    for partial in leftovers:
        with pytest.raises(BundleError):
            load_recording(partial)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
    srv.stop()
    srv.start()                                    # start-up removes the dead writer's temp file
    assert not [p for p in copies.iterdir() if p.suffix == ".tmp"]
    entry = srv.run(copy_prompt("to_copy.safetensors"), timeout=300)
    (saved,) = entry["outputs"]["2"]["kv_cache"]
    copy = load_recording(copies / saved["filename"])
    original = load_recording(source)
    assert all(torch.equal(a, b) for a, b in zip(copy.get(1, 0, 1), original.get(1, 0, 1)))


# -- kill -9 while Train C2C Projector writes a checkpoint ----------------------------------------------

TRAIN_STEPS = 6
SAMPLES = "kill_samples"


def sample_prompt() -> dict:
    return {
        "3": {"class_type": "DCBTestWanConditioning", "inputs": {"seed": 1, "length": 8, "batch_size": 1}},
        "4": {"class_type": "DCBTestWanConditioning", "inputs": {"seed": 2, "length": 5, "batch_size": 1}},
        "6": {"class_type": "EmptyHunyuanLatentVideo", "inputs": dict(LATENT)},
        "11": {"class_type": "DiTCacheBridge_SaveC2CTrainingSample", "inputs": {
            "latent": ["6", 0], "positive": ["3", 0], "negative": ["4", 0], "sharer_positive": ["3", 0],
            "sharer_negative": ["4", 0], "folder": SAMPLES}},
    }


def training_prompt(output_name: str) -> dict:
    """checkpoint_every 1: every step writes a checkpoint (a bundle and a trainer state), each pausing half-way
    in the killed run's folder while kill_at_pause arms it."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": host.T2V_A, "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": host.T2V_B, "weight_dtype": "default"}},
        "5": {"class_type": "DiTCacheBridge_CreateC2CProjector",
              "inputs": {"sharer": ["2", 0], "receiver": ["1", 0], "kind": "full", "mapping": "identity",
                         "layers": "all", "alpha": 0.5, "hidden_dim": 64, "seed": 0}},
        "12": {"class_type": "DiTCacheBridge_TrainC2CProjector", "inputs": {
            "sharer": ["2", 0], "receiver": ["1", 0], "projector": ["5", 0], "dataset": SAMPLES,
            "loss": "distill", "steps": TRAIN_STEPS, "batch_size": 1, "learning_rate": 1e-3, "warmup_steps": 0,
            "schedule": "cosine", "checkpoint_every": 1, "seed": 0, "output_name": output_name, "resume": True,
            "negative_share": 0.0}},
    }


def own_models_root(tiny_models, root: Path) -> Path:
    """The tiny models plus an empty c2c_projectors folder of this test's own (training writes there)."""
    root.mkdir(parents=True)
    (root / "diffusion_models").symlink_to(Path(tiny_models.root) / "diffusion_models", target_is_directory=True)
    (root / "c2c_projectors").mkdir()
    return root


def load_state(path: Path) -> dict:
    """Read a trainer-state file completely (metadata and every tensor), as resuming does."""
    from c2c_core.tensorfile import load_tensors, read_header, read_meta
    from c2c_core.checkpoint import TRAINER_STATE_KEY
    meta = read_meta(path, TRAINER_STATE_KEY)
    load_tensors(path, list(read_header(path)[1]))
    return meta


def test_kill_9_while_checkpointing_leaves_old_or_new_checkpoint_and_resumes_exactly(running):
    from c2c_core import load_bundle
    from c2c_core.checkpoint import find_checkpoint
    from c2c_core.errors import BundleError
    srv = running
    projectors = srv.base_dir / "models" / "c2c_projectors"
    checkpoints = srv.output_dir / "c2c_training" / "checkpoints"
    srv.run(sample_prompt(), timeout=300)
    killed = srv.output_dir / CHECKPOINTS / KILLED
    kill_at_pause(srv, killed, training_prompt(KILLED), after_states=2)
    names = sorted(p.name for p in killed.iterdir())
    temps = [killed / n for n in names if n.endswith(".tmp")]
    assert temps, names
    states = [killed / n for n in names if n.endswith(".state.safetensors")]
    assert 2 <= len(states) <= 3, names               # the old checkpoints (keep_last 3)…
    for state in states:                              # …complete: the bundle each state names loads
        load_bundle(killed / load_state(state)["bundle"])
    for bundle in killed.glob("step_*[0-9].safetensors"):   # a bundle awaiting its state file loads too
        load_bundle(bundle)
    published = {p.stat().st_ino for p in killed.glob("*.safetensors")}
    for temp in temps:                                # a half-written file never loads
        if temp.stat().st_ino in published:           # killed between link and unlink: a complete copy
            continue
        as_bundle = temp.with_name(temp.name + ".copy.safetensors")
        as_bundle.write_bytes(temp.read_bytes())
        with pytest.raises(BundleError):
            load_state(as_bundle) if ".state." in temp.name else load_bundle(as_bundle)
        as_bundle.unlink()
    resume_step = load_state(find_checkpoint(killed))["step"]
    assert resume_step < TRAIN_STEPS
    assert not (projectors / f"{killed.name}.safetensors").exists(), "the killed run published a projector"

    srv.stop()
    srv.start()                                       # start-up removes the dead server's temp files
    assert not [p for p in killed.iterdir() if p.suffix == ".tmp"]
    srv.run(training_prompt(killed.name), timeout=600)             # resumes from the newest checkpoint
    srv.run(training_prompt("uninterrupted"), timeout=600)
    resumed = load_bundle(projectors / f"{killed.name}.safetensors")
    whole = load_bundle(projectors / "uninterrupted.safetensors")
    assert resumed.provenance["steps"] == whole.provenance["steps"] == TRAIN_STEPS
    state = resumed.bank.state_dict()
    assert all(torch.equal(state[k], v) for k, v in whole.bank.state_dict().items()), \
        f"resuming from step {resume_step} after kill -9 did not reach the uninterrupted weights"
