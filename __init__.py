"""DiT Cache Bridge: let one Diffusion Transformer borrow another's K/V cache at sampling time.

ComfyUI entry point. ComfyUI-specific imports happen in ``comfy_entrypoint`` so that the
framework-free ``c2c_core`` package can be imported on its own.

Every module of the pack imports ``c2c_core`` by its top-level name (as c2c_diffusers and the tools do),
so one copy of it exists per process. Loaded from ``custom_nodes``, where the pack's folder is not on
sys.path, this file registers the pack's own ``c2c_core`` folder under that name, unless a ``c2c_core``
is imported already. It does so by file location, never by adding the pack's folder to sys.path, which
would let this repository's ``nodes/`` package shadow ComfyUI's ``nodes.py``.
"""
import importlib.util
import sys
from pathlib import Path

WEB_DIRECTORY = "./web"


def _register_c2c_core() -> None:
    if "c2c_core" in sys.modules:
        return
    folder = Path(__file__).resolve().parent / "c2c_core"
    spec = importlib.util.spec_from_file_location("c2c_core", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["c2c_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["c2c_core"]
        raise


_register_c2c_core()


async def comfy_entrypoint():
    from .nodes import extension
    return extension()
