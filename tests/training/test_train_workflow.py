"""workflows/train_projector.json on a real ComfyUI server with the tiny models: collect, train, sample.

The shipped graph mutes the train and try-it groups (users collect samples first); here every group
is switched on, as a user does for the final run, and training is cut to a few steps.
"""
from __future__ import annotations

import json

import pytest

import host

pytestmark = pytest.mark.slow

workflow_api = host._load_tool("workflow_api")
WORKFLOW = host.REPO_ROOT / "workflows" / "train_projector.json"
TINY = workflow_api.TinySettings(width=64, height=64, length=5, steps=2)
OUTPUT_NAME = "dcb_test_train_workflow"


@pytest.fixture
def bundle_path(tiny_models):
    path = tiny_models.root / "c2c_projectors" / f"{OUTPUT_NAME}.safetensors"
    path.unlink(missing_ok=True)
    yield path
    path.unlink(missing_ok=True)


def test_shipped_workflow_collects_only_until_training_is_unmuted(comfy_server):
    workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    api = workflow_api.to_api(workflow, comfy_server.object_info())
    kinds = {node["class_type"] for node in api.values()}
    assert "DiTCacheBridge_SaveC2CTrainingSample" in kinds
    assert not kinds & {"DiTCacheBridge_TrainC2CProjector", "DiTCacheBridge_CreateC2CProjector", "DiTCacheBridge_FuseCaches"}


def test_unmuted_workflow_saves_a_sample_trains_and_samples_with_the_projector(comfy_server, bundle_path, pack):
    from c2c_core import load_bundle
    workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    for node in workflow["nodes"]:
        node["mode"] = 0
    object_info = comfy_server.object_info()
    api = workflow_api.substitute_tiny(workflow_api.to_api(workflow, object_info), TINY, object_info)
    (train,) = workflow_api.nodes_of_type(api, "DiTCacheBridge_TrainC2CProjector")
    api[train]["inputs"].update(steps=3, warmup_steps=0, checkpoint_every=0, output_name=OUTPUT_NAME, resume=False)
    (save,) = workflow_api.nodes_of_type(api, "DiTCacheBridge_SaveC2CTrainingSample")
    assert api[train]["inputs"]["dataset"] == [save, 0], "training must wait for the sample"
    entry = comfy_server.run(api, timeout=300)
    assert bundle_path.is_file()
    assert load_bundle(bundle_path).provenance["steps"] == 3
    previews = [i for i in workflow_api.nodes_of_type(api, "PreviewImage")]
    assert previews and entry["outputs"][previews[0]]["images"], "the loss plot is shown"
    assert len(workflow_api.nodes_of_type(api, "SaveLatent")) == 2      # the sample and the bridged video
