"""The generic safetensors + JSON metadata layer every c2c_core file format is written and read through.

Projector bundles, K/V recordings, trainer checkpoints and training samples are all one ``.safetensors``
file: tensors plus a JSON object under one ``__metadata__`` key. Files come from strangers, so reading is
bounded and staged: pickle formats are refused by name and by magic bytes, the header is read with a
size limit and parsed as strict JSON (no NaN), every tensor's dtype, shape and byte range is checked
against the data section before anything is read, and tensors are read with plain bounded reads from
the same version of the file (:class:`Snapshot`; no mmap, so a truncated file is an error, not a crash).
Writes go to a temp file renamed into place, never over an existing file unless asked, so a killed
writer leaves no truncated file under the final name (:func:`remove_stale_temp_files` sweeps its temp).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor

from .errors import (
    BundleError,
    BundleNotFoundError,
    C2CError,
    FileChangedError,
    InvalidMetadataError,
    MissingMetadataError,
    MissingTensorError,
    NotSafetensorsError,
    UnsafeFormatError,
    quote,
)

__all__ = [
    "SAFETENSORS_DTYPES",
    "FLOAT_DTYPES",
    "MAX_HEADER_BYTES",
    "PICKLE_SUFFIXES",
    "save_tensors_with_meta",
    "stream_tensors_with_meta",
    "remove_stale_temp_files",
    "TensorEntry",
    "Snapshot",
    "snapshot",
    "file_identity",
    "read_header",
    "parse_meta",
    "read_meta",
    "load_tensors",
    "short_path",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
#: safetensors dtype names of the float types a weight may be stored in
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
#: larger headers are refused before they are read; ours are kilobytes (a 50-step, 40-layer recording ~2 MB)
MAX_HEADER_BYTES = 32 * 2**20
#: safetensors dtype name -> (torch dtype, bytes per element); only these can be read
SAFETENSORS_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
if hasattr(torch, "float8_e4m3fn"):
    SAFETENSORS_DTYPES["F8_E4M3"] = (torch.float8_e4m3fn, 1)
    SAFETENSORS_DTYPES["F8_E5M2"] = (torch.float8_e5m2, 1)
_UNSAFE_HINT = "refused: pickle files can run code when loaded; convert to .safetensors"


def _json(value: Any, path: Path, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{path}: cannot write {what}: it is not JSON-serialisable ({exc}); use str/int/float/list/dict.") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_for(path: Path) -> str:
    """A fresh temp file next to ``path``, named ``<name>.<pid>.<random>.tmp`` so start-up cleanup can
    tell a dead writer's leftover (see :func:`remove_stale_temp_files`) from a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def _publish(tmp: str, path: Path, overwrite: bool) -> None:
    """Move a finished temp file into place: atomically, and never over an existing file unless asked."""
    os.chmod(tmp, 0o666 & ~_umask())      # mkstemp makes 0600; give the file the usual permissions
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)                # fails with FileExistsError instead of replacing
    except FileExistsError:
        raise
    except OSError:                       # a file system without hard links
        if path.exists():
            raise FileExistsError(str(path)) from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


# Tests only (the kill -9 tests): with this variable set to 1, writes into a folder holding a file PAUSE_FILE
# pause half-way.
PAUSE_ENV, PAUSE_FILE = "DCB_TEST_PAUSE_WRITES", ".pause-writes"


