"""Which sharer layer feeds which receiver layer, and how strongly.

Two DiTs rarely have the same depth (Wan2.1 1.3B: 30 layers, 14B: 40), so a bridge needs a map
from receiver layers to sharer layers. Kinds, for R receiver and S sharer layers:

- ``identity``: i -> i, needs R == S.
- ``terminal``: last layers aligned (C2C's default): i -> i + (S - R), where that is >= 0; for
  R > S the first R - S receiver layers get no sharer.
- ``position``: nearest relative depth: i -> floor(i * (S-1) / (R-1) + 1/2), every receiver layer.
- ``uniform``: min(R, S) one-to-one pairs spread evenly over the deeper model; equals ``position``
  when R <= S, uses every sharer layer once when R > S.
- ``custom``: the pairs given.

``layers`` restricts any kind to a subset of receiver layers (their intersection); indices out of
range are an error, so are restrictions that leave nothing to fuse.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from .errors import LayerMapError
from .signature import ModelSignature

__all__ = ["LayerMap", "LAYER_MAP_KINDS", "COMPUTED_MAP_KINDS", "parse_layer_spec", "LayerMapError"]

#: Kinds computed from the two depths alone (what a node offers; C2C's default ``terminal`` first).
COMPUTED_MAP_KINDS = ("terminal", "identity", "position", "uniform")
#: Every kind a LayerMap may have: ``custom`` takes its pairs from the caller.
LAYER_MAP_KINDS = COMPUTED_MAP_KINDS + ("custom",)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LayerMapError(f"LayerMap: {name}={value!r}; expected a positive layer count.")
    return value


def _spread(j: int, m: int, length: int) -> int:
    """The j-th of m evenly spaced indices over 0..length-1, rounded half up (exact integers)."""
    if m == 1:
        return 0
    return (2 * j * (length - 1) + (m - 1)) // (2 * (m - 1))


def _pairs_for(kind: str, sharer_layers: int, receiver_layers: int) -> dict[int, int]:
    s, r = sharer_layers, receiver_layers
    if kind == "identity":
        if r != s:
            raise LayerMapError(
                f"layer map 'identity' needs equal depths; receiver has {r} layers, sharer {s}. "
                f"Use 'terminal', 'position' or 'uniform' for models of different depth."
            )
        return {i: i for i in range(r)}
    if kind == "terminal":
        offset = s - r
        return {i: i + offset for i in range(r) if i + offset >= 0}
    if kind == "position":
        return {i: _spread(i, r, s) for i in range(r)}
    if kind == "uniform":
        if r <= s:
            return {i: _spread(i, r, s) for i in range(r)}
        return {_spread(j, s, r): j for j in range(s)}
    raise LayerMapError(f"unknown layer map kind {kind!r}; expected one of {LAYER_MAP_KINDS}.")


@dataclass
class LayerMap:
    """Receiver layer -> sharer layer pairs with a per-receiver-layer strength (default 1.0)."""

    kind: str
    sharer_layers: int
    receiver_layers: int
    pairs: dict[int, int]
    strengths: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in LAYER_MAP_KINDS:
            raise LayerMapError(f"unknown layer map kind {self.kind!r}; expected one of {LAYER_MAP_KINDS}.")
        _count("sharer_layers", self.sharer_layers)
        _count("receiver_layers", self.receiver_layers)
        if not isinstance(self.pairs, Mapping) or not self.pairs:
            raise LayerMapError(
                f"layer map {self.kind!r} has no pairs ({self.pairs!r}); expected at least one "
                f"receiver -> sharer pair. Check the layer selection."
            )
        pairs: dict[int, int] = {}
        for r, s in self.pairs.items():
            r_i, s_i = _index("receiver", r, self.receiver_layers), _index("sharer", s, self.sharer_layers)
            pairs[r_i] = s_i
        self.pairs = dict(sorted(pairs.items()))
        strengths: dict[int, float] = {}
        for r, value in (self.strengths or {}).items():
            r_i = _index("receiver", r, self.receiver_layers)
            if r_i not in self.pairs:
                raise LayerMapError(
                    f"strength given for receiver layer {r_i}, which the map does not fuse; fused "
                    f"layers are {list(self.pairs)}. Drop it or add the layer."
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise LayerMapError(
                    f"strength for receiver layer {r_i} is {value!r}; expected a finite number >= 0."
                )
            strengths[r_i] = float(value)
        self.strengths = dict(sorted(strengths.items()))

    @classmethod
    def build(
        cls,
        kind: str,
        sharer_layers: int,
        receiver_layers: int,
        layers: Optional[Iterable[int]] = None,
        custom: Optional[Mapping[int, int]] = None,
        strengths: Optional[Mapping[int, float]] = None,
    ) -> "LayerMap":
        """Build a map of ``kind`` between models of the given depths (see module docstring)."""
        s, r = _count("sharer_layers", sharer_layers), _count("receiver_layers", receiver_layers)
        if kind == "custom":
            if not custom:
                raise LayerMapError(
                    "layer map 'custom' needs custom={receiver_layer: sharer_layer, ...}; got none."
                )
            pairs = dict(custom)
        else:
            if custom:
                raise LayerMapError(f"custom pairs were given with kind {kind!r}; use kind='custom'.")
            pairs = _pairs_for(kind, s, r)
        if layers is not None:
            wanted = sorted({_index("receiver", i, r) for i in layers})
            kept = {i: pairs[i] for i in wanted if i in pairs}
            if not kept:
                raise LayerMapError(
                    f"layer map {kind!r} ({r} receiver / {s} sharer layers) fuses none of the "
                    f"selected layers {wanted}; it maps receiver layers {sorted(pairs)}. Select some of those."
                )
            pairs = kept
        return cls(kind, s, r, pairs, dict(strengths or {}))

    @property
    def layers(self) -> list[int]:
        """Fused receiver layers, ascending."""
        return list(self.pairs)

    def sharer_layer(self, layer: int) -> int:
        try:
            return self.pairs[layer]
        except KeyError:
            raise LayerMapError(
                f"receiver layer {layer} is not fused by this {self.kind!r} map; fused layers are {self.layers}."
            ) from None

    def strength(self, layer: int) -> float:
        return self.strengths.get(layer, 1.0)

    def validate(self, sharer: ModelSignature, receiver: ModelSignature) -> None:
        """Raise LayerMapError unless this map fits models with these signatures."""
        if (self.sharer_layers, self.receiver_layers) != (sharer.num_layers, receiver.num_layers):
            raise LayerMapError(
                f"layer map was built for {self.receiver_layers} receiver / {self.sharer_layers} "
                f"sharer layers; the models have {receiver.num_layers} / {sharer.num_layers}. "
                f"Rebuild the map (or load the bundle made for these models)."
            )

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "sharer_layers": self.sharer_layers,
            "receiver_layers": self.receiver_layers,
            "pairs": {str(r): s for r, s in self.pairs.items()},
            "strengths": {str(r): v for r, v in self.strengths.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "LayerMap":
        if not isinstance(d, Mapping):
            raise LayerMapError(f"LayerMap.from_dict got {type(d).__name__}; expected a dict.")
        missing = [k for k in ("kind", "sharer_layers", "receiver_layers", "pairs") if k not in d]
        if missing:
            raise LayerMapError(f"LayerMap.from_dict: missing {missing}; got keys {sorted(d)}.")
        try:
            pairs = {int(r): int(s) for r, s in dict(d["pairs"]).items()}
            strengths = {int(r): v for r, v in dict(d.get("strengths") or {}).items()}
        except (TypeError, ValueError) as exc:
            raise LayerMapError(f"LayerMap.from_dict: pairs/strengths must map layer numbers; {exc}.") from None
        return cls(d["kind"], d["sharer_layers"], d["receiver_layers"], pairs, strengths)


def _index(side: str, value: Any, count: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
        raise LayerMapError(
            f"{side} layer {value!r} is out of range; the {side} has {count} layers (0..{count - 1})."
        )
    return value


_SPEC_HELP = "accepted: 'all', 'first4', 'last4', '7', '-1' (last), '0-3' (inclusive), combined with commas"
_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_EDGE = re.compile(r"^(first|last)\s*(\d+)$")


def parse_layer_spec(text: str, num_layers: int) -> list[int]:
    """Parse a layer selection typed by a user (e.g. "0-3,7,last4") into sorted unique indices."""
    n = _count("num_layers", num_layers)
    if not isinstance(text, str) or not text.strip():
        raise LayerMapError(f"layer selection is empty; {_SPEC_HELP}.")
    chosen: set[int] = set()
    for raw in text.split(","):
        token = raw.strip().lower()
        if not token:
            raise LayerMapError(f"layer selection {text!r} has an empty item between commas; {_SPEC_HELP}.")
        if token == "all":
            chosen.update(range(n))
            continue
        edge, span = _EDGE.match(token), _RANGE.match(token)
        if edge:
            k = int(edge.group(2))
            if not 1 <= k <= n:
                raise LayerMapError(f"layer selection item {token!r}: count must be 1..{n} for a {n}-layer model.")
            chosen.update(range(k) if edge.group(1) == "first" else range(n - k, n))
        elif span:
            lo, hi = int(span.group(1)), int(span.group(2))
            if lo > hi:
                raise LayerMapError(f"layer selection item {token!r} runs backwards; write {hi}-{lo}.")
            if hi >= n:
                raise LayerMapError(f"layer selection item {token!r} goes past the last layer {n - 1} of a {n}-layer model.")
            chosen.update(range(lo, hi + 1))
        elif re.fullmatch(r"-?\d+", token):
            i = int(token)
            if not -n <= i < n:
                raise LayerMapError(f"layer selection item {token!r} is out of range for a {n}-layer model (0..{n - 1}, or -1..-{n}).")
            chosen.add(i % n)
        else:
            raise LayerMapError(f"layer selection item {token!r} in {text!r} is not understood; {_SPEC_HELP}.")
    return sorted(chosen)
