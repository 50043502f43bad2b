"""The shipped workflows: they load in the graph editor as saved, their links are well typed, and each
one, converted to an API prompt with the tiny models substituted, runs on a real ComfyUI server."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import host

pytestmark = pytest.mark.slow

workflow_api = host._load_tool("workflow_api")

WORKFLOWS_DIR = host.REPO_ROOT / "workflows"
WORKFLOWS = sorted(WORKFLOWS_DIR.glob("*.json"))
SHIPPED = ("wan21_t2v_with_chronoedit_sharer.json", "chronoedit_with_wan21_i2v_sharer.json",
           "wan21_chronoedit_recorded_low_vram.json")
RECORDED = WORKFLOWS_DIR / "wan21_chronoedit_recorded_low_vram.json"
# Bridges of two text encoders (no Wan models): tests/pack/test_text_encoder.py and
# tests/training/test_text_training.py run them on the tiny Qwen models
TEXT_ENCODER_WORKFLOWS = ("qwen_image_edit_c2c.json", "qwen_image_train_text_projector.json")
WAN_WORKFLOWS = [p for p in WORKFLOWS if p.name not in TEXT_ENCODER_WORKFLOWS]
TINY = workflow_api.TinySettings(width=64, height=64, length=5, steps=2)
NODE_KEYS = ("id", "type", "pos", "size", "inputs", "outputs", "widgets_values")

params = pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def types_match(a: str, b: str) -> bool:
    """Socket compatibility as the editor sees it: equal, a wildcard, or a shared member of 'A,B' lists."""
    if a == "*" or b == "*" or a == b:
        return True
    return bool(set(a.split(",")) & set(b.split(",")))


def declared_input_type(object_info: dict, node: dict, name: str) -> str:
    for input_name, spec in workflow_api.declared_inputs(object_info[node["type"]]):
        if input_name == name:
            return workflow_api.spec_type(spec)
    raise AssertionError(f"node {node['id']} ({node['type']}) has an input '{name}' that /object_info does not declare")


def test_the_documented_workflows_are_shipped():
    names = {p.name for p in WORKFLOWS}
    assert set(SHIPPED) <= names


@params
def test_workflow_is_a_ui_format_graph(path):
    workflow = load(path)
    assert workflow["version"] == 0.4
    for key in ("nodes", "links", "groups", "extra", "last_node_id", "last_link_id"):
        assert key in workflow, key
    ids = [node["id"] for node in workflow["nodes"]]
    assert len(ids) == len(set(ids)), "duplicate node ids"
    assert workflow["last_node_id"] >= max(ids)
    assert workflow["last_link_id"] >= max(link[0] for link in workflow["links"])
    for node in workflow["nodes"]:
        missing = [key for key in NODE_KEYS if key not in node]
        assert not missing, f"node {node.get('id')} lacks {missing}"


@params
def test_workflow_is_grouped_and_annotated(path):
    workflow = load(path)
    assert len(workflow["groups"]) >= 3
    notes = [n for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert len(notes) >= 2 and all(n["widgets_values"][0].strip() for n in notes)


@params
def test_workflow_names_real_model_files(path):
    workflow = load(path)
    loaders = [n for n in workflow["nodes"] if n["type"] in ("UNETLoader", "CLIPLoader")]
    pair = "CLIPLoader" if path.name in TEXT_ENCODER_WORKFLOWS else "UNETLoader"
    assert sum(n["type"] == pair for n in loaders) >= 2, "a bridge needs a sharer and a receiver"
    for node in loaders:
        name = node["widgets_values"][0]
        assert not name.startswith("tiny_"), f"{path.name} ships a test model name {name}"
        assert [m["name"] for m in node["properties"]["models"]] == [name], "download link for the editor"


@params
def test_every_node_type_exists_on_the_server(path, object_info):
    workflow = load(path)
    unknown = sorted({n["type"] for n in workflow["nodes"]} - set(object_info) - workflow_api.FRONTEND_ONLY)
    assert not unknown, f"{path.name}: node types missing from /object_info: {unknown}"


@params
def test_node_slots_match_the_server_declarations(path, object_info):
    for node in load(path)["nodes"]:
        if node["type"] in workflow_api.FRONTEND_ONLY:
            continue
        info = object_info[node["type"]]
        saved = [o["type"] for o in node["outputs"]]
        # a prefix: newer hosts add outputs to core nodes (SaveImage gained an IMAGE output), older saves stay valid
        assert info["output"][:len(saved)] == saved, f"node {node['id']} outputs"
        for slot in node["inputs"]:
            declared = declared_input_type(object_info, node, workflow_api.input_name(slot))
            assert types_match(slot["type"], declared), f"node {node['id']} input {slot['name']}"


@params
def test_every_link_type_matches_both_ends(path, object_info):
    workflow = load(path)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link in workflow_api.links_of(workflow).values():
        origin, target = nodes[link.origin_id], nodes[link.target_id]
        out_slot, in_slot = origin["outputs"][link.origin_slot], target["inputs"][link.target_slot]
        assert link.id in (out_slot.get("links") or []), f"link {link.id} missing on its origin"
        assert in_slot.get("link") == link.id, f"link {link.id} missing on its target"
        target_type = declared_input_type(object_info, target, workflow_api.input_name(in_slot))
        assert types_match(link.type, target_type), f"link {link.id}: {link.type} into {target_type}"
        if origin["type"] not in workflow_api.FRONTEND_ONLY:
            origin_type = object_info[origin["type"]]["output"][link.origin_slot]
            assert types_match(link.type, origin_type), f"link {link.id}: {origin_type} sent as {link.type}"
            assert types_match(origin_type, target_type), f"link {link.id}: {origin_type} into {target_type}"


@params
def test_workflow_converts_to_an_api_prompt(path, object_info):
    api = workflow_api.to_api(load(path), object_info)
    for node_id, node in api.items():
        declared = {name for name, _ in workflow_api.declared_inputs(object_info[node["class_type"]])}
        sent = {name.split(".")[0] for name in node["inputs"]}     # "format.codec": a dynamic combo's own widget
        assert sent <= declared, f"node {node_id}: {sent - declared}"
        for name, value in node["inputs"].items():
            if workflow_api.is_link(value):
                assert value[0] in api, f"node {node_id}.{name} reads node {value[0]}, which is not sent"


@pytest.mark.parametrize("path", WAN_WORKFLOWS, ids=[p.stem for p in WAN_WORKFLOWS])
def test_workflow_runs_on_tiny_models(path, comfy_server, object_info):
    api = workflow_api.substitute_tiny(workflow_api.to_api(load(path), object_info), TINY, object_info)
    saves = workflow_api.nodes_of_type(api, "SaveLatent")
    assert saves, "the substituted graph saves no latent"
    entry = comfy_server.run(api, timeout=300)

    import safetensors.torch
    import torch
    for node_id in saves:
        files = comfy_server.output_files(entry, node_id)
        assert files and all(f.is_file() for f in files), f"SaveLatent {node_id} wrote nothing"
        latent = safetensors.torch.load_file(str(files[0]))["latent_tensor"]
        assert latent.shape == (1, 16, 2, 8, 8) and torch.isfinite(latent).all()


def saved_latent(server, entry, node_id):
    import safetensors.torch

    (path,) = server.output_files(entry, node_id)
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def test_recorded_workflow_later_runs_replay_the_saved_recording(comfy_server, object_info):
    """Run 1 records, saves and samples; unmuting the 'later runs' group replays the file, same result."""
    import torch

    workflow = load(RECORDED)
    first = workflow_api.substitute_tiny(workflow_api.to_api(workflow, object_info), TINY, object_info)
    assert len(workflow_api.nodes_of_type(first, "DiTCacheBridge_RecordKVCache")) == 1
    assert not workflow_api.nodes_of_type(first, "DiTCacheBridge_CaptureKVCache")
    (save_kv,) = workflow_api.nodes_of_type(first, "DiTCacheBridge_SaveKVCache")
    (first_out,) = workflow_api.nodes_of_type(first, "SaveLatent")
    entry = comfy_server.run(first, timeout=300)
    (saved,) = entry["outputs"][save_kv]["kv_cache"]

    muted = [node for node in workflow["nodes"] if node.get("mode") == workflow_api.MODE_MUTED]
    assert "DiTCacheBridge_LoadKVCache" in {node["type"] for node in muted}
    for node in muted:
        node["mode"] = 0
    later = workflow_api.substitute_tiny(workflow_api.to_api(workflow, object_info), TINY, object_info)
    (load_kv,) = workflow_api.nodes_of_type(later, "DiTCacheBridge_LoadKVCache")
    later[load_kv]["inputs"]["kv_cache"] = saved["filename"]
    (later_out,) = [i for i in workflow_api.nodes_of_type(later, "SaveLatent")
                    if workflow_api.depends_on(later, i, load_kv)]
    later = workflow_api.keep_needed(later, object_info, outputs=[later_out])
    assert not workflow_api.nodes_of_type(later, "DiTCacheBridge_RecordKVCache"), "later runs must not sample the sharer"
    replayed = saved_latent(comfy_server, comfy_server.run(later, timeout=300), later_out)

    assert torch.equal(replayed, saved_latent(comfy_server, entry, first_out))


def test_recorded_workflow_feeds_one_seed_to_the_recording_and_the_receiver(object_info):
    """Record KV Cache's seed is a noise seed: the replay fits only the receiver run that uses the same one."""
    workflow = load(RECORDED)
    links = workflow_api.links_of(workflow)
    nodes = {n["id"]: n for n in workflow["nodes"]}

    def seed_source(node):
        (slot,) = [s for s in node["inputs"] if workflow_api.input_name(s) == "seed"]
        assert slot.get("link") is not None, f"node {node['id']} ({node['type']}): seed is a widget, not the shared one"
        return links[slot["link"]].origin_id

    (record,) = [n for n in workflow["nodes"] if n["type"] == "DiTCacheBridge_RecordKVCache"]
    samplers = [n for n in workflow["nodes"] if n["type"] == "KSampler"]
    assert samplers and {seed_source(n) for n in samplers} == {seed_source(record)}
    assert nodes[seed_source(record)]["title"] == "seed"


def test_train_projector_workflow_saves_no_control_after_generate_for_the_training_seed(object_info):
    """The training seed has no 'randomize' widget (a re-queue must reuse the trained result, not retrain)."""
    (train,) = [n for n in load(WORKFLOWS_DIR / "train_projector.json")["nodes"]
                if n["type"] == "DiTCacheBridge_TrainC2CProjector"]
    values = workflow_api.widget_values(train, object_info[train["type"]])
    assert values["seed"] == 0 and not set(train["widgets_values"]) & workflow_api.CONTROL_AFTER_GENERATE
