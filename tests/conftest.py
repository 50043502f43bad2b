"""Session fixtures for tests that need a real ComfyUI (see tests/host.py for the harness itself), and the
markers that sort the suite (docs/testing.md).

- ``comfyui_root`` -> Path: the ComfyUI tree (COMFYUI_PATH, else .host/ComfyUI).
- ``tiny_models`` -> host.TinyModels: the tiny Wan checkpoints, made into the repo's .models/ if missing.
- ``comfy`` -> host.ComfyHost: ComfyUI importable and configured for CPU in this process.
- ``comfy_server`` -> host.ComfyServer: one headless server for the session, with this pack and the
  test nodes in its custom_nodes folder and the tiny models in its model folders.

Without a ComfyUI host these fixtures skip the test (run ``make host``); with CI set, or with a
COMFYUI_PATH that is not a ComfyUI tree, they fail it instead. The report header names the host, since
``make test`` runs the suite once per host.

Markers (registered in pyproject.toml; unknown ones are an error):
- ``host``: the outcome can depend on the ComfyUI host, so ``make test`` runs it on every host (``-m host``
  after the pinned one). Added here to every test that uses a host fixture; a test that starts a host
  another way carries the marker itself.
- ``pinned_host``: uses a host fixture, but runs on the pinned host only: tests/newer_hosts.py names each such
  test and why the host cannot change its outcome (it gets this marker instead of ``host``).
- ``server``: runs a ComfyUI server. Added here to users of ``comfy_server``; a module with its own server
  carries it.
- ``browser``, ``slow``, ``smoke``: see pyproject.toml; ``make test-quick`` runs ``not host or smoke``.

``make test`` runs two pytest-xdist workers with ``--dist loadfile``: a module never leaves its worker, so
its module fixtures are built once (each worker that runs a ``comfy_server`` test starts its own session
server). Not ``loadgroup``: pytest-xdist 3.8 marks groups by setting ``item._nodeid``, which pytest 9.2 no
longer reads, so every test would become its own unit (docs/testing.md).
"""

from __future__ import annotations

import os

import pytest

import host
import newer_hosts

# Every host fixture (tiny_models, comfy, comfy_server) builds on this one.
HOST_FIXTURE = "comfyui_root"
DEFAULT_SLOW_SECONDS = 10
SERVER_FIXTURE = "comfy_server"


def pytest_configure(config):
    """Under xdist each worker gets one torch thread (and so do the servers and CLIs it starts): two workers
    on two cores, each with its own OpenMP pool, would fight over them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch
        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)      # before -m deselects
def pytest_collection_modifyitems(config, items):
    """Add the derived markers and put the slow modules first: xdist hands out whole modules in this order
    (``--no-loadscope-reorder``), and with two workers a long module started last would run alone."""
    pinned = newer_hosts.PinnedHostOnly()
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if HOST_FIXTURE in fixtures and item.get_closest_marker("host") is None:
            item.add_marker(pytest.mark.pinned_host if pinned.claims(item) else pytest.mark.host)
        if SERVER_FIXTURE in fixtures and item.get_closest_marker("server") is None:
            item.add_marker(pytest.mark.server)
        if item.get_closest_marker("server") is not None and not item.get_closest_marker("host") \
                and not item.get_closest_marker("pinned_host"):
            raise pytest.UsageError(f"{item.nodeid}: a server test must also be marked host (or pinned_host)")
    if not config.option.file_or_dir:       # the whole suite was collected: every entry must still match
        try:
            pinned.check()
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
    order = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (-slow_seconds(item), order[id(item)]))


def slow_seconds(item) -> float:
    """The module's cost for ordering: ``slow(seconds=…)`` where given (the longest modules go first, so that
    neither worker runs one alone at the end), else DEFAULT_SLOW_SECONDS for ``slow``, else 0."""
    mark = item.get_closest_marker("slow")
    return 0.0 if mark is None else float(mark.kwargs.get("seconds", DEFAULT_SLOW_SECONDS))


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
