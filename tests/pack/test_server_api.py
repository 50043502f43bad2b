"""The pack inside a running ComfyUI server, driven through its HTTP API as a user's client would."""
from __future__ import annotations

import pytest
import torch

from bridge_helpers import bridge_prompt

pytestmark = pytest.mark.slow      # prompts on the session server

PACK_NODES = tuple("DiTCacheBridge_" + name for name in (
    "LoadC2CProjector", "CreateC2CProjector", "CaptureKVCache", "FuseCaches", "BridgedKSampler",
    "RecordKVCache", "SaveKVCache", "LoadKVCache", "SaveC2CTrainingSample", "TrainC2CProjector",
    "SaveC2CTextTrainingSample", "TrainC2CTextProjector"))


def saved_latent(server, entry) -> torch.Tensor:
    import safetensors.torch
    (path,) = server.output_files(entry, "9")
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def test_object_info_lists_the_pack_nodes_with_tooltips(comfy_server):
    info = comfy_server.object_info()
    for node_id in PACK_NODES:
        assert node_id in info, f"{node_id} missing from /object_info"
        node = info[node_id]
        assert node["category"].startswith("DiT Cache Bridge")
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_prompt_with_pack_nodes_completes_and_writes_a_latent(comfy_server):
    entry = comfy_server.run(bridge_prompt(strength=1.0), timeout=180)
    latent = saved_latent(comfy_server, entry)
    assert latent.shape == (1, 16, 3, 8, 8) and torch.isfinite(latent).all()


def test_bridged_ksampler_prompt_matches_fuse_caches_prompt(comfy_server):
    via_fuse = saved_latent(comfy_server, comfy_server.run(bridge_prompt(0.6), timeout=180))
    via_node = saved_latent(comfy_server, comfy_server.run(bridge_prompt(0.6, use_bridged_sampler=True), timeout=180))
    assert torch.equal(via_fuse, via_node)


def test_strength_zero_prompt_matches_stock_ksampler_prompt(comfy_server):
    stock_graph = bridge_prompt(0.0)
    stock_graph["8"]["inputs"]["model"] = ["1", 0]
    stock = saved_latent(comfy_server, comfy_server.run(stock_graph, timeout=180))
    bridged = saved_latent(comfy_server, comfy_server.run(bridge_prompt(0.0), timeout=180))
    assert torch.equal(stock, bridged)


def test_bad_projector_pair_fails_the_prompt_with_the_node_message(comfy_server):
    import host
    graph = bridge_prompt()
    graph["2"]["inputs"]["unet_name"] = host.T2V_WIDE       # sharer now 3 layers × 4 heads
    graph["5"]["inputs"]["sharer"] = ["1", 0]               # projector made for a → a
    with pytest.raises(host.PromptFailed, match=r"Fuse Caches › projector: a projector made for a sharer of 2 layers"):
        comfy_server.run(graph, timeout=180)
