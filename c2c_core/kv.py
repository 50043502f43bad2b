"""Per-layer self-attention K/V in one canonical layout, plus what describes it.

Canonical layout of one layer's K or V: ``(B, N, H, D)`` = batch, tokens, heads, head_dim.
Why one layout: the projectors, the aligner and the bundle all agree on it, and ComfyUI's
attention path hands K/V as ``(B, N, H*D)``, which :func:`to_heads` views into it without a copy.
Tokens run frames-major, then height, then width, as in Wan's patch embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor

from .arch import ArchTag
from .errors import KVShapeError, MissingLayerError, SignatureError

__all__ = [
    "ModelSignature",
    "TokenGrid",
    "LayerKV",
    "KVCache",
    "to_heads",
    "from_heads",
    "KVShapeError",
    "MissingLayerError",
    "SignatureError",
]


def _positive_int(owner: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SignatureError(
            f"{owner}.{field} is {value!r}; expected a positive integer. "
            f"Read it from the model's config (e.g. Wan2.1-14B: 40 layers, 40 heads, head_dim 128)."
        )
    return value


def _from_dict(cls_name: str, d: Any, fields: tuple[str, ...]) -> dict:
    if not isinstance(d, Mapping):
        raise SignatureError(f"{cls_name}.from_dict got {type(d).__name__}; expected a dict with {fields}.")
    missing = [f for f in fields if f not in d]
    if missing:
        raise SignatureError(
            f"{cls_name}.from_dict: missing {missing} in {dict(d)!r}; expected keys {fields}. "
            f"The dict was probably written by another tool; re-save it with DiT Cache Bridge."
        )
    return {f: d[f] for f in fields}


@dataclass(frozen=True)
class ModelSignature:
    """The attention shape of a DiT: what a projector needs to know about one side of a bridge.

    ``name`` is a label for humans (e.g. "wan2.1-t2v-14b") and takes part in equality; use
    :meth:`same_shape` to compare only the numbers. ``arch`` (optional, not part of equality) is the
    host-neutral architecture tag (c2c_core.arch) that hosts set when they read a model, so a bundle
    records which networks it was made for.
    """

    num_layers: int
    num_heads: int
    head_dim: int
    name: str = ""
    arch: Optional[ArchTag] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_heads", "head_dim"):
            _positive_int("ModelSignature", field, getattr(self, field))
        if not isinstance(self.name, str):
            raise SignatureError(f"ModelSignature.name is {self.name!r}; expected a string.")
        if self.arch is not None and not isinstance(self.arch, ArchTag):
            raise SignatureError(f"ModelSignature.arch is {type(self.arch).__name__}; expected an ArchTag or None.")

    @property
    def width(self) -> int:
        """Flattened K/V width ``H * D`` (the model's attention dim)."""
        return self.num_heads * self.head_dim

    def same_shape(self, other: "ModelSignature") -> bool:
        """True when layers, heads and head_dim agree (names may differ)."""
        return (self.num_layers, self.num_heads, self.head_dim) == (
            other.num_layers,
            other.num_heads,
            other.head_dim,
        )

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "name": self.name,
            **({"arch": self.arch.to_dict()} if self.arch is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelSignature":
        values = _from_dict("ModelSignature", d, ("num_layers", "num_heads", "head_dim"))
        arch = ArchTag.from_dict(d["arch"]) if d.get("arch") is not None else None
        return cls(**values, name=d.get("name", ""), arch=arch)


@dataclass(frozen=True)
class TokenGrid:
    """The latent token grid ``(frames, height, width)`` after patchify; ``numel`` = N."""

    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for field in ("frames", "height", "width"):
            _positive_int("TokenGrid", field, getattr(self, field))

    @property
    def numel(self) -> int:
        return self.frames * self.height * self.width

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    def to_dict(self) -> dict:
        return {"frames": self.frames, "height": self.height, "width": self.width}

    @classmethod
    def from_dict(cls, d: Mapping) -> "TokenGrid":
        return cls(**_from_dict("TokenGrid", d, ("frames", "height", "width")))


@dataclass
class LayerKV:
    """One layer's K and V, each ``(B, N, H, D)`` with identical shapes."""

    k: Tensor
    v: Tensor

    def __post_init__(self) -> None:
        if self.k.dim() != 4 or self.v.dim() != 4:
            raise KVShapeError(
                f"LayerKV got k {tuple(self.k.shape)} and v {tuple(self.v.shape)}; expected 4-D "
                f"(B, N, H, D). Use to_heads(x, heads) on a (B, N, H*D) tensor first."
            )
        if self.k.shape != self.v.shape:
            raise KVShapeError(
                f"LayerKV got k {tuple(self.k.shape)} but v {tuple(self.v.shape)}; expected equal "
                f"shapes (self-attention K and V share B, N, H, D)."
            )

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def to(self, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> "LayerKV":
        """Move/cast both tensors; tensors already on that device and dtype are not copied."""
        return LayerKV(self.k.to(device=device, dtype=dtype), self.v.to(device=device, dtype=dtype))


class KVCache:
    """Captured K/V of some layers of one model for one token grid.

    Holds exactly the layers it was given (memory is what the fused layers need, no more).
    Validates on construction so that a wrong capture fails where it was made, not deep in fusion.
    """

    def __init__(self, signature: ModelSignature, grid: TokenGrid, layers: Mapping[int, LayerKV]):
        self.signature = signature
        self.grid = grid
        self._layers: dict[int, LayerKV] = {}
        batch = None
        for index in sorted(layers):
            kv = layers[index]
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < signature.num_layers:
                raise KVShapeError(
                    f"KVCache layer index {index!r} is outside 0..{signature.num_layers - 1} "
                    f"(signature {signature.name or 'unnamed'} has {signature.num_layers} layers)."
                )
            if not isinstance(kv, LayerKV):
                raise KVShapeError(f"KVCache layer {index} is a {type(kv).__name__}; expected LayerKV(k, v).")
            b, n, h, d = kv.k.shape
            if n != grid.numel:
                raise KVShapeError(
                    f"KVCache layer {index} has N={n} tokens; expected grid {grid.shape} -> "
                    f"{grid.numel} tokens. Capture and grid must come from the same latent."
                )
            if (h, d) != (signature.num_heads, signature.head_dim):
                raise KVShapeError(
                    f"KVCache layer {index} has H={h}, D={d}; expected H={signature.num_heads}, "
                    f"D={signature.head_dim} from the signature. Was the capture taken from another model?"
                )
            if batch is not None and b != batch:
                raise KVShapeError(
                    f"KVCache layer {index} has batch {b}, earlier layers have {batch}; expected one "
                    f"batch size per cache (key captures by CFG chunk)."
                )
            batch = b
            self._layers[index] = kv

    @property
    def layer_indices(self) -> list[int]:
        return list(self._layers)

    @property
    def nbytes(self) -> int:
        return sum(kv.nbytes for kv in self._layers.values())

    def __getitem__(self, index: int) -> LayerKV:
        try:
            return self._layers[index]
        except KeyError:
            raise MissingLayerError(
                f"KVCache has no layer {index}; it holds layers {self.layer_indices}. "
                f"Capture that layer (add it to the layer selection) or fuse fewer layers."
            ) from None

    def __contains__(self, index: object) -> bool:
        return index in self._layers

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self):
        return iter(self._layers)

    def items(self):
        return self._layers.items()

    def to(self, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> "KVCache":
        return KVCache(self.signature, self.grid, {i: kv.to(device, dtype) for i, kv in self._layers.items()})

    def select(self, layer_indices: Iterable[int]) -> "KVCache":
        """A cache sharing these layers' tensors (no copy)."""
        wanted = sorted(set(layer_indices))
        missing = [i for i in wanted if i not in self._layers]
        if missing:
            raise MissingLayerError(
                f"KVCache.select: layers {missing} are not captured; the cache holds "
                f"{self.layer_indices}. Capture those layers or select fewer."
            )
        return KVCache(self.signature, self.grid, {i: self._layers[i] for i in wanted})

    def __repr__(self) -> str:
        return (
            f"KVCache({self.signature.name or 'unnamed'}, grid={self.grid.shape}, "
            f"layers={self.layer_indices}, {self.nbytes / 2**20:.1f} MiB)"
        )


def to_heads(x: Tensor, heads: int) -> Tensor:
    """View ``(B, N, H*D)`` as ``(B, N, H, D)`` without copying."""
    if x.dim() != 3:
        raise KVShapeError(f"to_heads expects (B, N, H*D); got shape {tuple(x.shape)}.")
    width = x.shape[-1]
    if heads < 1 or width % heads:
        raise KVShapeError(
            f"to_heads: last dim {width} is not divisible by heads={heads}; expected H*D. "
            f"Pass the model's num_heads."
        )
    try:
        return x.view(x.shape[0], x.shape[1], heads, width // heads)
    except RuntimeError as exc:
        raise KVShapeError(
            f"to_heads: tensor with strides {x.stride()} cannot be viewed as heads without a copy; "
            f"expected the last dim to be contiguous. Call .contiguous() first. ({exc})"
        ) from None


def from_heads(x: Tensor) -> Tensor:
    """View ``(B, N, H, D)`` as ``(B, N, H*D)`` without copying."""
    if x.dim() != 4:
        raise KVShapeError(f"from_heads expects (B, N, H, D); got shape {tuple(x.shape)}.")
    b, n, h, d = x.shape
    try:
        return x.view(b, n, h * d)
    except RuntimeError as exc:
        raise KVShapeError(
            f"from_heads: tensor with strides {x.stride()} cannot be flattened without a copy; "
            f"expected heads and head_dim to be contiguous. Call .contiguous() first. ({exc})"
        ) from None
