"""requirements.txt and pyproject's `dependencies` stay in step. ComfyUI Manager and comfy-cli install a node
pack's requirements.txt, pip installs the library from pyproject.toml: the first lists what ComfyUI does not
install itself, the second adds what the library imports that ComfyUI does install (never pinning torch)."""
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
# What ComfyUI installs itself, so the pack's requirements.txt leaves it out (never let a node pack pick
# ComfyUI's torch).
COMFYUI_PROVIDES = {"torch", "einops", "safetensors", "numpy"}


def pack_requirements() -> set[Requirement]:
    """requirements.txt's lines as the Manager's pip reads them: requirements only, no pip options."""
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    return {Requirement(line) for line in lines if line and not line.startswith("#")}


def library_requirements() -> set[Requirement]:
    return {Requirement(line) for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}


def test_requirements_txt_and_pyproject_dependencies_agree():
    """requirements.txt (ComfyUI Manager) lists what ComfyUI lacks; pyproject adds only what ComfyUI installs itself."""
    pack, library = pack_requirements(), library_requirements()
    assert {str(r) for r in pack} <= {str(r) for r in library}
    assert {r.name for r in library} - {r.name for r in pack} == COMFYUI_PROVIDES


def test_the_pack_requires_greenlet_and_matplotlib_with_lower_bounds_only():
    """greenlet: lockstep live mode and bidirectional fusion; matplotlib: Train C2C Projector's loss curve. Lower
    bounds only, so installing the pack never downgrades what a ComfyUI environment has."""
    pack = pack_requirements()
    assert {r.name for r in pack} == {"greenlet", "matplotlib"}
    for requirement in pack | library_requirements():
        assert all(spec.operator == ">=" for spec in requirement.specifier), requirement
