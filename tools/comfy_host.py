"""ComfyUI inside this Python process: the one way the tools and the tests boot it.

ComfyUI reads its settings once, so the order matters:

1. its tree, then its site folder (packages a newer host pins at other versions, ``install_host.py``),
   go first on sys.path: ahead of this repository, whose ``nodes/`` package would shadow ComfyUI's
   ``nodes.py``;
2. ``comfy.cli_args.args`` gets the device settings before ``comfy.model_management`` is first imported,
   since that import picks the device;
3. the pack is imported from this repository as the package ``dit_cache_bridge``, as ComfyUI's
   custom_nodes loader does (:func:`load_pack`).

    import comfy_host
    comfy_host.boot(cpu=True)                       # COMFYUI_PATH, else .host/ComfyUI
    comfy_host.use_folders(tmp_dir, models_root)    # optional: its own input/output/temp/user folders
    pack = comfy_host.load_pack()

Tools import this module by its file name (tools/ is a script's sys.path[0]); tests reach it through
tests/host.py, which puts tools/ on sys.path. Nothing here imports ComfyUI until :func:`boot` runs.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import install_host

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "dit_cache_bridge"
# Folders an extra_model_paths yaml names under a models root (add more here when the pack grows a folder).
MODEL_FOLDERS = ("diffusion_models", "checkpoints", "vae", "text_encoders", "clip_vision", "loras", "c2c_projectors")

_booted: dict | None = None     # the tree and settings of the boot that ran in this process


def put_first_on_sys_path(tree: Path) -> None:
    """ComfyUI's tree, then its site folder, ahead of everything; refuses when a ``nodes`` other than
    ComfyUI's is already imported (this repository's ``nodes/`` package, imported as top-level by mistake)."""
    tree = Path(tree).resolve()
    entries = install_host.host_paths(tree)
    for entry in entries:
        while entry in sys.path:
            sys.path.remove(entry)
    sys.path[:0] = entries
    loaded = sys.modules.get("nodes")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() != tree / "nodes.py":
        raise RuntimeError(
            f"'nodes' is already imported from {getattr(loaded, '__file__', loaded)!r}, not ComfyUI's "
            f"{tree / 'nodes.py'}: something imported this repository's nodes/ package as a top-level module. "
            "Import the pack through comfy_host.load_pack() (package 'dit_cache_bridge') instead."
        )


def boot(tree: Path | None = None, *, cpu: bool = True, deterministic: bool = False,
         cuda_device: int | None = None) -> Path:
    """Make ComfyUI importable and configured in this process; returns its tree.

    ``tree`` defaults to ``install_host.comfyui_path()`` (COMFYUI_PATH, else the pinned .host/ComfyUI).
    ``cpu`` and ``deterministic`` become ComfyUI's ``--cpu`` and ``--deterministic``; ``cuda_device``
    (a torchrun local rank) is made the current GPU first. A second call with the same tree and settings
    returns at once; other settings raise, since ComfyUI has chosen its device by then.
    """
    global _booted
    tree = Path(tree).resolve() if tree is not None else install_host.comfyui_path()
    wanted = {"tree": tree, "cpu": bool(cpu), "deterministic": bool(deterministic), "cuda_device": cuda_device}
    if _booted is not None:
        if _booted != wanted:
            raise RuntimeError(f"ComfyUI was booted in this process with {_booted}; cannot boot it again with {wanted}.")
        return tree
    put_first_on_sys_path(tree)

    import comfy.cli_args

    args = comfy.cli_args.args
    if "comfy.model_management" in sys.modules and (args.cpu, args.deterministic) != (bool(cpu), bool(deterministic)):
        raise RuntimeError("comfy.model_management was imported before comfy_host.boot() set its device; boot first.")
    args.cpu = bool(cpu)
    args.deterministic = bool(deterministic)
    if not cpu and cuda_device is not None:
        import torch

        torch.cuda.set_device(cuda_device)
    import comfy.model_management  # noqa: F401  (picks the device from the args now)

    _booted = wanted
    return tree


def write_extra_model_paths(yaml_path: Path, models_root: Path, custom_nodes: Path | None = None) -> Path:
    """An extra_model_paths yaml naming ``models_root`` as a models root (and a custom_nodes folder)."""
    lines = ["dit_cache_bridge_tests:", f"    base_path: {Path(models_root).resolve()}"]
    lines += [f"    {folder}: {folder}" for folder in MODEL_FOLDERS]
    if custom_nodes is not None:
        lines.append(f"    custom_nodes: {Path(custom_nodes).resolve()}")
    yaml_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return yaml_path


def use_folders(base_dir: Path, models_root: Path) -> dict[str, Path]:
    """Give the booted ComfyUI input/, output/, temp/ and user/ under ``base_dir`` and ``models_root`` as a
    models root (through the yaml loader the server uses); returns the folders by name."""
    if _booted is None:
        raise RuntimeError("call comfy_host.boot() before use_folders()")
    import folder_paths
    import utils.extra_config  # before nodes: nodes.py puts ComfyUI/comfy (with its utils.py) at sys.path[0]
    import nodes

    if Path(nodes.__file__).resolve() != _booted["tree"] / "nodes.py":
        raise RuntimeError(f"'import nodes' gave {nodes.__file__}, expected ComfyUI's {_booted['tree'] / 'nodes.py'}")
    base_dir = Path(base_dir)
    folders = {name: base_dir / name for name in ("input", "output", "temp", "user")}
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        getattr(folder_paths, f"set_{name}_directory")(str(folder))
    utils.extra_config.load_extra_path_config(str(write_extra_model_paths(base_dir / "extra_model_paths.yaml",
                                                                          models_root)))
    return folders


def load_pack():
    """This repository as the package ``dit_cache_bridge``, as ComfyUI's custom_nodes loader imports it.

    Needs :func:`boot` first, since the pack imports ComfyUI's modules.
    """
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    if _booted is None:
        raise RuntimeError("call comfy_host.boot() (in the tests: the 'comfy' fixture) before load_pack()")
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return module
