"""`pip install .` and the wheel/sdist built from this repository install the library (c2c_core, c2c_diffusers,
wan_chronoedit) and nothing of the node pack; imported from outside the checkout, the modules come from the
virtualenv (issue 20). Offline: setuptools from the venv builds (no build isolation), the clean virtualenv
sees .venv's packages through a .pth line (torch is never reinstalled), --no-deps everywhere."""
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ("c2c_core", "c2c_diffusers", "wan_chronoedit")
PACK = ("nodes", "c2c_comfy", "web", "tests")


def run(*cmd, cwd):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The working tree's tracked and new files (not the ignored ones), so a build never writes into the checkout."""
    tree = tmp_path_factory.mktemp("src") / "dit-cache-bridge"
    files = run("git", "ls-files", "-co", "--exclude-standard", "-z", cwd=ROOT).split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    return tree


@pytest.fixture(scope="module")
def dist(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, ".", cwd=source)
    run(sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})", cwd=source)
    return out


def clean_venv(path: Path) -> Path:
    """A new virtualenv that also sees .venv's packages (torch, diffusers) after its own."""
    run(sys.executable, "-m", "venv", "--without-pip", path, cwd=path.parent)
    python = path / "bin" / "python"
    own = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=path).strip())
    (own / "outer_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def install_and_import(python: Path, what, cwd: Path) -> dict:
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-build-isolation", what, cwd=cwd)
    code = ("import importlib.util, json, c2c_core, c2c_diffusers, wan_chronoedit\n"
            "from wan_chronoedit import WanChronoEditBridge, WanChronoEditConfig\n"
            "from importlib import metadata\n"
            "print(json.dumps({'files': [m.__file__ for m in (c2c_core, c2c_diffusers, wan_chronoedit)],\n"
            "  'pack': [n for n in ('nodes', 'c2c_comfy', 'comfy') if importlib.util.find_spec(n)],\n"
            "  'version': metadata.version('dit-cache-bridge'),\n"
            "  'requires': metadata.requires('dit-cache-bridge')}))")
    import json
    return json.loads(run(python, "-c", code, cwd=cwd).strip().splitlines()[-1])


def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def check_installed(found: dict, venv: Path):
    for file in found["files"]:
        assert Path(file).resolve().is_relative_to(venv.resolve()), f"{file} is not from the virtualenv"
        assert not Path(file).resolve().is_relative_to(ROOT.resolve())
    assert found["pack"] == [], "neither the node pack nor ComfyUI is importable from the library install"
    assert found["version"] == project()["version"]
    assert 'diffusers==0.42.1; extra == "diffusers"' in found["requires"]


def test_the_wheel_holds_the_library_and_not_the_node_pack(dist):
    (wheel,) = dist.glob("*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {*LIBRARY, f"dit_cache_bridge-{project()['version']}.dist-info"}
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tf:
        second = {Path(n).parts[1] for n in tf.getnames() if len(Path(n).parts) > 1}
    assert set(LIBRARY) <= second and not second & set(PACK) and "__init__.py" not in second


@pytest.mark.parametrize("kind", ["wheel", "sdist", "checkout"])
def test_installed_library_imports_from_the_virtualenv_outside_the_checkout(dist, source, tmp_path, kind):
    venv = tmp_path / "venv"
    python = clean_venv(venv)
    what = {"wheel": next(dist.glob("*.whl")), "sdist": next(dist.glob("*.tar.gz")), "checkout": f"{source}[diffusers]"}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    check_installed(install_and_import(python, what[kind], outside), venv)
