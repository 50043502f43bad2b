"""c2c_core stays framework-free, works as a sub-package, never unpickles, and its modules import each other
without a cycle."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "c2c_core"
ALLOWED_THIRD_PARTY = {"torch", "einops", "safetensors", "greenlet"}   # greenlet: optional, lockstep.py

pytestmark = pytest.mark.slow      # fresh interpreters


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


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
    for path in _sources():
        for module, level in _imports(path):
            if level:  # relative import inside the package
                continue
            assert module in ALLOWED_THIRD_PARTY or module in sys.stdlib_module_names or module == "__future__", (
                f"{path.name} imports {module!r}"
            )


def test_package_uses_only_relative_imports_of_itself():
    for path in _sources():
        assert all(module != "c2c_core" for module, level in _imports(path) if not level), path.name


def test_package_never_unpickles():
    for path in _sources():
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


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path, modules: set[str], name: str | None = None) -> set[str]:
    """The c2c_core modules ``path`` (module ``name``, by default its own) imports: relative imports at any
    depth of the file, since a lazy import inside a function closes a cycle as surely as one at the top."""
    name = name or _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [node.module or ""]).strip(".")
            named = {f"{base}.{alias.name}" for alias in node.names} & modules
            found |= named or {base}
    return found & modules


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph is a DAG."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_cycle_finder_finds_a_lazy_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_import_reader_resolves_relative_imports_at_any_depth(tmp_path):
    modules = {"c2c_core.arch", "c2c_core.align", "c2c_core.recording", "c2c_core.recording.store"}
    fake = tmp_path / "replay.py"
    fake.write_text("from ..arch import ArchTag\ndef f():\n    from .store import DiskStore\n    from .. import align\n")
    assert internal_imports(fake, modules, "c2c_core.recording.replay") == {
        "c2c_core.arch", "c2c_core.recording.store", "c2c_core.align"}


def test_c2c_core_modules_import_each_other_without_a_cycle():
    modules = {_module(path) for path in _sources()}
    graph = {_module(path): internal_imports(path, modules) - {_module(path)} for path in _sources()}
    assert "c2c_core.signature" in graph and "c2c_core.arch" in graph["c2c_core.signature"]
    cycle = find_cycle(graph)
    assert not cycle, "c2c_core import cycle: " + " -> ".join(cycle)
