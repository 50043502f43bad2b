"""The Comfy registry package (`comfy node pack` / `comfy node publish`) holds what a ComfyUI user needs, and
the repository passes the checks `comfy node validate` runs before a publish.

comfy-cli packs the git-tracked files minus the paths `.comfyignore` matches (gitignore syntax), plus
pyproject's `[tool.comfy] includes`; git itself applies the same syntax here (`git ls-files -i --exclude-from`),
so no packing tool is needed. `comfy node validate` runs ruff's S102 (exec), S307 (eval) and E702 (statements
joined by `;`) over every Python file of the checkout, tests included; the same rules are checked here with
Python's own ast and tokenize.
"""
import ast
import io
import subprocess
import tokenize
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_TOP = {
    "__init__.py", "nodes", "c2c_core", "c2c_comfy", "web", "workflows", "locales", "docs", "tools",
    "requirements.txt", "pyproject.toml", "README.md", "LICENSE", "BENCHMARKS.md", "SECURITY.md",
}
# The user-facing command-line tools (docs/training.md, docs/bundle_format.md) and the modules they import.
SHIPPED_TOOLS = {"train_projector.py", "retag_projector.py", "comfy_host.py", "install_host.py"}


def git_files(*args: str) -> set[str]:
    out = subprocess.run(["git", "ls-files", "-z", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(filter(None, out.stdout.split("\0")))


@pytest.fixture(scope="module")
def tracked() -> set[str]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: comfy node pack packs git-tracked files")
    files = git_files()
    assert ".comfyignore" in files, ".comfyignore must be committed: comfy node pack reads the checkout's copy"
    return files


@pytest.fixture(scope="module")
def shipped(tracked) -> set[str]:
    ignored = git_files("--cached", "--ignored", "--exclude-from=.comfyignore")
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["comfy"]["includes"]
    assert includes == [], "[tool.comfy] includes override .comfyignore: account for them here"
    return tracked - ignored


def test_the_package_holds_the_pack_its_docs_and_its_user_tools_and_nothing_of_development(shipped):
    assert {path.split("/")[0] for path in shipped} == SHIPPED_TOP
    assert {path.split("/", 1)[1] for path in shipped if path.startswith("tools/")} == SHIPPED_TOOLS
    for kept in ("nodes/__init__.py", "c2c_core/fusion.py", "c2c_comfy/compat.py", "web/js", "locales/en",
                 "workflows/wan21_t2v_with_chronoedit_sharer.json", "docs/install.md"):
        assert any(path == kept or path.startswith(kept + "/") for path in shipped), kept


def _module_files(base: Path, dotted: str) -> list[Path]:
    """The files a module name can resolve to below ``base`` (a module file or a package's __init__)."""
    target = base.joinpath(*dotted.split(".")) if dotted else base
    return [target.with_suffix(".py"), target / "__init__.py"]


def _imports(path: Path):
    """(base folder, dotted module) for each import of the file that can name a file of this repository."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield None, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                yield base, node.module or ""
                for alias in node.names:           # `from . import x`: x may be a module
                    yield base, f"{node.module}.{alias.name}" if node.module else alias.name
            else:
                yield None, node.module


def test_every_module_a_shipped_file_imports_from_this_repository_ships_too(tracked, shipped):
    """A file the package left out would be an ImportError on a user's machine (e.g. c2c_comfy importing
    c2c_diffusers, or a shipped tool importing a tool that stays behind)."""
    missing = []
    for name in sorted(p for p in shipped if p.endswith(".py")):
        path = ROOT / name
        # An absolute import resolves from the repository root or, for tools, from tools/ (they put it on sys.path).
        roots = [ROOT] + ([ROOT / "tools"] if name.startswith("tools/") else [])
        for base, dotted in _imports(path):
            candidates = _module_files(base, dotted) if base is not None else [
                f for root in roots for f in _module_files(root, dotted.split(".")[0])]
            found = [str(c.relative_to(ROOT)) for c in candidates if c.is_relative_to(ROOT)
                     and str(c.relative_to(ROOT)) in tracked]
            if found and not any(f in shipped for f in found):
                missing.append(f"{name} imports {dotted or '.'} ({found[0]})")
    assert not missing, "shipped files import modules the package leaves out:\n" + "\n".join(missing)


def validate_findings(source: str, name: str) -> list[str]:
    """What ruff's S102, S307 and E702 (the rules of `comfy node validate`) would report in one file."""
    findings = []
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exec", "eval"):
            findings.append(f"{name}:{node.lineno}: {node.func.id}()")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.OP and token.string == ";":
            findings.append(f"{name}:{token.start[0]}: statements joined by ';'")
    return findings


def test_validate_findings_are_found():
    """The checker below can fail: it reports each of the three patterns."""
    source = "exec(compile('1', 'x', 'exec'))\nvalue = eval('1')\na = 1; b = 2\nmodel.eval()\ntext = 'a; b'\n"
    assert validate_findings(source, "x.py") == ["x.py:1: exec()", "x.py:2: eval()",
                                                 "x.py:3: statements joined by ';'"]


def test_comfy_node_validate_finds_no_exec_eval_or_joined_statements(tracked):
    findings = []
    for name in sorted(p for p in tracked if p.endswith(".py")):
        findings += validate_findings((ROOT / name).read_text(encoding="utf-8"), name)
    assert not findings, "comfy node validate will refuse these:\n" + "\n".join(findings)
