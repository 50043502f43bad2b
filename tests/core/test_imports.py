"""c2c_core stays framework-free, works as a sub-package, and never unpickles."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "c2c_core"
ALLOWED_THIRD_PARTY = {"torch", "einops", "safetensors", "greenlet"}   # greenlet: optional, lockstep.py


def _imports(path: Path) -> list[tuple[str, int]]:
    """(top-level module, level) of every import statement in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(((node.module or "").split(".")[0], node.level))
    return found


def test_importing_c2c_core_loads_neither_comfy_nor_diffusers():
    code = (
        "import sys, c2c_core\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0].startswith(('comfy', 'diffusers')))\n"
        "print(repr(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_package_imports_only_torch_einops_safetensors_and_stdlib():
    for path in PACKAGE.glob("*.py"):
        for module, level in _imports(path):
            if level:  # relative import inside the package
                continue
            assert module in ALLOWED_THIRD_PARTY or module in sys.stdlib_module_names or module == "__future__", (
                f"{path.name} imports {module!r}"
            )


def test_package_uses_only_relative_imports_of_itself():
    for path in PACKAGE.glob("*.py"):
        assert all(module != "c2c_core" for module, level in _imports(path) if not level), path.name


def test_package_never_unpickles():
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for module, _ in _imports(path):
            assert module not in {"pickle", "dill", "joblib", "marshal", "shelve"}, f"{path.name} imports {module}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "load":
                base = node.value
                assert not (isinstance(base, ast.Name) and base.id == "torch"), f"{path.name} calls torch.load"


def test_package_works_as_a_subpackage_of_the_node_pack(tmp_path):
    pack = tmp_path / "somepack"
    pack.mkdir()
    (pack / "__init__.py").write_text("")
    shutil.copytree(PACKAGE, pack / "c2c_core", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import sys, somepack.c2c_core as core\n"
        "sig = core.ModelSignature(2, 1, 8)\n"
        "core.ProjectorBank.build('c2c', sig, sig, [0, 1], hidden_dim=4)\n"
        "assert 'c2c_core' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
