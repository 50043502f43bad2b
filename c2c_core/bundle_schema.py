"""What a projector bundle's header must say, checked before a single weight is read.

A bundle is a stranger's download, so :func:`read_plan` validates the whole metadata (format version,
both signatures and their architecture tags, projector kind and settings within sane ceilings, layer
maps that fit the signatures, for the forward and the optional backward bank) and
:func:`expected_tensors` derives every tensor name and shape from one projector built on the meta
device (no memory), so :func:`check_tensors` can compare them with the header before the loader
allocates anything. ``bundle.py`` does the loading; docs/bundle_format.md describes the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .errors import (
    BundleUnknownProjectorError,
    C2CError,
    FormatVersionError,
    InvalidMetadataError,
    MissingTensorError,
    NonFiniteWeightsError,
    ShapeMismatchError,
    UnexpectedTensorError,
    quote,
)
from .mapping import LayerMap
from .projectors import PROJECTORS, build_projector, known_kinds, resolve_kind
from .signature import ModelSignature
from .tensorfile import FLOAT_DTYPES, Snapshot, parse_meta, short_path, snapshot

__all__ = [
    "FORMAT_VERSION",
    "BUNDLE_KEY",
    "BACKWARD_PREFIX",
    "HPARAM_LIMITS",
    "MAX_WIDTH",
    "MAX_SIGNATURE",
    "MAX_WEIGHT",
    "BankPlan",
    "BundlePlan",
    "read_plan",
    "expected_tensors",
    "check_tensors",
    "check_finite",
]

#: 2 adds the optional backward bank; a bundle without one is still written as version 1
FORMAT_VERSION = 2
BUNDLE_KEY = "c2c_bundle"
#: tensor-name prefix of the backward (receiver -> sharer) bank
BACKWARD_PREFIX = "backward."


def _field(path: Path, meta: Mapping, name: str, kind: type) -> Any:
    if name not in meta:
        raise InvalidMetadataError(f"{short_path(path)}: bundle metadata lacks {name!r}; expected keys format_version, projector, sharer, receiver, layer_map.")
    value = meta[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = {int: "an integer", dict: "a JSON object"}.get(kind, kind.__name__)
        raise InvalidMetadataError(f"{short_path(path)}: bundle metadata {name!r} is {quote(value)}; expected {expected}.")
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
class BankPlan:
    """One bank as the header declares it (projector kind, settings, layer map), validated."""

    kind: str
    hparams: dict
    sharer: ModelSignature
    receiver: ModelSignature
    layer_map: LayerMap
    prefix: str = ""


@dataclass
class BundlePlan:
    """Everything load_bundle validated from the header, before any tensor is read."""

    meta: dict
    forward: BankPlan
    backward: Optional[BankPlan]
    snapshot: Snapshot

    @property
    def entries(self) -> dict:
        return self.snapshot.header()


def _signature(path: Path, meta: Mapping, role: str) -> ModelSignature:
    d = _field(path, meta, role, dict)
    for name, limit in MAX_SIGNATURE.items():
        value = d.get(name)
        if type(value) is int and value > limit:
            raise InvalidMetadataError(f"{short_path(path)}: {role} {name} is {quote(value, 40)}; expected at most "
                                       f"{limit}. The file is damaged or not a DiT Cache Bridge bundle.")
    if not isinstance(d.get("name", ""), str):
        raise InvalidMetadataError(f"{short_path(path)}: {role} name is {quote(d.get('name'))}; expected a string.")
    sig = ModelSignature.from_dict(d)
    arch = sig.arch
    if arch is not None and arch.kv_shape() != (sig.num_layers, sig.num_heads, sig.width):
        layers, heads, width = arch.kv_shape()
        raise InvalidMetadataError(
            f"{short_path(path)}: the {role}'s architecture tag ({layers} layers, {heads} K/V heads, K/V width "
            f"{width}) contradicts its signature ({sig.num_layers} layers, {sig.num_heads} heads × {sig.head_dim}); "
            f"the file is damaged. Re-export it.")
    return sig


def _check_hparams(path: Path, kind: str, hparams: dict) -> None:
    for name, value in hparams.items():
        if not isinstance(name, str) or len(name) > 64:
            raise InvalidMetadataError(f"{short_path(path)}: projector hparam name {quote(name, 60)}; expected a short name.")
        limit = HPARAM_LIMITS.get(name, MAX_WIDTH)
        if isinstance(value, int) and not isinstance(value, bool) and not -limit <= value <= limit:
            raise InvalidMetadataError(
                f"{short_path(path)}: projector {kind!r} {name}={quote(value, 40)}; expected at most {limit}. "
                f"The file is damaged or was not written by DiT Cache Bridge."
            )
        if not isinstance(value, (int, float, str, bool)) or (isinstance(value, str) and len(value) > 64):
            raise InvalidMetadataError(f"{short_path(path)}: projector {kind!r} {name}={quote(value, 60)}; "
                                       f"expected a number, a boolean or a short string.")


def _bank_plan(path: Path, where: Mapping, sharer: ModelSignature, receiver: ModelSignature, prefix: str) -> BankPlan:
    """Kind, settings and layer map of one bank (``where`` is the metadata object holding them)."""
    label = "backward " if prefix else ""
    projector = _field(path, where, "projector", dict)
    kind = projector.get("kind")
    hparams = projector.get("hparams", {})
    if not isinstance(kind, str) or kind not in PROJECTORS:
        raise BundleUnknownProjectorError(
            f"{short_path(path)}: {label}projector kind {quote(kind, 60)} is unknown to this version (known: "
            f"{', '.join(known_kinds())}); update DiT Cache Bridge or re-export the bundle."
        )
    if not isinstance(hparams, dict):
        raise InvalidMetadataError(f"{short_path(path)}: {label}projector hparams are {quote(hparams, 60)}; expected an object.")
    _check_hparams(path, kind, hparams)
    try:
        layer_map = LayerMap.from_dict(_field(path, where, "layer_map", dict))
        layer_map.validate(sharer, receiver)
    except InvalidMetadataError:
        raise
    except (C2CError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidMetadataError(f"{short_path(path)}: {label}bundle metadata is inconsistent: {quote(str(exc), 300)}") from None
    return BankPlan(kind, hparams, sharer, receiver, layer_map, prefix)


def read_plan(path: Path) -> BundlePlan:
    snap = snapshot(path)
    meta = parse_meta(path, snap.metadata, BUNDLE_KEY)
    version = _field(path, meta, "format_version", int)
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{short_path(path)}: bundle format version {quote(version, 40)} is newer than this DiT Cache Bridge reads "
            f"(up to {FORMAT_VERSION}); update DiT Cache Bridge."
        )
    if version < 1:
        raise InvalidMetadataError(f"{short_path(path)}: bundle format version {quote(version, 40)}; expected 1..{FORMAT_VERSION}.")
    if not isinstance(meta.get("provenance", {}), dict):
        raise InvalidMetadataError(f"{short_path(path)}: bundle provenance is {quote(meta['provenance'], 60)}; expected an object.")
    _field(path, meta, "projector", dict)
    try:
        sharer = _signature(path, meta, "sharer")
        receiver = _signature(path, meta, "receiver")
    except InvalidMetadataError:
        raise
    except (C2CError, TypeError, ValueError, OverflowError) as exc:
        raise InvalidMetadataError(f"{short_path(path)}: bundle metadata is inconsistent: {quote(str(exc), 300)}") from None
    forward = _bank_plan(path, meta, sharer, receiver, "")
    backward = None
    if "backward" in meta:
        if version < 2:     # format 1 has no backward bank: such a header was edited or written by something else
            raise InvalidMetadataError(
                f"{short_path(path)}: bundle format version 1 carries a backward bank; expected format version 2 for "
                f"a bundle with one. Save it again with DiT Cache Bridge (save_projector_bundle) or use another file.")
        backward = _bank_plan(path, _field(path, meta, "backward", dict), receiver, sharer, BACKWARD_PREFIX)
    return BundlePlan(meta, forward, backward, snap)


def expected_tensors(path: Path, plan: BankPlan) -> dict[str, tuple[int, ...]]:
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
        raise InvalidMetadataError(f"{short_path(path)}: the bundle's {label}projector settings are invalid: {quote(str(exc), 300)}") from None
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise InvalidMetadataError(f"{short_path(path)}: the bundle's {label}projector settings cannot be built "
                                   f"({quote(str(exc), 200)}); the file is damaged.") from None
    return {f"{plan.prefix}{w}.{i}.{n}": s for w in ("k", "v") for i in plan.layer_map.layers for n, s in shapes.items()}


def check_tensors(path: Path, expected: Mapping[str, tuple], entries: Mapping[str, tuple]) -> None:
    missing = sorted(set(expected) - set(entries))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MissingTensorError(
            f"{short_path(path)}: missing tensors {quote(missing[:5], 300)}{more} that the projector bank needs; the file is "
            f"incomplete or was saved from a different bank. Re-export it."
        )
    unexpected = sorted(set(entries) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise UnexpectedTensorError(
            f"{short_path(path)}: unexpected tensors {quote(unexpected[:5], 300)}{more} that the projector bank does not have; "
            f"the metadata does not describe these weights. Re-export the bundle."
        )
    for name, shape in expected.items():
        found, dtype = entries[name]
        if found != shape:
            raise ShapeMismatchError(
                f"{short_path(path)}: tensor {name!r} has shape {quote(list(found), 80)}; expected {list(shape)} from the "
                f"metadata's projector settings. The file is inconsistent; re-export it."
            )
        if dtype not in FLOAT_DTYPES:
            raise ShapeMismatchError(
                f"{short_path(path)}: tensor {name!r} has dtype {dtype}; expected a float type ({sorted(FLOAT_DTYPES)})."
            )


def check_finite(path, name: str, t: Tensor, saving: bool = False) -> None:
    """Refuse NaN/Inf and magnitudes above MAX_WEIGHT in a weight: once at load time, and before a save
    (``saving``), so that no file is written that a loader would refuse."""
    if t.numel() == 0 or not t.is_floating_point():
        return
    worst = t.detach().abs().amax().float()
    if not bool(torch.isfinite(worst)) or float(worst) > MAX_WEIGHT:
        what = "NaN or Inf values" if not bool(torch.isfinite(worst)) else f"a weight of magnitude {float(worst):.3g}"
        if saving:
            raise NonFiniteWeightsError(
                f"refusing to write {short_path(path)}: tensor {quote(name, 80)} holds {what}; expected finite "
                f"weights below {MAX_WEIGHT:g} (Load C2C Projector would refuse the file). The training diverged: "
                f"lower the learning rate, resume from an earlier checkpoint or start a new run."
            )
        raise NonFiniteWeightsError(
            f"{short_path(path)}: tensor {quote(name, 80)} holds {what}; expected finite weights below "
            f"{MAX_WEIGHT:g} (the output would be NaN or black). The file is damaged or its training diverged; "
            f"use an earlier checkpoint or re-train."
        )
