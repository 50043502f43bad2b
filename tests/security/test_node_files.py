"""The file nodes inside a real (in-process) ComfyUI: saves never overwrite, loads never go stale,
temp recordings never outlive their run, and prompt values the UI would not produce are refused by
the node that owns them."""
from __future__ import annotations

import gc
import hashlib
import math
import os
import re

import pytest
import torch

from bridge_helpers import empty_latent, load_model, pack_nodes

pytestmark = pytest.mark.usefixtures("comfy")

SAMPLING = dict(seed=3, steps=2, cfg=4.0, sampler_name="euler", scheduler="simple", denoise=1.0)


@pytest.fixture(scope="module")
def model(tiny_models):
    import host
    pack_nodes()                    # imports the pack as dit_cache_bridge
    return load_model(tiny_models.path(host.T2V_A))


@pytest.fixture(scope="module")
def conds():
    from comfy_test_nodes import wan_conditioning
    return wan_conditioning(1), wan_conditioning(2, length=5)


def record(model, conds, storage="ram", seed=3, layers="0"):
    pos, neg = conds
    return pack_nodes().RecordKVCache.execute(model, pos, neg, empty_latent(), layers=layers, storage_dtype="bf16",
                                              storage=storage, **(SAMPLING | {"seed": seed})).args[0]


def save(source, prefix):
    (entry,) = pack_nodes().SaveKVCache.execute(source, prefix).ui["kv_cache"]
    return entry


def _folder():
    return pack_nodes().kv_cache.recordings_folder()


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def c2c_temp_folders():
    import folder_paths
    temp = folder_paths.get_temp_directory()
    return sorted(f for f in os.listdir(temp) if f.startswith("c2c_kv_")) if os.path.isdir(temp) else []


# -- saves never overwrite ------------------------------------------------------------------------------

def test_saving_twice_with_one_prefix_writes_two_files_and_keeps_the_first(model, conds):
    first = save(record(model, conds, seed=3), "twice/rec")
    path = os.path.join(_folder(), "twice", first["filename"])
    before = digest(path)
    second = save(record(model, conds, seed=4), "twice/rec")
    assert first["filename"] == "rec_00001.safetensors" and second["filename"] == "rec_00002.safetensors"
    assert digest(path) == before


def test_a_recording_saved_under_a_subfolder_is_listed_by_load_kv_cache(model, conds):
    entry = save(record(model, conds), "sub/deeper/rec")
    assert f"sub/deeper/{entry['filename']}" in pack_nodes().kv_cache.recording_files()


@pytest.mark.parametrize("prefix", ["", "   ", "a\x00b", "x" * 300, "../escape", "/abs/path", "a/../../b", "c:\\x"])
def test_save_kv_cache_refuses_a_prefix_that_is_no_file_name(model, conds, prefix):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    source = record(model, conds)
    with pytest.raises(BridgeInputError, match=r"Save KV Cache › filename_prefix: the prefix") as info:
        save(source, prefix)
    assert len(str(info.value)) < 600


# -- loads never go stale --------------------------------------------------------------------------------

def test_load_kv_cache_fingerprint_changes_when_the_file_is_replaced(model, conds):
    nodes = pack_nodes()
    entry = save(record(model, conds, seed=3), "stale/rec")
    name = f"stale/{entry['filename']}"
    before = nodes.LoadKVCache.fingerprint_inputs(kv_cache=name)
    other = save(record(model, conds, seed=4), "stale/other")
    os.replace(os.path.join(_folder(), "stale", other["filename"]), os.path.join(_folder(), name))
    assert nodes.LoadKVCache.fingerprint_inputs(kv_cache=name) != before
    assert nodes.LoadKVCache.execute(name).args[0].recording.seed == 4


def test_a_loaded_recording_refuses_to_read_a_file_replaced_under_it(model, conds):
    from c2c_core.errors import FileChangedError
    nodes = pack_nodes()
    entry = save(record(model, conds, seed=3), "swap/rec")
    name = f"swap/{entry['filename']}"
    loaded = nodes.LoadKVCache.execute(name).args[0].recording
    other = save(record(model, conds, seed=4), "swap/other")
    os.replace(os.path.join(_folder(), "swap", other["filename"]), os.path.join(_folder(), name))
    with pytest.raises(FileChangedError, match="changed after its header was read"):
        loaded.get(0, 0, 0)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_deleted_or_truncated_recording_fails_on_load_kv_cache(model, conds, damage):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    entry = save(record(model, conds), f"{damage}/rec")
    path = os.path.join(_folder(), damage, entry["filename"])
    if damage == "delete":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(BridgeInputError, match=r"Load KV Cache › kv_cache: "):
        pack_nodes().LoadKVCache.execute(f"{damage}/{entry['filename']}")


