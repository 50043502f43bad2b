"""Node help pages (web/docs/<NodeId>.md): present, served where the frontend looks, naming every input."""
from __future__ import annotations

import re

import pytest
import requests

import host

PACK_NODES = tuple("DiTCacheBridge_" + name for name in (
    "LoadC2CProjector", "CreateC2CProjector", "CaptureKVCache", "FuseCaches", "BridgedKSampler",
    "RecordKVCache", "SaveKVCache", "LoadKVCache", "SaveC2CTrainingSample", "TrainC2CProjector",
    "BridgedQwenTextEncode", "SaveC2CTextTrainingSample", "TrainC2CTextProjector"))
DOCS = host.REPO_ROOT / "web" / "docs"


def help_url(server, node: dict) -> str:
    """Where frontend 1.32 fetches a custom node's help: /extensions/<pack folder>/docs/<NodeId>.md.

    (It tries docs/<NodeId>/<locale>.md first and falls back to this file.)
    """
    module = node["python_module"]
    assert module.startswith("custom_nodes."), module
    return f"{server.url}/extensions/{module.split('.')[1]}/docs/{node['name']}.md"


@pytest.mark.parametrize("node_id", PACK_NODES)
def test_help_page_is_served_where_the_frontend_looks(comfy_server, node_id):
    response = requests.get(help_url(comfy_server, comfy_server.object_info(node_id)), timeout=30)
    assert response.status_code == 200
    assert response.content.decode("utf-8") == (DOCS / f"{node_id}.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("node_id", PACK_NODES)
def test_help_page_names_every_input(comfy_server, node_id):
    info = comfy_server.object_info(node_id)
    text = (DOCS / f"{node_id}.md").read_text(encoding="utf-8")
    inputs = [name for section in ("required", "optional") for name in info["input_order"].get(section, [])]
    missing = [name for name in inputs if not re.search(rf"`{re.escape(name)}`", text)]
    assert not missing, f"web/docs/{node_id}.md does not describe inputs {missing}"
    assert text.startswith(f"# {info['display_name']}\n")
