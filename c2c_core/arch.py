"""A host-neutral architecture tag: which Wan-family network one side of a bridge is.

Why: a projector learns one sharer's K/V for one receiver. Two pairs can have the same attention
shape (layers, heads, head_dim) and still be different networks - Wan2.1-T2V-14B and
Wan2.1-I2V-14B, or Wan2.1-I2V-14B (CLIP image embedding) and Wan2.2-I2V-A14B (none) - so a bundle
names the architecture of both sides and hosts refuse a bundle made for another pair.

The tag is built from the model's configuration alone (never its weights, never host class names),
so ComfyUI (``c2c_comfy.compat.wan_arch``) and diffusers (``c2c_diffusers.models.arch_tag``) give
the same tag for the same network. Run-time choices are left out on purpose: RoPE position scaling
(ChronoEdit's temporal positions: a ScaleROPE patch in ComfyUI, a class feature in diffusers) is
handled by re-rotation at fusion time, and the dtype or quantisation of the weights does not change
what the projector learned. Weights are not fingerprinted: ChronoEdit and Wan2.1-I2V-14B share one
architecture and one tag.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from .errors import SignatureError, quote

__all__ = ["ArchTag", "LATENT_FAMILIES"]

#: latent channels -> family name; the A14B Wan2.2 experts and ChronoEdit are Wan2.1-architecture networks
LATENT_FAMILIES = {16: "wan2.1", 48: "wan2.2-ti2v"}
_INT_LIMIT = 1 << 20
_STR_LIMIT = 40


@dataclass(frozen=True)
class ArchTag:
    """What one side of a bridge is, independent of the host that loaded it."""

    family: str             # "wan2.1" (16-channel latent: Wan2.1, Wan2.2-A14B, ChronoEdit) | "wan2.2-ti2v" (48)
    variant: str            # "t2v" (input = latent) | "i2v" (latent + image-condition channels)
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_channels: int
    out_channels: int
    text_dim: int
    image_embedding: bool   # a CLIP image projection (Wan2.1-I2V, ChronoEdit); Wan2.2-I2V-A14B has none
    patch_size: tuple       # (t, h, w)
    rope_axes: tuple        # rotary widths per axis (t, y, x) of one head

    @classmethod
    def from_config(cls, *, dim: int, ffn_dim: int, num_heads: int, num_layers: int, in_channels: int,
                    out_channels: int, text_dim: int, image_embedding: bool, patch_size, rope_axes) -> "ArchTag":
        """The tag of a Wan-family transformer from its configuration numbers (both hosts call this)."""
        family = LATENT_FAMILIES.get(int(out_channels), f"wan-{int(out_channels)}ch")
        variant = "t2v" if int(in_channels) == int(out_channels) else "i2v"
        return cls(family=family, variant=variant, dim=int(dim), ffn_dim=int(ffn_dim), num_heads=int(num_heads),
                   num_layers=int(num_layers), in_channels=int(in_channels), out_channels=int(out_channels),
                   text_dim=int(text_dim), image_embedding=bool(image_embedding),
                   patch_size=tuple(int(p) for p in patch_size), rope_axes=tuple(int(a) for a in rope_axes))

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["patch_size"], out["rope_axes"] = list(self.patch_size), list(self.rope_axes)
        return out

    @classmethod
    def from_dict(cls, d: Any) -> "ArchTag":
        """Strict: the dict comes from a file a stranger may have written."""
        if not isinstance(d, Mapping):
            raise SignatureError(f"architecture tag is {type(d).__name__}; expected an object.")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise SignatureError(f"architecture tag lacks {missing}; expected keys {names}.")
        values = {}
        for name in names:
            value = d[name]
            if name in ("family", "variant"):
                ok = isinstance(value, str) and 0 < len(value) <= _STR_LIMIT
            elif name == "image_embedding":
                ok = isinstance(value, bool)
            elif name in ("patch_size", "rope_axes"):
                ok = isinstance(value, list) and len(value) == 3 and all(_count(v) for v in value)
                value = tuple(value) if ok else value
            else:
                ok = _count(value)
            if not ok:
                raise SignatureError(f"architecture tag {name} is {quote(value, 60)}; expected "
                                     f"{'a short string' if name in ('family', 'variant') else 'a valid value'}.")
            values[name] = value
        return cls(**values)

    def describe(self) -> str:
        """One line for messages, e.g. 'wan2.1 i2v (dim 5120, 40 layers, 40 heads, in 36, CLIP image input)'."""
        image = ", CLIP image input" if self.image_embedding else ""
        return (f"{self.family} {self.variant} (dim {self.dim}, {self.num_layers} layers, {self.num_heads} heads, "
                f"ffn {self.ffn_dim}, in {self.in_channels}{image})")

    def differences(self, other: "ArchTag") -> list[str]:
        """'field: self vs other' for each field that differs (empty when the architectures agree)."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name} {_show(mine)} vs {_show(theirs)}")
        return out


def _count(value) -> bool:
    return type(value) is int and 0 < value <= _INT_LIMIT


def _show(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return "×".join(str(v) for v in value)
    return str(value)