def test_load_kv_cache_refuses_names_outside_its_folder():
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    for name in ("../../etc/passwd", "/etc/passwd", "a\x00b"):
        with pytest.raises(BridgeInputError, match=r"Load KV Cache › kv_cache: the name"):
            pack_nodes().LoadKVCache.execute(name)


def test_load_c2c_projector_fingerprint_follows_the_file(tmp_path):
    import folder_paths
    from c2c_core import LayerMap, ModelSignature, ProjectorBank, save_bundle
    folder_paths.add_model_folder_path("c2c_projectors", str(tmp_path))
    sig = ModelSignature(2, 2, 4)
    layer_map = LayerMap.build("identity", 2, 2)
    path = tmp_path / "fp_test.safetensors"
    save_bundle(path, ProjectorBank.build("weighted", sig, sig, layer_map.layers, alpha=0.2), layer_map)
    node = pack_nodes().LoadC2CProjector
    before = node.fingerprint_inputs(projector_name="fp_test.safetensors")
    save_bundle(path, ProjectorBank.build("weighted", sig, sig, layer_map.layers, alpha=0.7), layer_map)
    assert node.fingerprint_inputs(projector_name="fp_test.safetensors") != before
    os.remove(path)
    assert node.fingerprint_inputs(projector_name="fp_test.safetensors") == "missing"


# -- temp recordings never outlive their run -----------------------------------------------------------

def test_a_disk_recording_deletes_its_temp_folder_when_dropped(model, conds):
    before = set(c2c_temp_folders())
    source = record(model, conds, storage="disk")
    made = set(c2c_temp_folders()) - before
    assert len(made) == 1
    del source
    gc.collect()
    assert set(c2c_temp_folders()) == before


def test_an_interrupted_disk_recording_leaves_no_temp_folder(model, conds):
    import comfy.model_management as mm
    before = set(c2c_temp_folders())
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            record(model, conds, storage="disk")
    finally:
        mm.interrupt_current_processing(False)
    gc.collect()
    assert set(c2c_temp_folders()) == before


def test_save_kv_cache_streams_a_disk_recording_without_reading_it_into_memory(model, conds, monkeypatch):
    from c2c_core import recording as recording_module
    source = record(model, conds, storage="disk", layers="all")
    reads = []
    monkeypatch.setattr(recording_module.DiskStore, "get", lambda self, names: reads.append(names) or {})
    entry = save(source, "stream/rec")
    assert reads == []
    monkeypatch.undo()
    loaded = pack_nodes().LoadKVCache.execute(f"stream/{entry['filename']}").args[0].recording
    for step in range(2):
        k, v = loaded.get(step, 0, 1)
        k0, v0 = source.recording.get(step, 0, 1)
        assert torch.equal(k, k0) and torch.equal(v, v0)


# -- saves that cannot land where asked (issue 23, item 9): clear errors, nothing written ------------------

def test_save_kv_cache_refuses_a_link_inside_its_folder_and_writes_nothing_outside(model, conds, tmp_path):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    source = record(model, conds)
    os.makedirs(_folder(), exist_ok=True)
    link = os.path.join(_folder(), "linked")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(tmp_path, link)
    try:
        with pytest.raises(BridgeInputError) as info:
            save(source, "linked/rec")
    finally:
        os.remove(link)
    assert str(info.value) == (f"Save KV Cache › filename_prefix: kv_cache/linked is a link to {str(tmp_path)!r}; "
                               f"expected a real folder inside kv_cache/ (the pack writes only inside it). Fix: remove "
                               f"the link {link}, or choose another filename_prefix")
    assert os.listdir(tmp_path) == []


