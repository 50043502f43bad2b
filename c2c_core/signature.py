"""What describes one side's self-attention K/V: the model's signature, the token grid, head views.

No K/V is held here; these are the facts every other module checks K/V against. Canonical layout of
one layer's K or V: ``(B, N, H, D)`` = batch, tokens, heads, head_dim. Why one layout: the projectors,
the aligner and the bundle all agree on it, and ComfyUI's attention path hands K/V as ``(B, N, H*D)``,
which :func:`to_heads` views into it without a copy. Tokens run frames-major, then height, then
width, as in Wan's patch embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from torch import Tensor

from .arch import ArchTag, TextEncoderArch, arch_from_dict
from .errors import KVShapeError, MissingLayerError, SignatureError

__all__ = [
    "ModelSignature",
    "TokenGrid",
    "text_encoder_signature",
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
    arch: Optional[ArchTag | TextEncoderArch] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_heads", "head_dim"):
            _positive_int("ModelSignature", field, getattr(self, field))
        if not isinstance(self.name, str):
            raise SignatureError(f"ModelSignature.name is {self.name!r}; expected a string.")
        if self.arch is not None and not isinstance(self.arch, (ArchTag, TextEncoderArch)):
            raise SignatureError(f"ModelSignature.arch is {type(self.arch).__name__}; expected an ArchTag, a "
                                 f"TextEncoderArch or None.")

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
        arch = arch_from_dict(d["arch"]) if d.get("arch") is not None else None
        return cls(**values, name=d.get("name", ""), arch=arch)


def text_encoder_signature(arch: TextEncoderArch, name: str = "") -> ModelSignature:
    """The signature of a text encoder: its K/V heads (grouped-query attention: fewer than its query heads),
    since the K/V a projector reads and writes have that many heads (Qwen2.5-VL-7B: 28 layers × 4 × 128)."""
    return ModelSignature(arch.num_layers, arch.num_kv_heads, arch.head_dim, name=name, arch=arch)


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
