"""The shipped workflows as a new user meets them in the graph editor: what opens on screen, and what
following their notes does.

Layout (both renderers): no two groups overlap (a node in two groups is muted with either), every
group's title is its own, every note is on screen and under no panel of the page when the workflow
opens, and every node is at least as large as its widgets need (and not much larger: a stale saved
size leaves an empty band). Notes: each instruction a note gives about muting groups is done in the
editor (its group membership, not ours), and the graph it leaves is queued on the tiny models.
"""
from __future__ import annotations

import json

import pytest

import host
from web.test_browser import (ARTIFACTS, RENDERER_NAMES, RENDERERS, Scenes, browser_tools,  # noqa: F401 (fixtures)
                              shipped_workflows, ui_server)

pytestmark = [pytest.mark.browser, pytest.mark.slow(seconds=80)]

workflow_api = host._load_tool("workflow_api")

TINY = workflow_api.TinySettings(width=64, height=64, length=5, steps=2)
SLACK = 40        # px a node may be taller/wider than its widgets need before it is an empty band
NOTES = ("Note", "MarkdownNote")


def overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


# The notes' instructions the tests follow: (workflow, groups to mute, groups to unmute)
RECORDED, TRAINING = "wan21_chronoedit_recorded_low_vram.json", "train_projector.json"
LIVE = ("wan21_t2v_with_chronoedit_sharer.json", "chronoedit_with_wan21_i2v_sharer.json",
        "wan22_experts_switch_with_fusion.json")
FOLLOWED = [(RECORDED, (), ()), (RECORDED, (6, 7), (8,)), (TRAINING, (), ()), (TRAINING, (), (4, 5)),
            *((name, (), ()) for name in LIVE)]


@pytest.fixture(scope="module")
def editor(ui_server, tmp_path_factory) -> Scenes:
    """The module's editor work in one Chromium: the geometry scenario per renderer, then every note followed
    (``FOLLOWED``) as the editor would queue it."""
    workflows = shipped_workflows()
    steps = {renderer: ("geometry", 240, dict(workflows=workflows, renderer=renderer)) for renderer in RENDERER_NAMES}
    for name, mute, unmute in FOLLOWED:
        steps[(name, mute, unmute)] = ("follow", 90, dict(workflows={"run": workflows[name]}, mute=list(mute),
                                                           unmute=list(unmute)))
    return Scenes(ui_server, tmp_path_factory.mktemp("editor"), steps)


@pytest.fixture(scope="module")
def geometry(editor, ui_server):
    """The geometry scenario's results per renderer."""
    found = {renderer: editor(renderer)["results"] for renderer in RENDERER_NAMES}
    (ARTIFACTS / f"geometry-{ui_server.comfyui.name}.json").write_text(json.dumps(found, indent=1), encoding="utf-8")
    return found


@RENDERERS
def test_no_two_groups_of_a_shipped_workflow_overlap(geometry, renderer):
    for name, view in geometry[renderer].items():
        groups = view["groups"]
        for i, a in enumerate(groups):
            for b in groups[i + 1:]:
                assert not overlap(a["bounding"], b["bounding"]), \
                    f"{name}: groups '{a['title']}' {a['bounding']} and '{b['title']}' {b['bounding']} overlap"
        in_two = {n for i, a in enumerate(groups) for b in groups[i + 1:] for n in set(a["nodes"]) & set(b["nodes"])}
        assert not in_two, f"{name}: nodes {sorted(in_two)} belong to two groups"


@RENDERERS
def test_every_note_is_in_view_and_uncovered_when_a_workflow_opens(geometry, renderer):
    for name, view in geometry[renderer].items():
        for note in view["notes"]:
            assert note["covered"] == [], f"{name}: note '{note['title']}' lies under {note['covered']}"
        about = [n for n in view["notes"] if n["title"] == "About this workflow"]
        assert about and about[0]["onScreen"], f"{name}: 'About this workflow' is not wholly on screen: {about}"


def test_every_node_fits_its_widgets_without_empty_bands(geometry):
    for name, view in geometry["canvas"].items():
        for node in view["nodes"]:
            if node["type"] in NOTES or not node["minSize"]:
                continue
            (w, h), (min_w, min_h) = node["size"], node["minSize"]
            label = f"{name}: node {node['id']} ({node['title'] or node['type']}) is {w:.0f}×{h:.0f}"
            assert w >= min_w - 1 and h >= min_h - 1, f"{label}, its widgets need {min_w:.0f}×{min_h:.0f}"
            if node["type"].startswith("DiTCacheBridge_"):
                assert h <= min_h + SLACK, f"{label}: an empty band below its widgets (they need {min_h:.0f})"


def test_nodes_2_cuts_no_widget_or_input_label_of_a_pack_node(geometry):
    for name, view in geometry["vue"].items():
        for node in view["nodes"]:
            if node["type"].startswith("DiTCacheBridge_"):
                assert node["cut"] == [], f"{name}: Nodes 2.0 cuts the labels {node['cut']} on node {node['id']} ({node['type']})"