def _pause_half_way(tmp: str, path: Path) -> None:
    """Armed (``PAUSE_ENV`` and ``PAUSE_FILE`` beside ``path``): cut ``tmp`` to half its length (what a writer
    killed half-way leaves), wait while ``<tmp>.paused`` exists, then restore the rest. A test that finds the
    marker kills the process then, or removes the marker to let the write go on: a kill lands mid-write at once."""
    if os.environ.get(PAUSE_ENV) != "1" or not (path.parent / PAUSE_FILE).exists():
        return
    with open(tmp, "r+b") as f:
        half = os.fstat(f.fileno()).st_size // 2
        f.seek(half)
        rest = f.read()
        f.truncate(half)
        f.flush()
        os.fsync(f.fileno())
        marker = Path(tmp + ".paused")
        marker.touch()
        while marker.exists():
            time.sleep(0.01)
        f.seek(half)
        f.write(rest)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: Path, write, overwrite: bool) -> None:
    tmp = _temp_for(path)
    try:
        write(tmp)
        _pause_half_way(tmp, path)
        _publish(tmp, path, overwrite)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_tensors_with_meta(path: str | os.PathLike, tensors: Mapping[str, Tensor], meta: Mapping, key: str,
                           overwrite: bool = True) -> None:
    """Write ``tensors`` (moved to CPU, made contiguous) and ``meta`` as JSON under metadata ``key``.

    The write goes to a temporary file in the same folder and is renamed into place, so an
    interrupted save never leaves a truncated file under the final name. ``overwrite=False``
    raises FileExistsError instead of replacing an existing file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise BundleError(f"refusing to write {short_path(path)}: expected a '.safetensors' file name.")
    metadata = {key: _json(dict(meta), path, f"metadata {key!r}")}
    cpu, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        # safetensors refuses tensors that share memory (views of one capture, tied weights): copy those
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        cpu[name] = t
    _atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata), overwrite)


_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in SAFETENSORS_DTYPES.items()}
_COPY_CHUNK = 16 * 2**20


def stream_tensors_with_meta(path: str | os.PathLike, sources: Mapping[str, Any], meta: Mapping, key: str,
                             overwrite: bool = False) -> None:
    """Write a safetensors file tensor by tensor, never holding more than one 16 MB chunk.

    ``sources`` maps names to CPU tensors or to ``(Snapshot, name)`` pairs whose bytes are copied
    from that file (disk to disk). Atomic and, by default, never over an existing file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise BundleError(f"refusing to write {short_path(path)}: expected a '.safetensors' file name.")
    header, plan, offset = {}, [], 0
    for name, src in sources.items():
        if isinstance(src, tuple):
            snap, src_name = src
            e = snap.entries[src_name]
            dtype, shape, nbytes = e.dtype, list(e.shape), e.end - e.begin
        else:
            src = src.detach().to("cpu").contiguous()
            dtype, shape, nbytes = _DTYPE_NAMES[src.dtype], list(src.shape), src.numel() * src.element_size()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        plan.append((src, nbytes))
        offset += nbytes
    header["__metadata__"] = {key: _json(dict(meta), path, f"metadata {key!r}")}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(tmp):
        with open(tmp, "wb") as out:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            for src, nbytes in plan:
                if isinstance(src, tuple):
                    _copy_range(src[0], src[0].entries[src[1]], out)
                elif nbytes:
                    out.write(memoryview(src.reshape(-1).view(torch.uint8).numpy()))
            out.flush()
            os.fsync(out.fileno())

    _atomic_write(path, write, overwrite)


def _copy_range(snap: "Snapshot", e: "TensorEntry", out) -> None:
    with open(snap.path, "rb") as f:
        if file_identity(os.fstat(f.fileno())) != snap.identity:
            raise FileChangedError(f"{short_path(snap.path)}: the file changed after it was loaded; record again.")
        f.seek(snap.data_start + e.begin)
        left = e.end - e.begin
        while left:
            chunk = f.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise FileChangedError(f"{short_path(snap.path)}: the file is shorter than its header says.")
            out.write(chunk)
            left -= len(chunk)


