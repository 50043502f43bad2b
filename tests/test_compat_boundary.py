"""Exactly one module touches ComfyUI internals: c2c_comfy/compat.py.

The rest of the pack (c2c_comfy/, nodes/, the root __init__) may use only the public API that
docs/architecture.md lists; everything else goes through compat. Checked on the source (imports and
``comfy.<module>`` attribute chains), so a new internal fails here before it fails on some host.
"""
from __future__ import annotations

import ast
from pathlib import Path

import host

ROOT = host.REPO_ROOT
# Public ComfyUI modules custom nodes are expected to use, as docs/architecture.md names them.
PUBLIC = {"comfy_api.latest": "comfy_api.latest", "folder_paths": "folder_paths",
          "comfy.patcher_extension": "comfy.patcher_extension", "server": "server.PromptServer"}
# Top-level names of ComfyUI's own modules (its tree's root); ``nodes`` is ComfyUI's nodes.py.
# ComfyUI internals reached through an object rather than an import.
INTERNAL_ATTRS = {"current_patcher", "current_loaded_models", "EXTRA_RESERVED_VRAM", "in_training"}
COMFY_TOP = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfy_config", "folder_paths", "nodes",
             "node_helpers", "latent_preview", "execution", "server", "comfyui_version", "app", "utils"}


def pack_files() -> list[Path]:
    files = [ROOT / "__init__.py", *sorted((ROOT / "nodes").glob("*.py")), *sorted((ROOT / "c2c_comfy").glob("*.py"))]
    return [p for p in files if p.name != "compat.py" or p.parent.name != "c2c_comfy"]


def comfy_uses(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every absolute import of a ComfyUI module, every ``comfy.<module>`` chain and every
    use of an internal attribute (``model.current_patcher``, also as a ``getattr`` string)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] in COMFY_TOP]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in COMFY_TOP:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "comfy":
            found.append((node.lineno, f"comfy.{node.attr}"))
        elif isinstance(node, ast.Attribute) and node.attr in INTERNAL_ATTRS and \
                not (isinstance(node.value, ast.Name) and node.value.id == "compat"):
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Constant) and node.value in INTERNAL_ATTRS:
            found.append((node.lineno, f"'{node.value}'"))
    return found


def test_the_public_api_list_is_the_one_in_docs_architecture():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name in PUBLIC.values():
        assert f"`{name}`" in text, f"docs/architecture.md no longer lists {name}; update PUBLIC here with it"


def test_only_compat_touches_comfyui_internals():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in pack_files()
                 for line, name in comfy_uses(path) if name not in PUBLIC]
    assert not offenders, ("ComfyUI internals used outside c2c_comfy/compat.py (add a function there and call "
                           "it):\n" + "\n".join(offenders))


def test_the_check_sees_an_internal(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import comfy.patcher_extension\nimport nodes as comfy_nodes\n"
                      "def f(model):\n    import comfy.samplers\n    model.current_patcher = None\n"
                      "    return comfy.model_management.x, getattr(model, 'current_patcher')\n")
    assert {name for _, name in comfy_uses(sample)} - set(PUBLIC) == {"nodes", "comfy.samplers", "comfy.model_management",
                                                                      ".current_patcher", "'current_patcher'"}