def test_the_locale_names_every_pack_node_as_the_server_does(ui_server):
    """The frontend titles a running node (queue overlay, tab title) from locales/en/nodeDefs.json."""
    names = json.loads((host.REPO_ROOT / "locales" / "en" / "nodeDefs.json").read_text(encoding="utf-8"))
    info = ui_server.object_info()
    pack = {node_id: spec for node_id, spec in info.items() if node_id.startswith("DiTCacheBridge_")}
    assert set(names) == set(pack)
    for node_id, spec in pack.items():
        assert names[node_id]["display_name"] == spec["display_name"], node_id
        declared = set(spec["input"].get("required", {})) | set(spec["input"].get("optional", {}))
        assert set(names[node_id].get("inputs", {})) <= declared, f"{node_id}: labels for inputs it does not have"


# --------------------------------------------------------------------------------------------------
# Following the notes
# --------------------------------------------------------------------------------------------------

def note_texts(workflow: dict) -> str:
    return "\n".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in NOTES)


def follow(editor: Scenes, name: str, mute=(), unmute=()) -> dict:
    """The UI graph the editor would queue after muting/unmuting the numbered groups (a case of ``FOLLOWED``)."""
    return editor((name, tuple(mute), tuple(unmute)))["workflow"]


def missing_inputs(api: dict, object_info: dict) -> list[str]:
    """Required inputs the graph leaves unset, as the server would refuse them with the real models (the tiny
    substitution drops the image branch and the decoders, so it alone would not notice a muted VAE)."""
    needed = workflow_api.keep_needed(api, object_info)
    return [f"{node['class_type']} {node_id}.{name}" for node_id, node in needed.items()
            for name in object_info[node["class_type"]]["input"].get("required", {}) if name not in node["inputs"]]


def queue(server, workflow: dict, object_info: dict, edit=None) -> dict:
    real = workflow_api.to_api(workflow, object_info)
    assert missing_inputs(real, object_info) == [], "the graph as the editor would queue it lacks inputs"
    api = workflow_api.substitute_tiny(real, TINY, object_info)
    if edit:
        edit(api)
    return api, server.run(api, timeout=400)


def test_the_recorded_workflow_runs_as_loaded_and_as_its_later_runs_note_says(ui_server, editor):
    shipped = shipped_workflows()[RECORDED]
    info = ui_server.object_info()
    assert "Later runs** with the same sharer settings: mute groups 6 and 7 (select, Ctrl+M), unmute group 8" \
        in note_texts(shipped)
    assert "Later runs: mute groups 6 and 7, unmute this group" in note_texts(shipped)

    first, entry = queue(ui_server, follow(editor, RECORDED), info)
    (save_kv,) = workflow_api.nodes_of_type(first, "DiTCacheBridge_SaveKVCache")
    (saved,) = entry["outputs"][save_kv]["kv_cache"]

    def pick_the_saved_file(api):
        (load_kv,) = workflow_api.nodes_of_type(api, "DiTCacheBridge_LoadKVCache")
        api[load_kv]["inputs"]["kv_cache"] = saved["filename"]

    later, entry = queue(ui_server, follow(editor, RECORDED, mute=(6, 7), unmute=(8,)), info,
                         pick_the_saved_file)
    assert not workflow_api.nodes_of_type(later, "DiTCacheBridge_RecordKVCache"), "later runs sample the sharer"
    assert len(workflow_api.nodes_of_type(later, "KSampler")) == 1, "run 1's receiver sampler still runs"
    (out,) = workflow_api.nodes_of_type(later, "SaveLatent")
    assert ui_server.output_files(entry, out), "the later run saved nothing"


def test_the_training_workflow_collects_as_loaded_and_trains_as_its_note_says(ui_server, editor):
    shipped = shipped_workflows()[TRAINING]
    info = ui_server.object_info()
    assert "**Collect** (groups 1–3 on, 4–5 muted)" in note_texts(shipped)
    assert "**Train**: unmute groups 4 and 5" in note_texts(shipped)

    collect, entry = queue(ui_server, follow(editor, TRAINING), info)
    assert workflow_api.nodes_of_type(collect, "DiTCacheBridge_SaveC2CTrainingSample")
    assert not workflow_api.nodes_of_type(collect, "DiTCacheBridge_TrainC2CProjector")

    def train_briefly(api):
        (train,) = workflow_api.nodes_of_type(api, "DiTCacheBridge_TrainC2CProjector")
        api[train]["inputs"].update(steps=2, warmup_steps=0, checkpoint_every=0, output_name="web_note_test_c2c",
                                    resume=False)
        for node_id in workflow_api.nodes_of_type(api, "DiTCacheBridge_CreateC2CProjector"):
            api[node_id]["inputs"]["hidden_dim"] = 16

    trained, entry = queue(ui_server, follow(editor, TRAINING, unmute=(4, 5)), info, train_briefly)
    (train,) = workflow_api.nodes_of_type(trained, "DiTCacheBridge_TrainC2CProjector")
    bridged = [i for i in workflow_api.nodes_of_type(trained, "SaveLatent")
               if workflow_api.depends_on(trained, i, train)]
    assert bridged and all(ui_server.output_files(entry, i) for i in bridged), "group 5 sampled nothing"


@pytest.mark.parametrize("name", LIVE)
def test_a_live_workflow_runs_as_loaded_from_the_editor(ui_server, editor, name):
    shipped = shipped_workflows()[name]
    assert "mute" not in note_texts(shipped).lower(), f"{name}: a note about muting needs a case here"
    api, entry = queue(ui_server, follow(editor, name), ui_server.object_info())
    for out in workflow_api.nodes_of_type(api, "SaveLatent"):
        assert ui_server.output_files(entry, out), f"{name}: SaveLatent {out} wrote nothing"
