"""Session fixtures for tests that need a real ComfyUI (see tests/host.py for the harness itself).

- ``comfyui_root`` -> Path: the ComfyUI tree (COMFYUI_PATH, else .host/ComfyUI).
- ``tiny_models`` -> host.TinyModels: the tiny Wan checkpoints, made into the repo's .models/ if missing.
- ``comfy`` -> host.ComfyHost: ComfyUI importable and configured for CPU in this process.
- ``comfy_server`` -> host.ComfyServer: one headless server for the session, with this pack and the
  test nodes in its custom_nodes folder and the tiny models in its model folders.

Without a ComfyUI host these fixtures skip the test (run ``make host``); with CI set, or with a
COMFYUI_PATH that is not a ComfyUI tree, they fail it instead. The report header names the host, since
``make test`` runs the suite once per host.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import host

# Every host fixture (tiny_models, comfy, comfy_server) builds on this one.
HOST_FIXTURE = "comfyui_root"
HOST_DEPENDENT_ONLY = "DCB_HOST_DEPENDENT_ONLY"


def pytest_collection_modifyitems(config, items):
    """With DCB_HOST_DEPENDENT_ONLY=1 (make test's runs on extra hosts) only tests whose outcome can depend on
    the host run: those using a host fixture, or naming COMFYUI_PATH (a host started another way)."""
    if os.environ.get(HOST_DEPENDENT_ONLY) != "1":
        return
    sources, keep, drop = {}, [], []
    for item in items:
        path = Path(str(item.fspath))
        if path not in sources:
            sources[path] = path.read_text(encoding="utf-8", errors="replace")
        uses_host = HOST_FIXTURE in getattr(item, "fixturenames", ()) or "COMFYUI_PATH" in sources[path]
        (keep if uses_host else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    try:
        tree = host.comfyui_path()
    except host.HostNotInstalled as exc:
        return f"ComfyUI host: none ({exc})"
    return f"ComfyUI host: {host.install_host.comfyui_version(tree)} at {tree}"


@pytest.fixture(scope="session")
def comfyui_root():
    return host.require_comfyui()


@pytest.fixture(scope="session")
def tiny_models(comfyui_root) -> host.TinyModels:
    return host.ensure_tiny_models()


@pytest.fixture(scope="session")
def comfy(tiny_models, tmp_path_factory) -> host.ComfyHost:
    return host.setup_comfy_in_process(tiny_models.root, tmp_path_factory.mktemp("comfy_in_process"))


@pytest.fixture(scope="session")
def comfy_server(tiny_models, tmp_path_factory):
    with host.ComfyServer(tmp_path_factory.mktemp("comfy_server"), tiny_models.root) as server:
        yield server
