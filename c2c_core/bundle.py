"""Projector bundles: one ``.safetensors`` file with the bank's tensors and JSON metadata.

Files come from strangers (shared projectors are downloads), so loading is strict and staged: refuse pickle formats by
name and by magic bytes, read only the safetensors header, validate the metadata and every
tensor's name, shape and dtype against a bank built on the meta device (no memory), and only then
read tensors. Nothing is ever unpickled.

Metadata: ``__metadata__["c2c_bundle"]`` = JSON ``{format_version, projector: {kind, hparams},
sharer, receiver, layer_map, provenance[, backward: {projector, layer_map}]}``; ``sharer`` and
``receiver`` may carry ``arch``, the host-neutral architecture tag (c2c_core.arch). Tensors:
``bank.state_dict()`` (names like ``k.12.mlp.0.weight``), and the optional backward (receiver ->
sharer) bank's under ``backward.``. docs/bundle_format.md describes the format. The generic pair :func:`save_tensors_with_meta` / :func:`read_meta` is
reused for other files (K/V recordings, trainer state).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor

from .errors import (
    BundleError,
    BundleNotFoundError,
    BundleUnknownProjectorError,
    C2CError,
    FileChangedError,
    FormatVersionError,
    InvalidMetadataError,
    MissingMetadataError,
    MissingTensorError,
    NonFiniteWeightsError,
    NotSafetensorsError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsafeFormatError,
    quote,
)
from .arch import ArchTag
from .signature import ModelSignature
from .mapping import LayerMap
from .projectors import PROJECTORS, ProjectorBank, build_projector, known_kinds, resolve_kind

__all__ = [
    "FORMAT_VERSION",
    "BUNDLE_KEY",
    "ProjectorBundle",
    "ArchMismatch",
    "arch_mismatches",
    "with_backward",
    "tag_bank",
    "save_bundle",
    "save_projector_bundle",
    "load_bundle",
    "save_tensors_with_meta",
    "read_meta",
    "read_header",
    "load_tensors",
    "snapshot",
    "Snapshot",
    "stream_tensors_with_meta",
    "remove_stale_temp_files",
]

#: 2 adds the optional backward bank; a bundle without one is still written as version 1
FORMAT_VERSION = 2
BUNDLE_KEY = "c2c_bundle"
#: tensor-name prefix of the backward (receiver -> sharer) bank
BACKWARD_PREFIX = "backward."

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: larger headers are refused before they are read; ours are kilobytes (a 50-step, 40-layer recording ~2 MB)
MAX_HEADER_BYTES = 32 * 2**20
#: safetensors dtype name -> (torch dtype, bytes per element); only these can be read
_ALL_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
if hasattr(torch, "float8_e4m3fn"):
    _ALL_DTYPES["F8_E4M3"] = (torch.float8_e4m3fn, 1)
    _ALL_DTYPES["F8_E5M2"] = (torch.float8_e5m2, 1)
_UNSAFE_HINT = "refused: pickle files can run code when loaded; convert to .safetensors"


# ----------------------------------------------------------------------------------------------
# generic safetensors + JSON metadata


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


def _atomic_write(path: Path, write, overwrite: bool) -> None:
    tmp = _temp_for(path)
    try:
        write(tmp)
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
        raise BundleError(f"refusing to write {_short_path(path)}: expected a '.safetensors' file name.")
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


_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in _ALL_DTYPES.items()}
_COPY_CHUNK = 16 * 2**20


def stream_tensors_with_meta(path: str | os.PathLike, sources: Mapping[str, Any], meta: Mapping, key: str,
                             overwrite: bool = False) -> None:
    """Write a safetensors file tensor by tensor, never holding more than one 16 MB chunk.

    ``sources`` maps names to CPU tensors or to ``(Snapshot, name)`` pairs whose bytes are copied
    from that file (disk to disk). Atomic and, by default, never over an existing file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise BundleError(f"refusing to write {_short_path(path)}: expected a '.safetensors' file name.")
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
        if _identity(os.fstat(f.fileno())) != snap.identity:
            raise FileChangedError(f"{_short_path(snap.path)}: the file changed after it was loaded; record again.")
        f.seek(snap.data_start + e.begin)
        left = e.end - e.begin
        while left:
            chunk = f.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise FileChangedError(f"{_short_path(snap.path)}: the file is shorter than its header says.")
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
        raise BundleNotFoundError(f"{_short_path(path)}: no such file; expected a .safetensors file. Check the path or folder.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFormatError(f"{_short_path(path)}: {quote(path.suffix, 20)} checkpoint {_UNSAFE_HINT}.")
    with open(path, "rb") as f:
        head = f.read(9)
    # a safetensors header length can start with the same two bytes; its JSON then starts with '{'
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and head[8:9] != b"{":
        raise UnsafeFormatError(f"{_short_path(path)}: file starts with pickle bytes; {_UNSAFE_HINT}.")
    if head[:4] == b"PK\x03\x04":
        raise UnsafeFormatError(f"{_short_path(path)}: file is a zip archive (torch.save format, holds a pickle); {_UNSAFE_HINT}.")


def _short_path(path) -> str:
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
            raise FileChangedError(f"{_short_path(self.path)}: cannot reopen the file ({exc.strerror}); it was "
                                   f"moved or removed after it was loaded. Load it again.") from None
        with f:
            if _identity(os.fstat(f.fileno())) != self.identity:
                raise FileChangedError(f"{_short_path(self.path)}: the file changed after its header was read "
                                       f"(replaced or rewritten); refusing to mix two versions. Load it again.")
            for name in names:
                e = self.entries[name]
                f.seek(self.data_start + e.begin)
                buf = bytearray(e.end - e.begin)
                if f.readinto(buf) != len(buf):
                    raise FileChangedError(f"{_short_path(self.path)}: the file is shorter than its header says "
                                           f"(truncated while in use); load it again.")
                t = _tensor_from(buf, e)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                out[name] = t.to(device)
        return out


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _tensor_from(buf: bytearray, e: TensorEntry) -> Tensor:
    torch_dtype = _ALL_DTYPES[e.dtype][0]
    if not buf:
        return torch.empty(e.shape, dtype=torch_dtype)
    return torch.frombuffer(buf, dtype=torch_dtype).reshape(e.shape)


def _bad_file(path: Path, why: str) -> NotSafetensorsError:
    return NotSafetensorsError(f"{_short_path(path)}: not a readable safetensors file ({why}); expected a .safetensors "
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
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in _ALL_DTYPES:
            raise _bad_file(path, f"tensor {quote(name)} has no known dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape):
            raise _bad_file(path, f"tensor {quote(name)} has shape {quote(shape, 60)}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise _bad_file(path, f"tensor {quote(name)} has data_offsets {quote(offsets, 60)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * _ALL_DTYPES[info["dtype"]][1]:
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
            identity = _identity(os.fstat(f.fileno()))
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


def _parse_meta(path: Path, metadata: Mapping[str, str], key: str) -> dict:
    if key not in metadata:
        found = sorted(metadata)
        shown = quote(found[:10], 200) if found else "none"
        raise MissingMetadataError(
            f"{_short_path(path)}: safetensors metadata has no {key!r} entry (found keys: {shown}); this is not a "
            f"DiT Cache Bridge file of that kind. Use a file saved by DiT Cache Bridge."
        )
    try:
        meta = _strict_json(metadata[key])
    except (ValueError, RecursionError) as exc:
        raise InvalidMetadataError(f"{_short_path(path)}: metadata {key!r} is not valid JSON "
                                   f"({quote(str(exc), 160)}); the file is damaged or foreign.") from None
    if not isinstance(meta, dict):
        raise InvalidMetadataError(f"{_short_path(path)}: metadata {key!r} is a JSON {type(meta).__name__}; expected an object.")
    return meta


def read_meta(path: str | os.PathLike, key: str) -> dict:
    """The JSON object stored under metadata ``key``; reads the header only."""
    metadata, _ = read_header(path)
    return _parse_meta(Path(path), metadata, key)


def load_tensors(path: str | os.PathLike, names, device="cpu", dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """Read the named tensors (call after validating the header)."""
    snap = snapshot(path)
    missing = [n for n in names if n not in snap.entries]
    if missing:
        raise MissingTensorError(f"{_short_path(path)}: no tensors {quote(missing[:5])}; the file is incomplete.")
    return snap.read(names, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# projector bundles


@dataclass
class ProjectorBundle:
    """A loaded bundle: the bank (eval mode) plus what it was made for and how.

    ``backward`` (optional) is the receiver -> sharer bank for bidirectional fusion, itself a bundle
    whose sharer is this bundle's receiver and whose receiver is this bundle's sharer.
    """

    bank: ProjectorBank
    layer_map: LayerMap
    sharer: ModelSignature
    receiver: ModelSignature
    provenance: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    backward: Optional["ProjectorBundle"] = None

    @property
    def tagged(self) -> bool:
        """True when both sides carry an architecture tag (bundles saved before the tag existed do not)."""
        return self.sharer.arch is not None and self.receiver.arch is not None


@dataclass(frozen=True)
class ArchMismatch:
    """One side of a pair whose architecture is not the one a bundle was made for."""

    role: str                   # "sharer" | "receiver"
    made_for: ArchTag           # the bundle's tag of that side
    found: ArchTag              # the model's tag
    differences: tuple          # 'field bundle vs model' strings

    def describe(self) -> str:
        return (f"a projector made for a {self.role} {self.made_for.describe()}, but the {self.role} model is "
                f"{self.found.describe()}, which differs in {', '.join(self.differences)}")


def arch_mismatches(bundle: ProjectorBundle, sharer: ModelSignature, receiver: ModelSignature) -> list[ArchMismatch]:
    """The sides whose architecture tag differs from the bundle's (host-free; every host calls this after
    the shape check). A side is compared only when both the bundle and the model carry a tag, so
    bundles saved before the tag existed (and recordings without it) are judged by their shapes alone."""
    out = []
    for role, model in (("sharer", sharer), ("receiver", receiver)):
        made_for = getattr(bundle, role).arch
        if made_for is not None and model.arch is not None and made_for != model.arch:
            out.append(ArchMismatch(role, made_for, model.arch, tuple(made_for.differences(model.arch))))
    return out


def tag_bank(bank: ProjectorBank, sharer: ModelSignature, receiver: ModelSignature) -> ProjectorBank:
    """Give ``bank`` the architecture tags of the models it was trained with (a trainer calls this before
    saving, so a bank that started from an untagged bundle is saved tagged). Shapes must agree."""
    if not (bank.sharer.same_shape(sharer) and bank.receiver.same_shape(receiver)):
        raise BundleError(f"tag_bank: the bank maps {_side(bank.sharer)} -> {_side(bank.receiver)}; the models are "
                          f"{_side(sharer)} -> {_side(receiver)}. Tag a bank with the models it was made for.")
    bank.sharer = dataclasses.replace(bank.sharer, arch=sharer.arch or bank.sharer.arch)
    bank.receiver = dataclasses.replace(bank.receiver, arch=receiver.arch or bank.receiver.arch)
    return bank


def with_backward(forward: ProjectorBundle, backward: ProjectorBundle) -> ProjectorBundle:
    """``forward`` carrying ``backward`` (receiver -> sharer) as its second bank, for one bidirectional file.

    Refused unless ``backward`` maps ``forward``'s receiver into ``forward``'s sharer (shapes, and the
    architecture tags where both carry them)."""
    _check_backward_fits(forward.bank, backward.bank, "with_backward")
    return dataclasses.replace(forward, backward=dataclasses.replace(backward, backward=None))


def _check_backward_fits(bank: ProjectorBank, back: ProjectorBank, where) -> None:
    ok = back.sharer.same_shape(bank.receiver) and back.receiver.same_shape(bank.sharer)
    for mine, theirs in ((back.sharer, bank.receiver), (back.receiver, bank.sharer)):
        ok = ok and (mine.arch is None or theirs.arch is None or mine.arch == theirs.arch)
    if not ok:
        raise BundleError(
            f"{where}: the backward bank maps {_side(back.sharer)} -> {_side(back.receiver)}; expected the forward "
            f"bank's receiver -> its sharer ({_side(bank.receiver)} -> {_side(bank.sharer)}). Build the backward "
            f"bank with the two models swapped.")


def _side(sig: ModelSignature) -> str:
    shape = f"{sig.num_layers}×{sig.num_heads}×{sig.head_dim}"
    return f"{sig.arch.family} {sig.arch.variant} {shape}" if sig.arch is not None else shape


def save_bundle(
    path: str | os.PathLike,
    bank: ProjectorBank,
    layer_map: LayerMap,
    provenance: Optional[Mapping] = None,
    overwrite: bool = True,
    backward: Optional[tuple[ProjectorBank, LayerMap]] = None,
) -> None:
    """Write ``bank`` and ``layer_map`` as one ``.safetensors`` bundle (see module docstring).

    The architecture tags of the bank's signatures (set by the hosts when they read a model) are
    written with them. ``backward=(bank, layer_map)`` adds a receiver -> sharer bank for bidirectional
    fusion (format version 2; without it the file stays version 1, readable by older releases).
    ``overwrite=False`` raises FileExistsError rather than replace a file already there."""
    path = Path(path)
    _check_bank_map(path, bank, layer_map, "")
    meta = {
        "format_version": 1,
        "projector": {"kind": bank.kind, "hparams": dict(bank.hparams)},
        "sharer": bank.sharer.to_dict(),
        "receiver": bank.receiver.to_dict(),
        "layer_map": layer_map.to_dict(),
        "provenance": dict(provenance or {}),
    }
    tensors = dict(bank.state_dict())
    if backward is not None:
        back, back_map = backward
        _check_backward_fits(bank, back, _short_path(path))
        _check_bank_map(path, back, back_map, "backward ")
        meta["format_version"] = FORMAT_VERSION
        meta["backward"] = {"projector": {"kind": back.kind, "hparams": dict(back.hparams)},
                            "layer_map": back_map.to_dict()}
        tensors.update({BACKWARD_PREFIX + name: t for name, t in back.state_dict().items()})
    save_tensors_with_meta(path, tensors, meta, BUNDLE_KEY, overwrite=overwrite)


def save_projector_bundle(path: str | os.PathLike, bundle: ProjectorBundle, provenance: Optional[Mapping] = None,
                          overwrite: bool = True) -> None:
    """Write a ProjectorBundle (and its backward bank, if it has one); provenance defaults to the bundle's."""
    backward = (bundle.backward.bank, bundle.backward.layer_map) if bundle.backward is not None else None
    save_bundle(path, bundle.bank, bundle.layer_map, bundle.provenance if provenance is None else provenance,
                overwrite=overwrite, backward=backward)


def _check_bank_map(path: Path, bank: ProjectorBank, layer_map: LayerMap, which: str) -> None:
    if bank.layers != layer_map.layers:
        raise BundleError(
            f"{path}: {which}bank covers receiver layers {bank.layers} but the layer map fuses "
            f"{layer_map.layers}; expected the same layers. Build the bank with layers=layer_map.layers."
        )
    try:
        layer_map.validate(bank.sharer, bank.receiver)
    except C2CError as exc:
        raise BundleError(f"{path}: {which}layer map does not fit the bank's models: {exc}") from None


def _field(path: Path, meta: Mapping, name: str, kind: type) -> Any:
    if name not in meta:
        raise InvalidMetadataError(f"{_short_path(path)}: bundle metadata lacks {name!r}; expected keys format_version, projector, sharer, receiver, layer_map.")
    value = meta[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = {int: "an integer", dict: "a JSON object"}.get(kind, kind.__name__)
        raise InvalidMetadataError(f"{_short_path(path)}: bundle metadata {name!r} is {quote(value)}; expected {expected}.")
    return value


#: structural hyper-parameters get a sane ceiling before anything is built from them (a header alone
#: must not make the loader build 100,000 layers); every other integer is capped at MAX_WIDTH
HPARAM_LIMITS = {"num_layers": 64}
#: widest hidden layer / attention width a bundle may declare (Wan 14B: 40 heads x 128 = 5,120)
MAX_WIDTH = 65536
#: signature fields: layers, heads, head_dim
MAX_SIGNATURE = {"num_layers": 1024, "num_heads": 1024, "head_dim": 4096}
#: weights beyond this magnitude cannot be represented in fp16 and no projector uses them
MAX_WEIGHT = 65504.0


@dataclass
class _BankPlan:
    """One bank as the header declares it (projector kind, settings, layer map), validated."""

    kind: str
    hparams: dict
    sharer: ModelSignature
    receiver: ModelSignature
    layer_map: LayerMap
    prefix: str = ""


@dataclass
class _Plan:
    """Everything load_bundle validated from the header, before any tensor is read."""

    meta: dict
    forward: _BankPlan
    backward: Optional[_BankPlan]
    snapshot: Snapshot

    @property
    def entries(self) -> dict:
        return self.snapshot.header()


def _signature(path: Path, meta: Mapping, role: str) -> ModelSignature:
    d = _field(path, meta, role, dict)
    for name, limit in MAX_SIGNATURE.items():
        value = d.get(name)
        if type(value) is int and value > limit:
            raise InvalidMetadataError(f"{_short_path(path)}: {role} {name} is {quote(value, 40)}; expected at most "
                                       f"{limit}. The file is damaged or not a DiT Cache Bridge bundle.")
    if not isinstance(d.get("name", ""), str):
        raise InvalidMetadataError(f"{_short_path(path)}: {role} name is {quote(d.get('name'))}; expected a string.")
    sig = ModelSignature.from_dict(d)
    arch = sig.arch
    if arch is not None and (arch.num_layers, arch.num_heads, arch.dim) != (sig.num_layers, sig.num_heads, sig.width):
        raise InvalidMetadataError(
            f"{_short_path(path)}: the {role}'s architecture tag ({arch.num_layers} layers, {arch.num_heads} heads, dim "
            f"{arch.dim}) contradicts its signature ({sig.num_layers} layers, {sig.num_heads} heads × {sig.head_dim}); "
            f"the file is damaged. Re-export it.")
    return sig


def _check_hparams(path: Path, kind: str, hparams: dict) -> None:
    for name, value in hparams.items():
        if not isinstance(name, str) or len(name) > 64:
            raise InvalidMetadataError(f"{_short_path(path)}: projector hparam name {quote(name, 60)}; expected a short name.")
        limit = HPARAM_LIMITS.get(name, MAX_WIDTH)
        if isinstance(value, int) and not isinstance(value, bool) and not -limit <= value <= limit:
            raise InvalidMetadataError(
                f"{_short_path(path)}: projector {kind!r} {name}={quote(value, 40)}; expected at most {limit}. "
                f"The file is damaged or was not written by DiT Cache Bridge."
            )
        if not isinstance(value, (int, float, str, bool)) or (isinstance(value, str) and len(value) > 64):
            raise InvalidMetadataError(f"{_short_path(path)}: projector {kind!r} {name}={quote(value, 60)}; "
                                       f"expected a number, a boolean or a short string.")


def _bank_plan(path: Path, where: Mapping, sharer: ModelSignature, receiver: ModelSignature, prefix: str) -> _BankPlan:
    """Kind, settings and layer map of one bank (``where`` is the metadata object holding them)."""
    label = "backward " if prefix else ""
    projector = _field(path, where, "projector", dict)
    kind = projector.get("kind")
    hparams = projector.get("hparams", {})
    if not isinstance(kind, str) or kind not in PROJECTORS:
        raise BundleUnknownProjectorError(
            f"{_short_path(path)}: {label}projector kind {quote(kind, 60)} is unknown to this version (known: "
            f"{', '.join(known_kinds())}); update DiT Cache Bridge or re-export the bundle."
        )
    if not isinstance(hparams, dict):
        raise InvalidMetadataError(f"{_short_path(path)}: {label}projector hparams are {quote(hparams, 60)}; expected an object.")
    _check_hparams(path, kind, hparams)
    try:
        layer_map = LayerMap.from_dict(_field(path, where, "layer_map", dict))
        layer_map.validate(sharer, receiver)
    except InvalidMetadataError:
        raise
    except (C2CError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidMetadataError(f"{_short_path(path)}: {label}bundle metadata is inconsistent: {quote(str(exc), 300)}") from None
    return _BankPlan(kind, hparams, sharer, receiver, layer_map, prefix)


def _plan(path: Path) -> _Plan:
    snap = snapshot(path)
    meta = _parse_meta(path, snap.metadata, BUNDLE_KEY)
    version = _field(path, meta, "format_version", int)
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{_short_path(path)}: bundle format version {quote(version, 40)} is newer than this DiT Cache Bridge reads "
            f"(up to {FORMAT_VERSION}); update DiT Cache Bridge."
        )
    if version < 1:
        raise InvalidMetadataError(f"{_short_path(path)}: bundle format version {quote(version, 40)}; expected 1..{FORMAT_VERSION}.")
    if not isinstance(meta.get("provenance", {}), dict):
        raise InvalidMetadataError(f"{_short_path(path)}: bundle provenance is {quote(meta['provenance'], 60)}; expected an object.")
    _field(path, meta, "projector", dict)
    try:
        sharer = _signature(path, meta, "sharer")
        receiver = _signature(path, meta, "receiver")
    except InvalidMetadataError:
        raise
    except (C2CError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidMetadataError(f"{_short_path(path)}: bundle metadata is inconsistent: {quote(str(exc), 300)}") from None
    forward = _bank_plan(path, meta, sharer, receiver, "")
    backward = None
    if "backward" in meta:
        backward = _bank_plan(path, _field(path, meta, "backward", dict), receiver, sharer, BACKWARD_PREFIX)
    return _Plan(meta, forward, backward, snap)


def _expected_tensors(path: Path, plan: _BankPlan) -> dict[str, tuple[int, ...]]:
    """Names and shapes one bank needs, from ONE projector built on the meta device (no memory).

    Every fused layer holds the same projector twice (K and V), so one skeleton gives the whole
    list; the full bank is built only after the file is known to hold exactly these tensors.
    """
    label = "backward " if plan.prefix else ""
    try:
        concrete = resolve_kind(plan.kind, plan.sharer, plan.receiver)
        with torch.device("meta"):
            one = build_projector(concrete, plan.sharer, plan.receiver, **plan.hparams)
        shapes = {name: tuple(t.shape) for name, t in one.state_dict().items()}
    except C2CError as exc:
        raise InvalidMetadataError(f"{_short_path(path)}: the bundle's {label}projector settings are invalid: {quote(str(exc), 300)}") from None
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise InvalidMetadataError(f"{_short_path(path)}: the bundle's {label}projector settings cannot be built "
                                   f"({quote(str(exc), 200)}); the file is damaged.") from None
    return {f"{plan.prefix}{w}.{i}.{n}": s for w in ("k", "v") for i in plan.layer_map.layers for n, s in shapes.items()}


def _check_tensors(path: Path, expected: Mapping[str, tuple], entries: Mapping[str, tuple]) -> None:
    missing = sorted(set(expected) - set(entries))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MissingTensorError(
            f"{_short_path(path)}: missing tensors {quote(missing[:5], 300)}{more} that the projector bank needs; the file is "
            f"incomplete or was saved from a different bank. Re-export it."
        )
    unexpected = sorted(set(entries) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise UnexpectedTensorError(
            f"{_short_path(path)}: unexpected tensors {quote(unexpected[:5], 300)}{more} that the projector bank does not have; "
            f"the metadata does not describe these weights. Re-export the bundle."
        )
    for name, shape in expected.items():
        found, dtype = entries[name]
        if found != shape:
            raise ShapeMismatchError(
                f"{_short_path(path)}: tensor {name!r} has shape {quote(list(found), 80)}; expected {list(shape)} from the "
                f"metadata's projector settings. The file is inconsistent; re-export it."
            )
        if dtype not in _FLOAT_DTYPES:
            raise ShapeMismatchError(
                f"{_short_path(path)}: tensor {name!r} has dtype {dtype}; expected a float type ({sorted(_FLOAT_DTYPES)})."
            )


def check_finite(path, name: str, t: Tensor) -> None:
    """Refuse NaN/Inf and magnitudes above MAX_WEIGHT in a loaded weight (once, at load time)."""
    if t.numel() == 0 or not t.is_floating_point():
        return
    worst = t.detach().abs().amax().float()
    if not bool(torch.isfinite(worst)) or float(worst) > MAX_WEIGHT:
        what = "NaN or Inf values" if not bool(torch.isfinite(worst)) else f"a weight of magnitude {float(worst):.3g}"
        raise NonFiniteWeightsError(
            f"{_short_path(path)}: tensor {quote(name, 80)} holds {what}; expected finite weights below "
            f"{MAX_WEIGHT:g} (the output would be NaN or black). The file is damaged or its training diverged; "
            f"use an earlier checkpoint or re-train."
        )


def _materialize(bank: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Give every meta parameter and buffer uninitialised storage (``to_empty``, minus its per-tensor
    overhead: torch's meta ``empty_like`` costs ~1 ms a tensor, ~1 s for a 40-layer bank)."""
    for module in bank.modules():
        for name, p in module._parameters.items():
            if p is not None:
                t = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device=device)
                module._parameters[name] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=dtype if b.is_floating_point() else b.dtype, device=device)


def _load_bank(path: Path, plan: _BankPlan, snap: Snapshot, expected: Mapping[str, tuple], device,
               dtype: torch.dtype) -> ProjectorBank:
    with torch.device("meta"):
        bank = ProjectorBank.build(plan.kind, plan.sharer, plan.receiver, plan.layer_map.layers, **plan.hparams)
    _materialize(bank, device, dtype)
    targets = bank.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in expected:  # one tensor at a time: peak memory is the bank plus one tensor
            t = snap.read([name])[name]
            check_finite(path, name, t)
            targets[name[len(plan.prefix):]].copy_(t)
    bank.reset_state()
    bank.eval()
    return bank


def load_bundle(path: str | os.PathLike, device="cpu", dtype: Optional[torch.dtype] = None) -> ProjectorBundle:
    """Validate the whole header (both banks, when the file holds a backward one), then build the banks on
    ``device`` and read their tensors.

    ``dtype=None`` keeps the stored dtype (float32 when the file mixes dtypes). Banks are returned
    in eval mode. Raises only BundleError subclasses (a missing file is also a FileNotFoundError);
    weights with NaN/Inf are refused.
    """
    path = Path(path)
    plan = _plan(path)
    plans = [p for p in (plan.forward, plan.backward) if p is not None]
    expected = [_expected_tensors(path, p) for p in plans]
    _check_tensors(path, {name: shape for one in expected for name, shape in one.items()}, plan.entries)
    if dtype is None:
        stored = {dt for _, dt in plan.entries.values()}
        dtype = _TORCH_DTYPES[stored.pop()] if len(stored) == 1 else torch.float32
    banks = [_load_bank(path, p, plan.snapshot, names, device, dtype) for p, names in zip(plans, expected)]
    provenance = dict(plan.meta.get("provenance") or {})
    backward = None
    if plan.backward is not None:
        backward = ProjectorBundle(bank=banks[1], layer_map=plan.backward.layer_map, sharer=plan.backward.sharer,
                                   receiver=plan.backward.receiver, provenance=provenance,
                                   metadata=dict(plan.meta["backward"]))
    return ProjectorBundle(
        bank=banks[0],
        layer_map=plan.forward.layer_map,
        sharer=plan.forward.sharer,
        receiver=plan.forward.receiver,
        provenance=provenance,
        metadata=plan.meta,
        backward=backward,
    )
