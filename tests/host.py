"""The shared test harness: a real ComfyUI, in-process or as a headless server, plus tiny models.

In-process::

    host = setup_comfy_in_process(models_root, tmp_dir)   # once per process (the ``comfy`` fixture)
    import comfy.sd, nodes                                # ComfyUI's modules, never this repo's
    pack = load_pack()                                    # this repo as the package ``dit_cache_bridge``

As a server (what a user's ComfyUI does with the pack installed in custom_nodes)::

    with ComfyServer(tmp_dir, models_root) as server:
        prompt_id = server.post_prompt(api_graph)
        entry = server.wait(prompt_id, timeout=120)

The machinery lives in tools/ (``comfy_host.py`` boots ComfyUI in-process, ``comfy_server.py`` starts
a server, ``make_tiny_models.py`` makes and names the tiny models, ``install_host.py`` finds the host);
this module puts tools/ on sys.path, so tests import those modules by the names the tools use, and adds
what only the tests need: the test nodes in every server, skip-or-fail when no host is installed,
copies of a ComfyUI tree with edited files.

Conditioning without a text encoder: ``wan_conditioning`` and ``i2v_conditioning`` (in-process) and
the test nodes ``DCBTestWanConditioning`` / ``DCBTestWanImageConditioning`` (in the server), all
from ``comfy_test_nodes.py``.

Name clash to keep in mind: this repo has a package ``nodes/`` and ComfyUI has a module
``nodes.py``. ComfyUI's folder must come first on sys.path, and the pack's own code only ever
imports its ``nodes`` relatively (``from .nodes import …``).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# One module, whether imported as ``host`` (tests/ is on sys.path) or as ``tests.host``: the in-process
# setup below is process-wide state and must not exist twice.
for _alias in ("host", "tests.host"):
    sys.modules.setdefault(_alias, sys.modules[__name__])

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS_DIR = REPO_ROOT / "tools"
# tools/ modules import each other by file name; the tests import them by the same names (one copy each).
if str(TOOLS_DIR) not in sys.path:
    sys.path.append(str(TOOLS_DIR))

import comfy_host  # noqa: E402
import comfy_server  # noqa: E402
import install_host  # noqa: E402
from comfy_host import PACK_NAME, load_pack  # noqa: E402,F401  (the harness's names for the tests)
from comfy_server import PromptFailed, PromptRejected, free_port  # noqa: E402,F401
from comfy_test_nodes import (  # noqa: E402,F401  (re-exported for the tests)
    clip_vision_features,
    i2v_conditioning,
    wan_conditioning,
    wan_text_context,
)
from make_tiny_models import (  # noqa: E402,F401
    I2V,
    T2V_A,
    T2V_B,
    T2V_WIDE,
    TI2V,
    TINY_MODEL_FILES,
    TinyModels,
    ensure_tiny_models,
)

TEST_NODES_FILE = Path(__file__).resolve().with_name("comfy_test_nodes.py")
TEST_NODES_LINK = "dit_cache_bridge_test_nodes.py"
HostNotInstalled = install_host.HostNotInstalled


def _load_tool(name: str):
    """tools/<name>.py as the module ``name`` (the name the tools themselves import it by)."""
    return importlib.import_module(name)


def comfyui_path() -> Path:
    """The ComfyUI tree under test: ``COMFYUI_PATH`` if set, else ``.host/ComfyUI`` (``make host``).

    Raises HostNotInstalled when there is neither.
    """
    return install_host.comfyui_path()


def require_comfyui() -> Path:
    """comfyui_path(), or skip the calling test when no host is installed (fail under CI=true).

    A COMFYUI_PATH that is set but is no ComfyUI tree always fails: that is a broken setup, not a
    missing optional dependency.
    """
    import pytest

    try:
        return comfyui_path()
    except HostNotInstalled as exc:
        if os.environ.get("COMFYUI_PATH") or os.environ.get("CI"):
            pytest.fail(f"ComfyUI host required: {exc}", pytrace=False)
        pytest.skip(f"no ComfyUI host: {exc}")


def edited_copy(tree: Path, dest: Path, edits: dict) -> Path:
    """A copy of a ComfyUI tree made of symlinks, except ``main.py`` and the files in ``edits``
    (``{"comfy/x.py": text -> text}``), which are rewritten, and the folders above them.

    ``main.py`` is a real file so that the server's sys.path starts at the copy (Python resolves a
    symlinked script to its target's folder); ``__pycache__`` folders are not linked, so compiled
    edited files never land in the original tree.
    """
    edits = {"main.py": lambda text: text, **edits}
    dest.mkdir(parents=True)

    def fill(src: Path, dst: Path, rel: tuple) -> None:
        below = {Path(r).parts[len(rel)] for r in edits if Path(r).parts[:len(rel)] == rel}
        for child in src.iterdir():
            if child.name == "__pycache__":
                continue
            if child.name not in below:
                (dst / child.name).symlink_to(child, target_is_directory=child.is_dir())
            elif child.is_dir():
                (dst / child.name).mkdir()
                fill(child, dst / child.name, rel + (child.name,))
            else:
                edit = edits["/".join(rel + (child.name,))]
                (dst / child.name).write_text(edit(child.read_text(encoding="utf-8")), encoding="utf-8")

    fill(Path(tree), Path(dest), ())
    return Path(dest)


# --------------------------------------------------------------------------------------------------
# In-process ComfyUI
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ComfyHost:
    """What setup_comfy_in_process configured."""

    path: Path
    models_root: Path
    input_dir: Path
    output_dir: Path
    temp_dir: Path
    user_dir: Path


_in_process: ComfyHost | None = None


def setup_comfy_in_process(models_root: Path, tmp_dir: Path) -> ComfyHost:
    """ComfyUI booted in this process on the CPU, deterministic (``comfy_host.boot``), with its folders under
    ``tmp_dir`` and ``models_root`` as a models root (``comfy_host.use_folders``); idempotent."""
    global _in_process
    if _in_process is None:
        tree = comfy_host.boot(comfyui_path(), cpu=True, deterministic=True)
        dirs = comfy_host.use_folders(Path(tmp_dir), models_root)
        _in_process = ComfyHost(tree, Path(models_root).resolve(), dirs["input"], dirs["output"], dirs["temp"],
                                dirs["user"])
    return _in_process


def core_node(module: str, name: str):
    """A ComfyUI node class from ``comfy_extras`` (or ``nodes``), or skip the test on a host that lacks it."""
    import importlib

    import pytest

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.skip(f"this ComfyUI has no {module}.{name}")


def run_node(cls, *args) -> tuple:
    """A node's outputs as a tuple, whether the host made it a V3 node (``execute``) or a V1 node (``FUNCTION``)."""
    if hasattr(cls, "define_schema"):
        return tuple(cls.execute(*args).args)
    return tuple(getattr(cls(), cls.FUNCTION)(*args))


def load_builtin_extra_nodes() -> None:
    """Register comfy_extras' nodes (ModelSamplingSD3, EmptyHunyuanLatentVideo …) in nodes.NODE_CLASS_MAPPINGS."""
    import asyncio

    import nodes

    if "ModelSamplingSD3" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_builtin_extra_nodes())


# --------------------------------------------------------------------------------------------------
# ComfyUI as a headless server
# --------------------------------------------------------------------------------------------------

class ComfyServer(comfy_server.ComfyServer):
    """tools/comfy_server.py's server with the test nodes linked into its custom_nodes folder
    (``install_test_nodes=False`` leaves them out)."""

    def __init__(self, base_dir: Path, models_root: Path, *, install_test_nodes: bool = True, **kwargs):
        nodes = {TEST_NODES_LINK: TEST_NODES_FILE} if install_test_nodes else {}
        super().__init__(base_dir, models_root, custom_nodes={**nodes, **kwargs.pop("custom_nodes", {})}, **kwargs)