def test_save_kv_cache_refuses_a_file_where_its_sub_folder_should_be(model, conds):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    source = record(model, conds)
    os.makedirs(_folder(), exist_ok=True)
    blocker = os.path.join(_folder(), "blocked")
    open(blocker, "w").close()
    try:
        with pytest.raises(BridgeInputError) as info:
            save(source, "blocked/deeper/rec")
        assert os.path.isfile(blocker) and os.path.getsize(blocker) == 0
    finally:
        os.remove(blocker)
    assert str(info.value) == (f"Save KV Cache › filename_prefix: kv_cache/blocked is a file, not a folder; expected a "
                               f"sub-folder name that is free or a folder. Fix: rename or remove the file {blocker}, or "
                               f"choose another filename_prefix")


@pytest.mark.parametrize("code, found, expected, fix", [
    (30, "kv_cache/ro is not writable (Read-only file system)", "a folder ComfyUI may write to",
     "give ComfyUI write access to {folder}, or start it with --output-directory on a writable folder"),
    (13, "kv_cache/ro is not writable (Permission denied)", "a folder ComfyUI may write to",
     "give ComfyUI write access to {folder}, or start it with --output-directory on a writable folder"),
    (28, "the disk of kv_cache/ro is full ({free})", "room for the file",
     "free disk space there, or start ComfyUI with --output-directory on another disk"),
])
def test_save_kv_cache_into_a_read_only_or_full_folder_says_so_and_leaves_no_file(model, conds, monkeypatch, code,
                                                                                    found, expected, fix):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    from dit_cache_bridge.nodes import kv_cache
    source = record(model, conds)

    def failing_save(path, recording):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(kv_cache, "save_recording", failing_save)
    folder = os.path.join(_folder(), "ro")
    with pytest.raises(BridgeInputError) as info:
        save(source, "ro/rec")
    message = re.escape(f"Save KV Cache › filename_prefix: {found.format(free='FREE')}; expected {expected}. "
                        f"Fix: {fix.format(folder=folder)}").replace("FREE", r"\d+ MB free")
    assert re.fullmatch(message, str(info.value)), str(info.value)
    assert os.listdir(folder) == []


def test_record_kv_cache_on_disk_creates_a_missing_temp_folder(model, conds, tmp_path, monkeypatch):
    import folder_paths
    temp = tmp_path / "removed" / "temp"
    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(temp))
    source = record(model, conds, storage="disk")
    assert temp.is_dir() and len(os.listdir(temp)) == 1
    del source
    gc.collect()


def test_record_kv_cache_says_when_the_temp_folder_cannot_be_made(model, conds, tmp_path, monkeypatch):
    import folder_paths
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    (tmp_path / "a_file").write_text("")
    temp = tmp_path / "a_file" / "temp"
    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(temp))
    with pytest.raises(BridgeInputError) as info:
        record(model, conds, storage="disk")
    assert str(info.value) == (f"Record KV Cache › storage: ComfyUI's temp folder {temp} is missing and cannot be "
                               f"created (Not a directory); expected a writable temp folder for a disk recording. Fix: "
                               f"start ComfyUI with --temp-directory on a writable folder, or set storage to 'ram'")


def test_load_kv_cache_fingerprint_sees_a_same_size_rewrite_with_its_mtime_restored(model, conds):
    nodes = pack_nodes()
    entry = save(record(model, conds, seed=3), "ctime/rec")
    name = f"ctime/{entry['filename']}"
    path = os.path.join(_folder(), name)
    before_stat, before = os.stat(path), nodes.LoadKVCache.fingerprint_inputs(kv_cache=name)
    with open(path, "r+b") as f:        # same inode and size, other bytes, mtime set back
        f.seek(-2, os.SEEK_END)
        last = f.read(2)
        f.seek(-2, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in last))
    os.utime(path, ns=(before_stat.st_atime_ns, before_stat.st_mtime_ns))
    assert nodes.LoadKVCache.fingerprint_inputs(kv_cache=name) != before


# -- values the UI would not produce -------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("kind", "banana"), ("kind", ["c2c"]), ("mapping", "banana"),
                                         ("alpha", math.nan), ("alpha", 5.0), ("hidden_dim", -5), ("seed", -1)])
def test_create_c2c_projector_names_the_input_that_is_wrong(model, field, value):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    inputs = dict(kind="weighted", mapping="identity", layers="all", alpha=0.5, hidden_dim=0, seed=0) | {field: value}
    with pytest.raises(BridgeInputError, match=rf"Create C2C Projector › {field}: "):
        pack_nodes().CreateC2CProjector.execute(model, model, **inputs)


