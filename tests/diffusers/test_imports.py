"""c2c_diffusers imports diffusers and c2c_core, never ComfyUI; c2c_core never imports diffusers."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow      # imports diffusers in a fresh interpreter


def test_c2c_diffusers_never_imports_comfy():
    for path in (ROOT / "c2c_diffusers").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("comfy", "comfy_api", "folder_paths", "c2c_comfy", "nodes")
                           for n in names), f"{path.name} imports {names}"


def test_importing_c2c_diffusers_loads_no_comfy_module():
    code = ("import sys, c2c_diffusers\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
