"""workflows/wan22_experts_switch_with_fusion.json (issue 19, docs/model_selection.md) on a real ComfyUI server with
the tiny models: the high-noise expert samples alone up to the switch, then the bridged low-noise expert runs the
rest with the sharer's K/V taken once, at the switch (Capture KV Cache refresh budget 1). Strength 0 on Fuse Caches
is the plain expert switch of ComfyUI's Wan2.2 template, bit for bit."""
from __future__ import annotations

import json

import pytest

import host

pytestmark = pytest.mark.slow

workflow_api = host._load_tool("workflow_api")

WORKFLOW = host.REPO_ROOT / "workflows" / "wan22_experts_switch_with_fusion.json"
TINY = workflow_api.TinySettings(width=64, height=64, length=5)
STEPS, SWITCH = 6, 3


def titled(api: dict, title: str) -> str:
    (node_id,) = [i for i, n in api.items() if n["_meta"]["title"] == title]
    return node_id


@pytest.fixture(scope="module")
def shipped(comfy_server) -> dict:
    """The workflow as the editor would queue it, on the tiny models, with a short schedule."""
    info = comfy_server.object_info()
    api = workflow_api.substitute_tiny(workflow_api.to_api(json.loads(WORKFLOW.read_text(encoding="utf-8")), info),
                                       TINY, info)
    api[titled(api, "steps")]["inputs"]["value"] = STEPS
    api[titled(api, "switch step")]["inputs"]["value"] = SWITCH
    return api


@pytest.fixture(scope="module")
def events(comfy_server):
    from demo_events import ServerEvents
    listener = ServerEvents(comfy_server)
    yield listener
    listener.close()


def run(server, events, api):
    """(the saved latent, the fusion reports) of one queued prompt."""
    import safetensors.torch

    entry, reports, _ = events.run(api, timeout=300)
    (save,) = workflow_api.nodes_of_type(api, "SaveLatent")
    (path,) = server.output_files(entry, save)
    return safetensors.torch.load_file(str(path))["latent_tensor"], reports


def with_strength(api: dict, strength: float) -> dict:
    api = json.loads(json.dumps(api))
    (fuse,) = workflow_api.nodes_of_type(api, "DiTCacheBridge_FuseCaches")
    api[fuse]["inputs"]["strength"] = strength
    return api


def test_the_workflow_wires_the_experts_as_the_recipe_says(shipped):
    (capture,) = workflow_api.nodes_of_type(shipped, "DiTCacheBridge_CaptureKVCache")
    (fuse,) = workflow_api.nodes_of_type(shipped, "DiTCacheBridge_FuseCaches")
    high, low = workflow_api.nodes_of_type(shipped, "KSamplerAdvanced")
    assert {k: shipped[capture]["inputs"][k] for k in ("refresh", "budget")} == {"refresh": "budget", "budget": 1}
    sharer_model = shipped[capture]["inputs"]["sharer"]
    assert shipped[high]["inputs"]["model"] == sharer_model, "the sharer samples the high-noise steps alone"
    assert shipped[low]["inputs"]["model"] == [fuse, 0], "the bridged receiver samples the low-noise steps"
    assert shipped[low]["inputs"]["latent_image"] == [high, 0]
    switch, steps = [titled(shipped, "switch step"), 0], [titled(shipped, "steps"), 0]
    assert shipped[high]["inputs"]["end_at_step"] == shipped[low]["inputs"]["start_at_step"] == switch
    assert shipped[high]["inputs"]["steps"] == shipped[low]["inputs"]["steps"] == steps
    assert shipped[high]["inputs"]["return_with_leftover_noise"] == "enable"
    assert shipped[low]["inputs"]["add_noise"] == "disable"


def test_the_sharer_runs_once_at_the_switch_and_changes_the_result(comfy_server, events, shipped):
    fused, reports = run(comfy_server, events, shipped)
    (fuse,) = workflow_api.nodes_of_type(shipped, "DiTCacheBridge_FuseCaches")
    (report,) = [r["report"] for r in reports if r["node"] == fuse]
    assert report["model_calls"] == STEPS - SWITCH            # cond and uncond batched: one call per step
    assert report["refresh"]["sharer_steps"] == [0], "the run's first step: the switch"
    assert report["refresh"]["forwards_saved"] == STEPS - SWITCH - 1
    assert report["sharer_forwards"] == 1                     # once: one forward, both CFG branches batched
    plain, _ = run(comfy_server, events, with_strength(shipped, 0.0))
    assert (fused - plain).abs().max() > 1e-3


def test_strength_zero_is_the_plain_expert_switch_bit_for_bit(comfy_server, events, shipped):
    """The baseline without fusion (T-Stitch / FlowBlending) is ComfyUI's own two-expert graph."""
    import torch

    off, reports = run(comfy_server, events, with_strength(shipped, 0.0))
    stock = json.loads(json.dumps(shipped))
    (fuse,) = workflow_api.nodes_of_type(stock, "DiTCacheBridge_FuseCaches")
    _, low = workflow_api.nodes_of_type(stock, "KSamplerAdvanced")
    stock[low]["inputs"]["model"] = stock[fuse]["inputs"]["model"]          # the low-noise expert, unbridged
    stock = workflow_api.keep_needed(stock, comfy_server.object_info())
    assert not workflow_api.nodes_of_type(stock, "DiTCacheBridge_FuseCaches")
    plain, _ = run(comfy_server, events, stock)
    assert torch.equal(off, plain)
    assert all(r["report"]["sharer_forwards"] == 0 for r in reports), "strength 0 never runs the sharer"