@pytest.mark.parametrize("field,value", [("grid_alignment", "banana"), ("refresh_every", 0), ("refresh_every", -3)])
def test_load_kv_cache_names_the_input_that_is_wrong(model, conds, field, value):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    entry = save(record(model, conds), "combo/rec")
    inputs = dict(kv_cache=f"combo/{entry['filename']}", refresh_every=1, grid_alignment="refuse") | {field: value}
    with pytest.raises(BridgeInputError, match=rf"Load KV Cache › {field}: "):
        pack_nodes().LoadKVCache.execute(**inputs)


# -- never a silent black latent -----------------------------------------------------------------------

def test_non_finite_fused_kv_stop_the_run_with_the_layer_named(model, conds):
    from bridge_helpers import ksample
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    nodes = pack_nodes()
    bundle = nodes.CreateC2CProjector.execute(model, model, "full", "identity", "all", 0.5, 8, 0).args[0]
    with torch.no_grad():
        next(bundle.bank.projector(1, "k").parameters()).fill_(float("nan"))
    source = nodes.CaptureKVCache.execute(model, *conds).args[0]
    fused = nodes.FuseCaches.execute(model, source, bundle, 1.0, 0.0, 1.0).args[0]
    with pytest.raises(BridgeInputError, match=r"› strength: the fused K/V of receiver layers \[[0-9, ]*1\] held NaN or Inf"):
        ksample(fused, *conds, steps=2)


# -- every combo is checked by its node (ComfyUI skips V3 combos in API prompts) ------------------------

COMBO_CASES = [
    ("RecordKVCache", "storage", dict(storage="banana")),
    ("RecordKVCache", "storage_dtype", dict(storage_dtype="fp64")),
    ("RecordKVCache", "sampler_name", dict(sampler_name="banana")),
    ("RecordKVCache", "scheduler", dict(scheduler=["simple"])),
    ("RecordKVCache", "rope_alignment", dict(rope_alignment="banana")),
    ("RecordKVCache", "grid_alignment", dict(grid_alignment="banana")),
    ("CaptureKVCache", "rope_alignment", dict(rope_alignment="banana")),
    ("CaptureKVCache", "grid_alignment", dict(grid_alignment=7)),
    ("BridgedKSampler", "sampler_name", dict(sampler_name="banana")),
    ("BridgedKSampler", "scheduler", dict(scheduler="banana")),
    ("BridgedKSampler", "ramp", dict(ramp="banana")),
    ("FuseCaches", "ramp", dict(ramp="banana")),
    ("TrainC2CProjector", "loss", dict(loss="banana")),
    ("TrainC2CProjector", "schedule", dict(schedule="banana")),
]

def schema_defaults(cls) -> dict:
    """A value for every input: combos and numbers from the schema's defaults, sockets None."""
    from comfy_api.latest import io
    values = {}
    for spec in cls.define_schema().inputs:
        if isinstance(spec, io.Combo.Input):
            values[spec.id] = spec.default if spec.default is not None else spec.options[0]
        elif isinstance(spec, (io.Int.Input, io.Float.Input)):
            values[spec.id] = spec.default if spec.default is not None else (spec.min or 0)
        elif isinstance(spec, io.String.Input):
            values[spec.id] = spec.default or ""
        else:
            values[spec.id] = None
    return values


@pytest.mark.parametrize("node,field,bad", COMBO_CASES, ids=[f"{n}-{f}" for n, f, _ in COMBO_CASES])
def test_a_combo_value_outside_its_list_is_refused_by_its_node(node, field, bad):
    cls = getattr(pack_nodes(), node)
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    with pytest.raises(BridgeInputError, match=rf"{cls.NODE} › {field}: "):
        cls.execute(**(schema_defaults(cls) | bad))


NUMBER_CASES = [
    ("FuseCaches", "strength", 1e6), ("FuseCaches", "strength", math.nan), ("FuseCaches", "end_percent", 5.0),
    ("FuseCaches", "end_percent", math.nan), ("CaptureKVCache", "refresh_every", 0),
    ("CaptureKVCache", "refresh_every", -3), ("RecordKVCache", "denoise", math.nan), ("RecordKVCache", "steps", 0),
    ("BridgedKSampler", "strength", math.inf), ("BridgedKSampler", "cfg", -1.0),
    ("TrainC2CProjector", "steps", 0), ("TrainC2CProjector", "batch_size", 0),
    ("TrainC2CProjector", "learning_rate", math.nan),
]


