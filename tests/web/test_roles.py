"""The frontend's copy of the pack's node ids and report event (web/js/dit_cache_bridge.js) matches the pack.

The JS colours nodes by role and draws the inspector on the fusion role; it cannot import Python, so its
PREFIX + ROLES lists are the one copy, checked here against the nodes the pack registers and the event
Fuse Caches sends: a renamed or added node fails this test instead of losing its colours silently.
"""
from __future__ import annotations

import importlib
import json
import re

import host

JS = (host.REPO_ROOT / "web" / "js" / "dit_cache_bridge.js").read_text(encoding="utf-8")


def js_constant(name: str) -> str:
    match = re.search(rf"^(?:export )?const {name} = (.+?);$", JS, re.MULTILINE | re.DOTALL)
    assert match, f"web/js/dit_cache_bridge.js defines no const {name}"
    return match.group(1)


def js_roles() -> dict[str, list[str]]:
    body = re.sub(r"(\w+):", r'"\1":', js_constant("ROLES"))          # JS object literal -> JSON
    return json.loads(re.sub(r",\s*}", "}", body))


def test_every_pack_node_has_exactly_one_role_in_the_frontend(comfy):
    pack = host.load_pack()
    nodes = importlib.import_module(f"{pack.__name__}.nodes")
    prefix = json.loads(js_constant("PREFIX"))
    named = [prefix + name for names in js_roles().values() for name in names]
    assert len(named) == len(set(named)), f"a node is listed under two roles: {sorted(named)}"
    assert sorted(named) == sorted(cls.define_schema().node_id for cls in nodes.NODES)


def test_the_report_event_is_the_one_fuse_caches_sends():
    event = json.loads(js_constant("REPORT_EVENT"))
    sent = re.findall(r'send_sync\("([^"]+)"', (host.REPO_ROOT / "nodes" / "fuse.py").read_text(encoding="utf-8"))
    assert sent == [event]
