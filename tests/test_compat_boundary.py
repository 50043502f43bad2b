"""Exactly one module touches ComfyUI internals: c2c_comfy/compat.py.

The rest of the pack (c2c_comfy/, nodes/, the root __init__) may use only the public API that
docs/architecture.md lists; everything else goes through compat. Checked on the source (imports,
``comfy.<module>`` attribute chains, and internals reached through an object: ``model.get_dtype()``,
``options["model_function_wrapper"]``), so a new internal fails here before it fails on some host.
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
# ComfyUI internals reached through an object rather than an import: caught as an attribute
# (``model.get_dtype()``) and as a string (``options["model_function_wrapper"]``, ``getattr(p, "pre_run")``).
INTERNAL_ATTRS = {
    "current_patcher", "current_loaded_models", "EXTRA_RESERVED_VRAM", "in_training",
    # the model's compute dtype (BaseModel.manual_cast_dtype / get_dtype)
    "manual_cast_dtype", "get_dtype",
    # ModelPatcher: identity, weights, lifecycle, hooks
    "patches_uuid", "clone_has_same_weights", "add_weight_wrapper", "pre_run",
    "prepare_hook_patches_current_keyframe", "apply_hooks",
    # calc_cond_batch's machinery (comfy.samplers), the patcher_extension helper it merges options with
    "merge_nested_dicts", "get_control", "model_function_wrapper",
}
# Names too common to match as strings; caught as an attribute only. Every ``.cleanup`` in the pack is a
# ModelPatcher's today; one on another object (a TemporaryDirectory) would have to be named here to pass.
INTERNAL_METHODS = {"cleanup"}
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
        elif isinstance(node, ast.Attribute) and node.attr in INTERNAL_ATTRS | INTERNAL_METHODS and \
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


def test_the_check_sees_every_internal_attribute_and_string(tmp_path):
    sample = tmp_path / "sample.py"
    lines = [f"x.{name}" for name in sorted(INTERNAL_ATTRS | INTERNAL_METHODS)]
    lines += [f"o[{name!r}]" for name in sorted(INTERNAL_ATTRS)]
    lines += [f"compat.{name}" for name in sorted(INTERNAL_ATTRS | INTERNAL_METHODS)]        # the door itself: allowed
    sample.write_text("def f(x, o, compat):\n" + "".join(f"    {line}\n" for line in lines))
    found = {name for _, name in comfy_uses(sample)}
    assert found == {f".{name}" for name in INTERNAL_ATTRS | INTERNAL_METHODS} | {f"'{name}'" for name in INTERNAL_ATTRS}


def test_the_check_sees_the_patterns_the_pack_used(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(model, patcher, a, b, control, options, hooks):\n"
        "    dtype = model.manual_cast_dtype or model.get_dtype()\n"
        "    same = a.patches_uuid == b.patches_uuid or a.clone_has_same_weights(b)\n"
        "    patcher.pre_run()\n    patcher.prepare_hook_patches_current_keyframe(0, hooks, options)\n"
        "    merged = comfy.patcher_extension.merge_nested_dicts(patcher.apply_hooks(hooks=hooks), options)\n"
        "    c = control.get_control(1, 2, 3, 4, options)\n"
        "    if 'model_function_wrapper' in options:\n        options['model_function_wrapper'](1, {})\n"
        "    patcher.add_weight_wrapper('k', None)\n    patcher.cleanup()\n")
    found = {name for _, name in comfy_uses(sample)} - set(PUBLIC)
    assert found == {".manual_cast_dtype", ".get_dtype", ".patches_uuid", ".clone_has_same_weights", ".pre_run",
                     ".prepare_hook_patches_current_keyframe", ".merge_nested_dicts", ".apply_hooks", ".get_control",
                     "'model_function_wrapper'", ".add_weight_wrapper", ".cleanup"}


def test_generic_method_names_are_not_matched_as_strings(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("LOG = 'cleanup'\ndef cleanup():\n    return 'cleanup'\n")
    assert comfy_uses(sample) == []
