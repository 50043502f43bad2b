"""A host without a hook the pack needs: ComfyUI still starts, the pack logs one clear line, and its
nodes say why when they are used. The host is a copy of the one under test with Wan's attention
override hook (``transformer_options["optimized_attention_override"]``) removed."""
from __future__ import annotations

import pytest

import host
from bridge_helpers import bridge_prompt

pytestmark = [pytest.mark.server, pytest.mark.slow]

HOOK = '"optimized_attention_override"'


@pytest.fixture(scope="module")
def hookless_server(comfyui_root, tiny_models, tmp_path_factory):
    attention = (comfyui_root / "comfy" / "ldm" / "modules" / "attention.py").read_text(encoding="utf-8")
    if HOOK not in attention:
        pytest.skip("this host has no attention override hook to remove")
    base = tmp_path_factory.mktemp("hookless")
    tree = host.edited_copy(comfyui_root, base / "ComfyUI", {
        "comfy/ldm/modules/attention.py": lambda text: text.replace(HOOK, '"dcb_test_removed_hook"')})
    with host.ComfyServer(base / "run", tiny_models.root, comfyui=tree) as server:
        yield server


def test_comfyui_starts_and_the_pack_logs_one_line(hookless_server):
    info = hookless_server.object_info()
    assert "KSampler" in info and any(name.startswith("DiTCacheBridge_") for name in info)
    lines = [line for line in hookless_server.log_text().splitlines() if "optimized_attention_override" in line]
    assert len(lines) == 1 and "DiT Cache Bridge" in lines[0] and "Fix:" in lines[0], lines
    assert not [line for line in hookless_server.log_text().splitlines()
                if host.PACK_NAME in line and ("IMPORT FAILED" in line or "Cannot import" in line)]


@pytest.mark.parametrize("use_bridged_sampler", [False, True], ids=["fuse_caches", "bridged_ksampler"])
def test_bridge_nodes_report_the_missing_hook_when_used(hookless_server, use_bridged_sampler):
    with pytest.raises(host.PromptFailed) as failed:
        hookless_server.run(bridge_prompt(1.0, use_bridged_sampler=use_bridged_sampler), timeout=180)
    messages = [m[1] for m in failed.value.entry["status"]["messages"] if m[0] == "execution_error"]
    assert messages and "optimized_attention_override" in messages[0]["exception_message"]
    assert "Fix: update ComfyUI" in messages[0]["exception_message"]


def test_stock_nodes_still_run_on_that_host(hookless_server):
    graph = bridge_prompt(0.0)
    graph["8"]["inputs"]["model"] = ["1", 0]
    del graph["7"], graph["7a"]
    entry = hookless_server.run(graph, timeout=180)
    assert entry["status"]["status_str"] == "success"
