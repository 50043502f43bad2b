"""tools/ stands apart from tests/: no tool imports a test module or puts tests/ on sys.path.

The tests may import the tools (tests/host.py builds the harness on tools/comfy_host.py, comfy_server.py
and make_tiny_models.py); the other way round, `make demo` or a training run would depend on test code.
A tool may still name a file under tests/ as data (the demo links the stand-in conditioning nodes into
its server's custom_nodes).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_MODULES = {path.stem for path in (ROOT / "tests").glob("*.py")} | {"tests"}


def reaches_into_tests(path: Path) -> list[tuple[int, str]]:
    """(line, what) of every import of a tests/ module and every sys.path change that names "tests"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] in TEST_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in TEST_MODULES:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and "sys.path" in ast.unparse(node.func) and any(
                isinstance(n, ast.Constant) and n.value == "tests" for n in ast.walk(node)):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_tool_imports_a_test_module():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in sorted((ROOT / "tools").glob("*.py"))
                 for line, what in reaches_into_tests(path)]
    assert not offenders, "tools/ reaching into tests/ (move what it needs into tools/):\n" + "\n".join(offenders)


def test_the_check_sees_a_tool_importing_tests(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import sys\nimport host\nfrom comfy_test_nodes import wan_conditioning\n"
                      "sys.path.insert(0, str(ROOT / 'tests'))\nDATA = ROOT / 'tests' / 'comfy_test_nodes.py'\n")
    assert [line for line, _ in reaches_into_tests(sample)] == [2, 3, 4]