@pytest.mark.parametrize("node,field,bad", NUMBER_CASES, ids=[f"{n}-{f}-{v}" for n, f, v in NUMBER_CASES])
def test_a_number_from_a_link_outside_its_range_names_its_own_input(node, field, bad):
    cls = getattr(pack_nodes(), node)
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    with pytest.raises(BridgeInputError, match=rf"{cls.NODE} › {field}: "):
        cls.execute(**(schema_defaults(cls) | {field: bad}))


@pytest.mark.parametrize("text", ["0:1e30", "1:nan", "0:-1"])
def test_layer_strengths_out_of_range_are_refused(model, conds, text):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    nodes = pack_nodes()
    bundle = nodes.CreateC2CProjector.execute(model, model, "weighted", "identity", "all", 0.5, 0, 0).args[0]
    source = nodes.CaptureKVCache.execute(model, *conds).args[0]
    with pytest.raises(BridgeInputError, match=r"Fuse Caches › layer_strengths: strength"):
        nodes.FuseCaches.execute(model, source, bundle, 1.0, 0.0, 1.0, layer_strengths=text)


# -- interrupting training ---------------------------------------------------------------------------

def test_an_interrupted_training_run_leaves_complete_checkpoints_and_resumes_to_the_same_result(model, conds):
    import shutil
    import threading
    import time
    from pathlib import Path

    import comfy.model_management as mm
    nodes = pack_nodes()
    from c2c_core import load_bundle
    from dit_cache_bridge.nodes import train as train_nodes
    pos, neg = conds
    name = "security_interrupt"
    root = train_nodes.samples_root()
    shutil.rmtree(root / name, ignore_errors=True)
    latent = {"samples": torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))}
    with torch.inference_mode():
        nodes.SaveC2CTrainingSample.execute(latent=latent, positive=pos, negative=neg, sharer_positive=pos,
                                            sharer_negative=neg, folder=name)
    projector = nodes.CreateC2CProjector.execute(model, model, "full", "identity", "all", 0.5, 8, 0).args[0]
    inputs = dict(sharer=model, receiver=model, projector=projector, dataset=name, loss="distill", steps=6,
                  batch_size=1, learning_rate=1e-3, warmup_steps=0, schedule="cosine", checkpoint_every=1, seed=0,
                  resume=True, negative_share=0.0)
    checkpoints = root / "checkpoints"
    written = []
    try:
        for out_name in ("security_whole", "security_cut"):
            shutil.rmtree(checkpoints / out_name, ignore_errors=True)
        with torch.inference_mode():
            whole = nodes.TrainC2CProjector.execute(**inputs, output_name="security_whole").args[0]
        cut = checkpoints / "security_cut"
        stop = threading.Event()

        def interrupt_after_first_checkpoint():     # what POST /interrupt does, once a checkpoint exists
            while not stop.is_set():
                if (cut / "step_000001.state.safetensors").exists():
                    mm.interrupt_current_processing(True)
                    return
                time.sleep(0.001)

        watcher = threading.Thread(target=interrupt_after_first_checkpoint)
        watcher.start()
        try:
            with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
                nodes.TrainC2CProjector.execute(**inputs, output_name="security_cut")
        finally:
            stop.set()
            watcher.join()
            mm.interrupt_current_processing(False)
        left = sorted(cut.iterdir())
        assert not [p for p in left if p.suffix == ".tmp"]
        states = [p for p in left if p.name.endswith(".state.safetensors")]
        assert states and len(states) < inputs["steps"]
        for state in states:                           # every checkpoint left is complete
            load_bundle(state.with_name(state.name.replace(".state", "")))
        with torch.inference_mode():
            resumed = nodes.TrainC2CProjector.execute(**inputs, output_name="security_cut").args[0]
        assert all(torch.equal(v, whole.bank.state_dict()[k]) for k, v in resumed.bank.state_dict().items())
    finally:
        folder = Path(train_nodes.projector_folder())
        written = list(folder.glob("security_*.safetensors"))
        for path in written:
            path.unlink()
        for out_name in ("security_whole", "security_cut"):
            shutil.rmtree(checkpoints / out_name, ignore_errors=True)
        shutil.rmtree(root / name, ignore_errors=True)
