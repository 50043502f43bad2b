"""Projector bundles: one ``.safetensors`` file with the bank's tensors and JSON metadata.

Files come from strangers (design §8), so loading is strict and staged: refuse pickle formats by
name and by magic bytes, read only the safetensors header, validate the metadata and every
tensor's name, shape and dtype against a bank built on the meta device (no memory), and only then
read tensors. Nothing is ever unpickled.

Metadata: ``__metadata__["c2c_bundle"]`` = JSON ``{format_version, projector: {kind, hparams},
sharer, receiver, layer_map, provenance}``. Tensors: ``bank.state_dict()`` (names like
``k.12.mlp.0.weight``). The generic pair :func:`save_tensors_with_meta` / :func:`read_meta` is
reused for other files (K/V recordings, trainer state).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import (
    BundleError,
    BundleNotFoundError,
    BundleUnknownProjectorError,
    C2CError,
    FormatVersionError,
    InvalidMetadataError,
    MissingMetadataError,
    MissingTensorError,
    NotSafetensorsError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsafeFormatError,
)
from .kv import ModelSignature
from .mapping import LayerMap
from .projectors import PROJECTORS, ProjectorBank, known_kinds

__all__ = [
    "FORMAT_VERSION",
    "BUNDLE_KEY",
    "ProjectorBundle",
    "save_bundle",
    "load_bundle",
    "read_bundle_header",
    "save_tensors_with_meta",
    "read_meta",
    "read_header",
    "load_tensors",
]

FORMAT_VERSION = 1
BUNDLE_KEY = "c2c_bundle"

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
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


def save_tensors_with_meta(path: str | os.PathLike, tensors: Mapping[str, Tensor], meta: Mapping, key: str) -> None:
    """Write ``tensors`` (moved to CPU, made contiguous) and ``meta`` as JSON under metadata ``key``.

    The write goes to a temporary file in the same folder and is renamed into place, so an
    interrupted save never leaves a truncated file under the final name.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise BundleError(f"refusing to write {path}: expected a '.safetensors' file name.")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(cpu, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())      # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _refuse_unsafe(path: Path) -> None:
    if not path.is_file():
        raise BundleNotFoundError(f"{path}: no such file; expected a .safetensors file. Check the path or folder.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFormatError(f"{path}: {path.suffix} checkpoint {_UNSAFE_HINT}.")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise UnsafeFormatError(f"{path}: file starts with pickle bytes; {_UNSAFE_HINT}.")
    if head[:4] == b"PK\x03\x04":
        raise UnsafeFormatError(f"{path}: file is a zip archive (torch.save format, holds a pickle); {_UNSAFE_HINT}.")


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """(metadata, {name: (shape, dtype)}) from the header alone; no tensor is read."""
    path = Path(path)
    _refuse_unsafe(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            entries = {}
            for name in f.keys():
                sl = f.get_slice(name)
                entries[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    except C2CError:
        raise
    except Exception as exc:  # safetensors raises its own error type (and OSError on I/O)
        raise NotSafetensorsError(
            f"{path}: not a readable safetensors file ({exc}); expected a .safetensors file written "
            f"by DiT Cache Bridge. Re-download or re-export it."
        ) from None
    return metadata, entries


def _parse_meta(path: Path, metadata: Mapping[str, str], key: str) -> dict:
    if key not in metadata:
        found = sorted(metadata) or "none"
        raise MissingMetadataError(
            f"{path}: safetensors metadata has no {key!r} entry (found keys: {found}); this is not a "
            f"DiT Cache Bridge file of that kind. Use a file saved by DiT Cache Bridge."
        )
    try:
        meta = json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise InvalidMetadataError(f"{path}: metadata {key!r} is not valid JSON ({exc}); the file is damaged or foreign.") from None
    if not isinstance(meta, dict):
        raise InvalidMetadataError(f"{path}: metadata {key!r} is a JSON {type(meta).__name__}; expected an object.")
    return meta


def read_meta(path: str | os.PathLike, key: str) -> dict:
    """The JSON object stored under metadata ``key``; reads the header only."""
    metadata, _ = read_header(path)
    return _parse_meta(Path(path), metadata, key)


def load_tensors(path: str | os.PathLike, names, device="cpu", dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """Read the named tensors (call after validating the header)."""
    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name in names:
            t = f.get_tensor(name)
            out[name] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
    return out


# ----------------------------------------------------------------------------------------------
# projector bundles


@dataclass
class ProjectorBundle:
    """A loaded bundle: the bank (eval mode) plus what it was made for and how."""

    bank: ProjectorBank
    layer_map: LayerMap
    sharer: ModelSignature
    receiver: ModelSignature
    provenance: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def save_bundle(
    path: str | os.PathLike,
    bank: ProjectorBank,
    layer_map: LayerMap,
    provenance: Optional[Mapping] = None,
) -> None:
    """Write ``bank`` and ``layer_map`` as one ``.safetensors`` bundle (see module docstring)."""
    path = Path(path)
    if bank.layers != layer_map.layers:
        raise BundleError(
            f"{path}: bank covers receiver layers {bank.layers} but the layer map fuses "
            f"{layer_map.layers}; expected the same layers. Build the bank with layers=layer_map.layers."
        )
    try:
        layer_map.validate(bank.sharer, bank.receiver)
    except C2CError as exc:
        raise BundleError(f"{path}: layer map does not fit the bank's models: {exc}") from None
    meta = {
        "format_version": FORMAT_VERSION,
        "projector": {"kind": bank.kind, "hparams": dict(bank.hparams)},
        "sharer": bank.sharer.to_dict(),
        "receiver": bank.receiver.to_dict(),
        "layer_map": layer_map.to_dict(),
        "provenance": dict(provenance or {}),
    }
    save_tensors_with_meta(path, bank.state_dict(), meta, BUNDLE_KEY)


def _field(path: Path, meta: Mapping, name: str, kind: type) -> Any:
    if name not in meta:
        raise InvalidMetadataError(f"{path}: bundle metadata lacks {name!r}; expected keys format_version, projector, sharer, receiver, layer_map.")
    value = meta[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = {int: "an integer", dict: "a JSON object"}.get(kind, kind.__name__)
        raise InvalidMetadataError(f"{path}: bundle metadata {name!r} is {value!r}; expected {expected}.")
    return value


@dataclass
class _Plan:
    """Everything load_bundle validated from the header, before any tensor is read."""

    meta: dict
    kind: str
    hparams: dict
    sharer: ModelSignature
    receiver: ModelSignature
    layer_map: LayerMap
    entries: dict


def read_bundle_header(path: str | os.PathLike) -> dict:
    """The validated bundle metadata (kind, signatures, map, provenance) without reading tensors."""
    return _plan(Path(path)).meta


def _plan(path: Path) -> _Plan:
    metadata, entries = read_header(path)
    meta = _parse_meta(path, metadata, BUNDLE_KEY)
    version = _field(path, meta, "format_version", int)
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path}: bundle format version {version} is newer than this DiT Cache Bridge reads "
            f"(up to {FORMAT_VERSION}); update DiT Cache Bridge."
        )
    if version < 1:
        raise InvalidMetadataError(f"{path}: bundle format version {version}; expected 1..{FORMAT_VERSION}.")
    projector = _field(path, meta, "projector", dict)
    kind = projector.get("kind")
    hparams = projector.get("hparams", {})
    if kind not in PROJECTORS:
        raise BundleUnknownProjectorError(
            f"{path}: projector kind {kind!r} is unknown to this version (known: "
            f"{', '.join(known_kinds())}); update DiT Cache Bridge or re-export the bundle."
        )
    if not isinstance(hparams, dict):
        raise InvalidMetadataError(f"{path}: projector hparams are {hparams!r}; expected an object.")
    try:
        sharer = ModelSignature.from_dict(_field(path, meta, "sharer", dict))
        receiver = ModelSignature.from_dict(_field(path, meta, "receiver", dict))
        layer_map = LayerMap.from_dict(_field(path, meta, "layer_map", dict))
        layer_map.validate(sharer, receiver)
    except InvalidMetadataError:
        raise
    except C2CError as exc:
        raise InvalidMetadataError(f"{path}: bundle metadata is inconsistent: {exc}") from None
    return _Plan(meta, kind, hparams, sharer, receiver, layer_map, entries)


def _expected_tensors(path: Path, plan: _Plan) -> tuple[ProjectorBank, dict[str, tuple[int, ...]]]:
    try:
        with torch.device("meta"):
            skeleton = ProjectorBank.build(plan.kind, plan.sharer, plan.receiver, plan.layer_map.layers, **plan.hparams)
    except C2CError as exc:
        raise InvalidMetadataError(f"{path}: the bundle's projector settings are invalid: {exc}") from None
    return skeleton, {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}


def _check_tensors(path: Path, expected: Mapping[str, tuple], entries: Mapping[str, tuple]) -> None:
    missing = sorted(set(expected) - set(entries))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MissingTensorError(
            f"{path}: missing tensors {missing[:5]}{more} that the projector bank needs; the file is "
            f"incomplete or was saved from a different bank. Re-export it."
        )
    unexpected = sorted(set(entries) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise UnexpectedTensorError(
            f"{path}: unexpected tensors {unexpected[:5]}{more} that the projector bank does not have; "
            f"the metadata does not describe these weights. Re-export the bundle."
        )
    for name, shape in expected.items():
        found, dtype = entries[name]
        if found != shape:
            raise ShapeMismatchError(
                f"{path}: tensor {name!r} has shape {list(found)}; expected {list(shape)} from the "
                f"metadata's projector settings. The file is inconsistent; re-export it."
            )
        if dtype not in _FLOAT_DTYPES:
            raise ShapeMismatchError(
                f"{path}: tensor {name!r} has dtype {dtype}; expected a float type ({sorted(_FLOAT_DTYPES)})."
            )


def load_bundle(path: str | os.PathLike, device="cpu", dtype: Optional[torch.dtype] = None) -> ProjectorBundle:
    """Validate the whole header, then build the bank on ``device`` and read its tensors.

    ``dtype=None`` keeps the stored dtype (float32 when the file mixes dtypes). The bank is
    returned in eval mode.
    """
    path = Path(path)
    plan = _plan(path)
    bank, expected = _expected_tensors(path, plan)
    _check_tensors(path, expected, plan.entries)
    if dtype is None:
        stored = {dt for _, dt in plan.entries.values()}
        dtype = _TORCH_DTYPES[stored.pop()] if len(stored) == 1 else torch.float32
    bank = bank.to(dtype=dtype).to_empty(device=device)
    targets = bank.state_dict(keep_vars=True)
    with safe_open(str(path), framework="pt", device="cpu") as f, torch.no_grad():
        for name in expected:  # one tensor at a time: peak memory is the bank plus one tensor
            targets[name].copy_(f.get_tensor(name))
    bank.reset_state()
    bank.eval()
    return ProjectorBundle(
        bank=bank,
        layer_map=plan.layer_map,
        sharer=plan.sharer,
        receiver=plan.receiver,
        provenance=dict(plan.meta.get("provenance") or {}),
        metadata=plan.meta,
    )
