"""Projector bundles: one ``.safetensors`` file with the bank's tensors and JSON metadata.

Metadata: ``__metadata__["c2c_bundle"]`` = JSON ``{format_version, projector: {kind, hparams},
sharer, receiver, layer_map, provenance[, backward: {projector, layer_map}]}``; ``sharer`` and
``receiver`` may carry ``arch``, the host-neutral architecture tag (c2c_core.arch). Tensors:
``bank.state_dict()`` (names like ``k.12.mlp.0.weight``), and the optional backward (receiver ->
sharer) bank's under ``backward.``. docs/bundle_format.md describes the format.

Loading is strict and staged, since shared projectors are downloads: the file layer
(``tensorfile.py``) refuses pickle formats and reads only a bounded header, the schema
(``bundle_schema.py``) validates the metadata and every tensor's name, shape and dtype against a bank
built on the meta device, and only then does :func:`load_bundle` build the bank and read its tensors,
one at a time, refusing NaN/Inf. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch

from .arch import ArchTag
from .bundle_schema import (BACKWARD_PREFIX, BUNDLE_KEY, FORMAT_VERSION, BankPlan, check_finite, check_tensors,
                            expected_tensors, read_plan)
from .errors import BundleError, C2CError
from .mapping import LayerMap
from .projectors import ProjectorBank
from .signature import ModelSignature
from .tensorfile import SAFETENSORS_DTYPES, Snapshot, save_tensors_with_meta, short_path

__all__ = [
    "ProjectorBundle",
    "ArchMismatch",
    "arch_mismatches",
    "with_backward",
    "tag_bank",
    "save_bundle",
    "save_projector_bundle",
    "load_bundle",
]


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
        _check_backward_fits(bank, back, short_path(path))
        _check_bank_map(path, back, back_map, "backward ")
        meta["format_version"] = FORMAT_VERSION
        meta["backward"] = {"projector": {"kind": back.kind, "hparams": dict(back.hparams)},
                            "layer_map": back_map.to_dict()}
        tensors.update({BACKWARD_PREFIX + name: t for name, t in back.state_dict().items()})
    for name, t in tensors.items():     # a file every loader would refuse is never written
        check_finite(path, name, t, saving=True)
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


def _load_bank(path: Path, plan: BankPlan, snap: Snapshot, expected: Mapping[str, tuple], device,
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
    plan = read_plan(path)
    plans = [p for p in (plan.forward, plan.backward) if p is not None]
    expected = [expected_tensors(path, p) for p in plans]
    check_tensors(path, {name: shape for one in expected for name, shape in one.items()}, plan.entries)
    if dtype is None:
        stored = {dt for _, dt in plan.entries.values()}
        dtype = SAFETENSORS_DTYPES[stored.pop()][0] if len(stored) == 1 else torch.float32
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