_TEMP_NAME = re.compile(r"^.+\.safetensors\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def _alive(pid: int) -> bool:
    if os.name == "nt":             # os.kill(pid, 0) would terminate the process on Windows
        import ctypes               # stdlib: c2c_core stays torch/einops/safetensors only
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)      # PROCESS_QUERY_LIMITED_INFORMATION
        if handle:
            kernel32.CloseHandle(handle)
            return True
        return kernel32.GetLastError() == 5                    # ERROR_ACCESS_DENIED: it exists
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike, max_depth: int = 3) -> list[Path]:
    """Delete ``*.safetensors.<pid>.<random>.tmp`` files left by writers that are no longer running
    (a killed server); returns what was removed. Files of the current process are left alone."""
    removed = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        if len(Path(dirpath).relative_to(root).parts) >= max_depth:
            dirnames.clear()
        for name in filenames:
            m = _TEMP_NAME.match(name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                target = Path(dirpath) / name
                try:
                    target.unlink()
                    removed.append(target)
                except OSError:
                    pass
    return removed


def _refuse_unsafe(path: Path) -> None:
    if not path.is_file():
        raise BundleNotFoundError(f"{short_path(path)}: no such file; expected a .safetensors file. Check the path or folder.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFormatError(f"{short_path(path)}: {quote(path.suffix, 20)} checkpoint {_UNSAFE_HINT}.")
    with open(path, "rb") as f:
        head = f.read(9)
    # a safetensors header length can start with the same two bytes; its JSON then starts with '{'
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and head[8:9] != b"{":
        raise UnsafeFormatError(f"{short_path(path)}: file starts with pickle bytes; {_UNSAFE_HINT}.")
    if head[:4] == b"PK\x03\x04":
        raise UnsafeFormatError(f"{short_path(path)}: file is a zip archive (torch.save format, holds a pickle); {_UNSAFE_HINT}.")


def short_path(path) -> str:
    text = str(path)
    return text if len(text) <= 200 else f"…{text[-200:]}"


def _strict_json(text: str):
    """json.loads that refuses NaN/Infinity and numbers that overflow to them (``1e400``)."""

    def refuse_constant(name):
        raise ValueError(f"{name} is not allowed")

    def finite_float(token):
        value = float(token)
        if not math.isfinite(value):
            raise ValueError(f"number {token[:40]} overflows")
        return value

    return json.loads(text, parse_constant=refuse_constant, parse_float=finite_float)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it; ``begin``/``end`` are byte offsets in the data section."""

    shape: tuple
    dtype: str
    begin: int
    end: int


@dataclass(frozen=True)
class Snapshot:
    """A validated safetensors header plus the identity of the file it came from.

    Tensors are read with plain bounded reads (no mmap: a file truncated under a reader gives an
    error, not a crash) from the same file: ``read`` refuses when the file was replaced, truncated
    or removed since the header was read, so metadata and tensors always come from one version.
    """

    path: Path
    metadata: dict
    entries: dict
    data_start: int
    identity: tuple

    def header(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {name: (e.shape, e.dtype) for name, e in self.entries.items()}

    def read(self, names, device="cpu", dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
        out = {}
        try:
            f = open(self.path, "rb")
        except OSError as exc:
            raise FileChangedError(f"{short_path(self.path)}: cannot reopen the file ({exc.strerror}); it was "
                                   f"moved or removed after it was loaded. Load it again.") from None
        with f:
            if file_identity(os.fstat(f.fileno())) != self.identity:
                raise FileChangedError(f"{short_path(self.path)}: the file changed after its header was read "
                                       f"(replaced or rewritten); refusing to mix two versions. Load it again.")
            for name in names:
                e = self.entries[name]
                f.seek(self.data_start + e.begin)
                buf = bytearray(e.end - e.begin)
                if f.readinto(buf) != len(buf):
                    raise FileChangedError(f"{short_path(self.path)}: the file is shorter than its header says "
                                           f"(truncated while in use); load it again.")
                t = _tensor_from(buf, e)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[name] = t.to(device)
        return out


def file_identity(st: os.stat_result) -> tuple:
    """One version of a file: device, inode, size, mtime and ctime (a replaced or rewritten file differs; ctime
    catches a same-size rewrite whose mtime was set back, which no user process can set back in turn)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _tensor_from(buf: bytearray, e: TensorEntry) -> Tensor:
    torch_dtype = SAFETENSORS_DTYPES[e.dtype][0]
    if not buf:
        return torch.empty(e.shape, dtype=torch_dtype)
    return torch.frombuffer(buf, dtype=torch_dtype).reshape(e.shape)


def _bad_file(path: Path, why: str) -> NotSafetensorsError:
    return NotSafetensorsError(f"{short_path(path)}: not a readable safetensors file ({why}); expected a .safetensors "
                               f"file written by DiT Cache Bridge. Re-download or re-export it.")


def _parse_entries(path: Path, header, data_size: int) -> tuple[dict, dict]:
    if not isinstance(header, dict):
        raise _bad_file(path, "the header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _bad_file(path, "__metadata__ is not a map of strings")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in SAFETENSORS_DTYPES:
            raise _bad_file(path, f"tensor {quote(name)} has no known dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape):
            raise _bad_file(path, f"tensor {quote(name)} has shape {quote(shape, 60)}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise _bad_file(path, f"tensor {quote(name)} has data_offsets {quote(offsets, 60)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]][1]:
            raise _bad_file(path, f"tensor {quote(name)} claims bytes {begin}..{end} for shape {shape} in a data "
                                  f"section of {data_size} bytes")
        entries[name] = TensorEntry(tuple(shape), info["dtype"], begin, end)
    covered = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != covered:
            raise _bad_file(path, "tensor data overlaps or leaves gaps")
        covered = e.end
    if covered != data_size:
        raise _bad_file(path, f"tensors cover {covered} of {data_size} data bytes")
    return metadata, entries


def snapshot(path: str | os.PathLike) -> Snapshot:
    """Read and validate the header of ``path`` (bounded, no mmap, no tensor read); see :class:`Snapshot`."""
    path = Path(path)
    _refuse_unsafe(path)
    try:
        with open(path, "rb") as f:
            identity = file_identity(os.fstat(f.fileno()))
            size = identity[2]
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad_file(path, f"{size} bytes is too short for a header")
            n = int.from_bytes(prefix, "little")
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise _bad_file(path, f"header length {n} exceeds the file ({size} bytes) or the limit of "
                                      f"{MAX_HEADER_BYTES} bytes")
            raw = f.read(n)
        header = _strict_json(raw.decode("utf-8"))
    except C2CError:
        raise
    except OSError as exc:
        raise _bad_file(path, f"cannot read it: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _bad_file(path, f"the header is not valid JSON: {quote(str(exc), 160)}") from None
    metadata, entries = _parse_entries(path, header, size - 8 - n)
    return Snapshot(path, metadata, entries, 8 + n, identity)


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """(metadata, {name: (shape, dtype)}) from the header alone; no tensor is read."""
    snap = snapshot(path)
    return snap.metadata, snap.header()


def parse_meta(path: Path, metadata: Mapping[str, str], key: str) -> dict:
    if key not in metadata:
        found = sorted(metadata)
        shown = quote(found[:10], 200) if found else "none"
        raise MissingMetadataError(
            f"{short_path(path)}: safetensors metadata has no {key!r} entry (found keys: {shown}); this is not a "
            f"DiT Cache Bridge file of that kind. Use a file saved by DiT Cache Bridge."
        )
    try:
        meta = _strict_json(metadata[key])
    except (ValueError, RecursionError) as exc:
        raise InvalidMetadataError(f"{short_path(path)}: metadata {key!r} is not valid JSON "
                                   f"({quote(str(exc), 160)}); the file is damaged or foreign.") from None
    if not isinstance(meta, dict):
        raise InvalidMetadataError(f"{short_path(path)}: metadata {key!r} is a JSON {type(meta).__name__}; expected an object.")
    return meta


def read_meta(path: str | os.PathLike, key: str) -> dict:
    """The JSON object stored under metadata ``key``; reads the header only."""
    metadata, _ = read_header(path)
    return parse_meta(Path(path), metadata, key)


def load_tensors(path: str | os.PathLike, names, device="cpu", dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """Read the named tensors (call after validating the header)."""
    snap = snapshot(path)
    missing = [n for n in names if n not in snap.entries]
    if missing:
        raise MissingTensorError(f"{short_path(path)}: no tensors {quote(missing[:5])}; the file is incomplete.")
    return snap.read(names, device=device, dtype=dtype)


