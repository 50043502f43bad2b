"""One import path for c2c_core: the ComfyUI pack, c2c_diffusers and the tools share one module object.

Every module imports ``c2c_core`` by its top-level name; loaded from ``custom_nodes`` (where the pack's
folder is not on sys.path) the pack's ``__init__.py`` registers its own ``c2c_core`` folder under that
name, by file location, without touching sys.path (which would let the pack's ``nodes/`` shadow
ComfyUI's ``nodes.py``).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import host
from bridge_helpers import pack_nodes


def test_the_pack_and_c2c_diffusers_share_one_c2c_core(comfy):
    pytest.importorskip("diffusers")
    pack_nodes()
    import c2c_diffusers.bridge

    import c2c_core
    import c2c_core.runtime
    copies = sorted(name for name in sys.modules if name.endswith(".c2c_core") or ".c2c_core." in name)
    assert copies == [], f"a second c2c_core was imported: {copies}"
    compat = sys.modules[f"{host.PACK_NAME}.c2c_comfy.compat"]
    assert compat.ModelSignature is c2c_core.ModelSignature
    assert sys.modules[f"{host.PACK_NAME}.c2c_comfy.bridge"].FusionRun is c2c_core.runtime.FusionRun
    assert c2c_diffusers.bridge.FusionRun is c2c_core.runtime.FusionRun


def test_loaded_from_custom_nodes_the_pack_registers_its_own_c2c_core_without_a_sys_path_change(tmp_path):
    """A fresh interpreter whose sys.path does not hold the repository, loading the pack as ComfyUI does."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        from pathlib import Path
        root = Path({str(host.REPO_ROOT)!r})
        assert "c2c_core" not in sys.modules
        path_before = list(sys.path)
        spec = importlib.util.spec_from_file_location("{host.PACK_NAME}", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["{host.PACK_NAME}"] = pack
        spec.loader.exec_module(pack)
        import c2c_core, c2c_core.runtime
        assert Path(c2c_core.__file__).resolve() == root / "c2c_core" / "__init__.py", c2c_core.__file__
        assert sys.path == path_before, "the pack changed sys.path"
        assert "nodes" not in sys.modules and "{host.PACK_NAME}.c2c_core" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_an_imported_c2c_core_is_kept(tmp_path):
    """A c2c_core imported before the pack (a pip-installed library, the tests) is the one the pack uses."""
    fake = tmp_path / "site" / "c2c_core"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARK = 'installed'\n")
    code = textwrap.dedent(f"""
        import importlib.util, sys
        import c2c_core
        spec = importlib.util.spec_from_file_location("{host.PACK_NAME}", {str(host.REPO_ROOT / "__init__.py")!r},
                                                      submodule_search_locations=[{str(host.REPO_ROOT)!r}])
        pack = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(pack)
        print(sys.modules["c2c_core"].MARK)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0 and out.stdout.strip() == "installed", out.stderr
