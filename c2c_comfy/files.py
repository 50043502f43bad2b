"""Files the pack writes and reads in ComfyUI's folders: counters that never overwrite, names from
prompts that stay inside their folder, file identities for the loaders' cache keys, start-up cleanup.

Every write itself is atomic (c2c_core writes a temp file in the target folder and renames it into
place); this module picks names so that a save never replaces an earlier file.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

import folder_paths

from c2c_core.tensorfile import remove_stale_temp_files
from c2c_core.errors import quote
from .errors import BridgeInputError

log = logging.getLogger(__name__)

MAX_PREFIX = 120
_COUNTER = "{name}_{counter:05d}{suffix}"


def checked_prefix(node: str, input_name: str, prefix) -> tuple[str, str]:
    """(sub-folder, name) of a ``filename_prefix`` such as ``kv_cache`` or ``runs/a``; refuses what a file
    name cannot hold or what would leave the folder."""
    text = prefix if isinstance(prefix, str) else ""
    bad = (not text.strip() or len(text) > MAX_PREFIX or any(ord(c) < 32 for c in text) or "\\" in text
           or text.startswith("/") or re.match(r"^[A-Za-z]:", text) is not None)
    parts = [p for p in text.strip().split("/")]
    if bad or any(p in ("", ".", "..") for p in parts):
        raise BridgeInputError(node, input_name, f"the prefix {quote(prefix, 80)}",
                               f"a non-empty name of at most {MAX_PREFIX} characters without control characters, "
                               f"optionally with '/'-separated sub-folders (no '..', no absolute path)",
                               "type a plain name such as 'kv_cache' or 'runs/chronoedit'")
    return "/".join(parts[:-1]), parts[-1]


def next_free(folder: str | os.PathLike, name: str, suffix: str = ".safetensors") -> Path:
    """``folder/name_NNNNN<suffix>`` with NNNNN one above the highest number already there."""
    folder = Path(folder)
    pattern = re.compile(rf"^{re.escape(name)}_(\d{{5,}}){re.escape(suffix)}$")
    numbers = [int(m.group(1)) for f in (os.listdir(folder) if folder.is_dir() else []) if (m := pattern.match(f))]
    return folder / _COUNTER.format(name=name, counter=max(numbers, default=0) + 1, suffix=suffix)


def save_numbered(folder: str | os.PathLike, name: str, write, suffix: str = ".safetensors", tries: int = 100) -> Path:
    """Call ``write(path)`` (which must raise FileExistsError rather than replace a file) with the next
    free counter; on a race with another writer, take the next number."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    for _ in range(tries):
        path = next_free(folder, name, suffix)
        try:
            write(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: no free file name for {name!r} after {tries} tries")


def save_unique(path: str | os.PathLike, write) -> Path:
    """``write(path)`` if nothing is there yet, else ``write`` to ``<stem>_NNNNN<suffix>`` next to it; returns
    the path written. ``write`` must raise FileExistsError rather than replace a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(path)
        return path
    except FileExistsError:
        return save_numbered(path.parent, path.stem, write, path.suffix)


def save_in(node: str, input_name: str, root: str | os.PathLike, subfolder: str, name: str, write,
            suffix: str = ".safetensors") -> Path:
    """:func:`save_numbered` into ``root/subfolder`` for a node, refusing what would write elsewhere or fail raw.

    A link inside ``root`` (or a file where a sub-folder should be) is refused before anything is created, and
    the folder is checked again once made: resolved, it must stay inside ``root`` resolved (``root`` itself
    may be a link, e.g. an output folder on another disk). A read-only or full disk is named with the
    fix; the atomic writer leaves no partial file behind.
    """
    root = Path(root)
    folder = root.joinpath(*[p for p in subfolder.split("/") if p])
    shown = _shown(root, folder)
    try:
        root.mkdir(parents=True, exist_ok=True)
        step = root
        for part in folder.relative_to(root).parts:
            step = step / part
            if step.is_symlink():
                raise BridgeInputError(node, input_name, f"{_shown(root, step)} is a link to "
                                       f"{quote(os.readlink(step), 200)}",
                                       f"a real folder inside {root.name}/ (the pack writes only inside it)",
                                       f"remove the link {step}, or choose another {input_name}")
            if step.exists() and not step.is_dir():
                raise BridgeInputError(node, input_name, f"{_shown(root, step)} is a file, not a folder",
                                       f"a sub-folder name that is free or a folder",
                                       f"rename or remove the file {step}, or choose another {input_name}")
            step.mkdir(exist_ok=True)
        if os.path.commonpath([os.path.realpath(root), os.path.realpath(folder)]) != os.path.realpath(root):
            raise BridgeInputError(node, input_name, f"{shown} resolves to {quote(os.path.realpath(folder), 200)}",
                                   f"a folder inside {root.name}/", f"remove the link under {root}")
        return save_numbered(folder, name, write, suffix)
    except BridgeInputError:
        raise
    except OSError as e:
        raise _write_error(node, input_name, folder, shown, e) from e


def _shown(root: Path, path: Path) -> str:
    """``kv_cache/a/b``: a folder as a user finds it in ComfyUI's output folder."""
    return "/".join((root.name,) + path.relative_to(root).parts)


def _write_error(node: str, input_name: str, folder: Path, shown: str, e: OSError) -> BridgeInputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MB free"
        except OSError:
            free = "no free space"
        return BridgeInputError(node, input_name, f"the disk of {shown} is full ({free})", "room for the file",
                                "free disk space there, or start ComfyUI with --output-directory on another disk")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BridgeInputError(node, input_name, f"{shown} is not writable ({e.strerror})",
                                "a folder ComfyUI may write to",
                                f"give ComfyUI write access to {folder}, or start it with --output-directory on a "
                                f"writable folder")
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return BridgeInputError(node, input_name, f"a file is in the way of the folder {shown} ({e.strerror})",
                                "a sub-folder name that is free or a folder",
                                f"rename or remove that file, or choose another {input_name}")
    return BridgeInputError(node, input_name, f"writing into {shown} failed: {e.strerror or e}",
                            "a writable folder", f"check {folder}, or choose another {input_name}")


def temp_folder(node: str, input_name: str = "storage") -> Path:
    """ComfyUI's temp folder, created when missing (it is emptied and re-made at start-up, and someone may
    have removed it since)."""
    folder = Path(folder_paths.get_temp_directory())
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BridgeInputError(node, input_name, f"ComfyUI's temp folder {folder} is missing and cannot be created "
                               f"({e.strerror or e})", "a writable temp folder for a disk recording",
                               "start ComfyUI with --temp-directory on a writable folder, or set storage to 'ram'") from e
    return folder


def fingerprint(path) -> str:
    """A file's identity for a loader's cache key: changes when the file is replaced, rewritten or removed."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def inside(root: str | os.PathLike, relative: str) -> Path | None:
    """``root/relative`` if it stays inside ``root`` (no absolute path, no '..')."""
    if not isinstance(relative, str) or not relative or "\x00" in relative or len(relative) > 1024:
        return None
    if os.path.isabs(relative) or re.match(r"^[A-Za-z]:", relative):
        return None
    base = os.path.abspath(root)
    target = os.path.abspath(os.path.join(base, relative))   # like folder_paths: symlinked folders stay usable
    return Path(target) if os.path.commonpath([base, target]) == base and target != base else None


def listed(root: str | os.PathLike, suffix: str = ".safetensors", max_depth: int = 3) -> list[str]:
    """Files under ``root`` (sub-folders too, '/'-separated), as a combo lists them."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if len(rel.parts) >= max_depth:
            dirnames.clear()
        out += [(rel / f).as_posix() for f in filenames if f.endswith(suffix) and not f.startswith(".")]
    return sorted(out)


def pack_folders() -> list[Path]:
    """The folders this pack writes into (their temp files are cleaned at start-up)."""
    output = Path(folder_paths.get_output_directory())
    folders = [output / "kv_cache", output / "c2c_training"]
    try:
        folders += [Path(p) for p in folder_paths.get_folder_paths("c2c_projectors")]
    except KeyError:
        pass
    return folders


def cleanup_at_startup() -> list[Path]:
    """Remove temp files that writers killed mid-save left behind (``*.safetensors.<pid>.*.tmp`` of a
    process that is gone). ComfyUI itself empties its temp folder, where disk recordings live."""
    removed = []
    for folder in pack_folders():
        try:
            removed += remove_stale_temp_files(folder, max_depth=4)
        except OSError as e:
            log.warning("dit_cache_bridge: could not clean temp files in %s: %s", folder, e)
    if removed:
        log.info("dit_cache_bridge: removed %d temp file(s) of interrupted saves", len(removed))
    return removed
