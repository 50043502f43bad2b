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

import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .errors import KVShapeError, SignatureError, quote
from .mrope import MRopeSpec

__all__ = ["ArchTag", "TextEncoderArch", "TEXT_ENCODER_FAMILIES", "LATENT_FAMILIES", "arch_from_dict", "arch_from_weights",
           "wan_rope_axes"]

#: latent channels -> family name; the A14B Wan2.2 experts and ChronoEdit are Wan2.1-architecture networks
LATENT_FAMILIES = {16: "wan2.1", 48: "wan2.2-ti2v"}
_INT_LIMIT = 1 << 20
#: family and variant names: lower-case letters, digits, '.', '_', '-' (1-40); a stranger's file cannot put control
#: characters, ANSI colours or a right-to-left override into a message or the server log through them
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,39}")
_NAME_RULE = "1-40 of a-z, 0-9, '.', '_', '-' (starting with a letter or digit)"


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

    def __post_init__(self) -> None:
        """Every tag is checked where it is made (from a model, a file or a tool), so no bad tag is ever written."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("family", "variant"):
                ok, expected = isinstance(value, str) and _NAME.fullmatch(value) is not None, _NAME_RULE
            elif f.name == "image_embedding":
                ok, expected = isinstance(value, bool), "true or false"
            elif f.name in ("patch_size", "rope_axes"):
                ok = isinstance(value, tuple) and len(value) == 3 and all(_count(v) for v in value)
                expected = f"three integers from 1 to {_INT_LIMIT}"
            else:
                ok, expected = _count(value), f"an integer from 1 to {_INT_LIMIT}"
            if not ok:
                raise SignatureError(f"architecture tag {f.name} is {quote(value, 60)}; expected {expected}.")

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
        values = {name: tuple(d[name]) if name in ("patch_size", "rope_axes") and isinstance(d[name], list)
                  else d[name] for name in names}
        return cls(**values)

    def describe(self) -> str:
        """One line for messages, e.g. 'wan2.1 i2v (dim 5120, 40 layers, 40 heads, in 36, CLIP image input)'.

        Safe to print raw: family and variant passed the alphabet check when the tag was made."""
        image = ", CLIP image input" if self.image_embedding else ""
        return (f"{self.family} {self.variant} (dim {self.dim}, {self.num_layers} layers, {self.num_heads} heads, "
                f"ffn {self.ffn_dim}, in {self.in_channels}{image})")

    kind = "wan"

    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, K/V heads, K/V width) the signature of this side must have."""
        return (self.num_layers, self.num_heads, self.dim)

    def differences(self, other) -> list[str]:
        """'field: self vs other' for each field that differs (empty when the architectures agree)."""
        if type(other) is not type(self):
            return [_kind_difference(self, other)]
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name} {_show(mine)} vs {_show(theirs)}")
        return out


#: text-encoder families this version knows: the family's M-RoPE sections (t, h, w) and whether they interleave
TEXT_ENCODER_FAMILIES = {"qwen2.5-vl": ((16, 24, 24), False), "qwen3-vl": ((24, 20, 20), True)}
KIND_LABELS = {"wan": "a Wan DiT", "text-encoder": "a text encoder"}


@dataclass(frozen=True)
class TextEncoderArch:
    """What one side of a text-encoder bridge is (a causal decoder with M-RoPE, e.g. Qwen2.5-VL-7B, Qwen3-VL-8B).

    Stored in a bundle with ``"kind": "text-encoder"`` so a Wan bundle is never taken for a text-encoder
    pair, or the reverse. Grouped-query attention: ``num_heads`` query heads, ``num_kv_heads`` K/V heads;
    the K/V a projector sees (and the ModelSignature) have ``num_kv_heads`` heads of ``head_dim``.
    """

    family: str             # "qwen2.5-vl" | "qwen3-vl" (TEXT_ENCODER_FAMILIES)
    variant: str            # the size, e.g. "7b", "8b", "4b" (for people; the numbers below decide)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int          # query heads
    num_kv_heads: int       # key/value heads (grouped-query attention)
    head_dim: int
    vocab_size: int
    rope_theta: int         # 1000000 (Qwen2.5-VL), 5000000 (Qwen3-VL)
    mrope_sections: tuple   # rotary pairs per axis (t, h, w)
    mrope_interleaved: bool
    vision_patch: int       # vision tower patch in pixels (14 Qwen2.5-VL, 16 Qwen3-VL), merged 2x2

    kind = "text-encoder"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("family", "variant"):
                ok, expected = isinstance(value, str) and _NAME.fullmatch(value) is not None, _NAME_RULE
            elif f.name == "mrope_interleaved":
                ok, expected = isinstance(value, bool), "true or false"
            elif f.name == "mrope_sections":
                ok = isinstance(value, tuple) and len(value) == 3 and all(type(v) is int and 0 <= v <= _INT_LIMIT for v in value)
                expected = "three integers (t, h, w)"
            elif f.name == "rope_theta":
                ok, expected = type(value) is int and 1 < value <= 1 << 40, "an integer above 1"
            else:
                ok, expected = _count(value), f"an integer from 1 to {_INT_LIMIT}"
            if not ok:
                raise SignatureError(f"text-encoder architecture tag {f.name} is {quote(value, 60)}; expected {expected}.")
        if sum(self.mrope_sections) * 2 != self.head_dim or self.num_heads % self.num_kv_heads:
            raise SignatureError(
                f"text-encoder architecture tag: M-RoPE sections {list(self.mrope_sections)} for head_dim "
                f"{self.head_dim}, {self.num_heads} query heads over {self.num_kv_heads} K/V heads; expected sections "
                f"summing to head_dim / 2 and query heads a multiple of K/V heads.")

    @classmethod
    def from_config(cls, family: str, variant: str, *, hidden_size: int, intermediate_size: int, num_layers: int,
                    num_heads: int, num_kv_heads: int, head_dim: int, vocab_size: int, rope_theta,
                    vision_patch: int, mrope_sections=None) -> "TextEncoderArch":
        """The tag from a model's configuration numbers (both hosts call this). The M-RoPE layout is the
        family's unless the config gives its own sections (ComfyUI's ``rope_dims``)."""
        if family not in TEXT_ENCODER_FAMILIES:
            raise SignatureError(f"text-encoder family {quote(family, 40)} is unknown; expected one of "
                                 f"{sorted(TEXT_ENCODER_FAMILIES)}.")
        sections, interleaved = TEXT_ENCODER_FAMILIES[family]
        if mrope_sections is not None:
            sections = tuple(int(n) for n in mrope_sections)
        return cls(family=family, variant=variant, hidden_size=int(hidden_size), intermediate_size=int(intermediate_size),
                   num_layers=int(num_layers), num_heads=int(num_heads), num_kv_heads=int(num_kv_heads),
                   head_dim=int(head_dim), vocab_size=int(vocab_size), rope_theta=int(rope_theta),
                   mrope_sections=sections, mrope_interleaved=interleaved, vision_patch=int(vision_patch))

    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, K/V heads, K/V width) the signature of this side must have: GQA counts K/V heads."""
        return (self.num_layers, self.num_kv_heads, self.num_kv_heads * self.head_dim)

    def to_dict(self) -> dict:
        out = {"kind": self.kind, **{f.name: getattr(self, f.name) for f in fields(self)}}
        out["mrope_sections"] = list(self.mrope_sections)
        return out

    @classmethod
    def from_dict(cls, d: Any) -> "TextEncoderArch":
        """Strict: the dict comes from a file a stranger may have written."""
        if not isinstance(d, Mapping) or d.get("kind") != cls.kind:
            raise SignatureError(f"text-encoder architecture tag is {quote(d, 80)}; expected an object with kind "
                                 f"{cls.kind!r}.")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise SignatureError(f"text-encoder architecture tag lacks {missing}; expected keys {names}.")
        return cls(**{n: tuple(d[n]) if n == "mrope_sections" and isinstance(d[n], list) else d[n] for n in names})

    def describe(self) -> str:
        """One line for messages, e.g. 'qwen3-vl 8b text encoder (hidden 4096, 36 layers, 32 heads / 8 K/V heads)'."""
        return (f"{self.family} {self.variant} text encoder (hidden {self.hidden_size}, {self.num_layers} layers, "
                f"{self.num_heads} heads / {self.num_kv_heads} K/V heads)")

    def differences(self, other) -> list[str]:
        if type(other) is not type(self):
            return [_kind_difference(self, other)]
        return [f"{f.name} {_show(getattr(self, f.name))} vs {_show(getattr(other, f.name))}"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    def mrope(self):
        """The c2c_core.mrope.MRopeSpec of this model's keys."""
        return MRopeSpec(head_dim=self.head_dim, theta=float(self.rope_theta), sections=self.mrope_sections,
                         interleaved=self.mrope_interleaved)


def arch_from_dict(d: Any):
    """The tag a bundle or recording stores: a text-encoder tag by its ``kind``, a Wan tag otherwise (Wan tags
    were written before kinds existed and carry none)."""
    if isinstance(d, Mapping) and "kind" in d:
        if d["kind"] == TextEncoderArch.kind:
            return TextEncoderArch.from_dict(d)
        raise SignatureError(f"architecture tag kind {quote(d['kind'], 40)} is unknown to this version (known: "
                             f"{TextEncoderArch.kind!r}, or none for Wan); update DiT Cache Bridge.")
    return ArchTag.from_dict(d)


def _kind_difference(mine, theirs) -> str:
    return (f"kind: {KIND_LABELS.get(mine.kind, mine.kind)} vs {KIND_LABELS.get(theirs.kind, theirs.kind)}"
            f" (a projector for one kind of model cannot fuse another)")


def wan_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Per-axis (t, y, x) rotary widths Wan uses for ``head_dim``: (44, 42, 42) for 128."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 6 or head_dim % 2:
        raise KVShapeError(f"Wan RoPE needs an even head_dim >= 6; got {head_dim!r}.")
    third = head_dim // 6
    return (head_dim - 4 * third, 2 * third, 2 * third)


#: where each layout keeps what the tag needs: (ffn first layer, text projection, output head, image projection)
_LAYOUTS = {
    "comfyui": ("blocks.0.ffn.0.weight", "text_embedding.0.weight", "head.head.weight", "img_emb."),
    "diffusers": ("blocks.0.ffn.net.0.proj.weight", "condition_embedder.text_embedder.linear_1.weight",
                  "proj_out.weight", "condition_embedder.image_embedder."),
}


def arch_from_weights(shapes: Mapping[str, tuple], num_heads: int) -> ArchTag:
    """The tag of a Wan-family checkpoint from its tensor shapes alone (a safetensors header: no weight is read).

    For bundles saved before the tag existed (tools/retag_projector.py). Reads the original/ComfyUI key
    layout (optionally under a prefix such as ``model.diffusion_model.``) and diffusers' layout. The
    head count is not in the weights' shapes; it comes from the bundle's signature.
    """
    found = [k for k in shapes if k.endswith("patch_embedding.weight")]
    if len(found) != 1:
        raise SignatureError(f"expected one patch_embedding.weight in a Wan-family checkpoint; found {len(found)}.")
    prefix = found[0][: -len("patch_embedding.weight")]
    names = {k[len(prefix):]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}
    for layout, (ffn, text, head, image) in _LAYOUTS.items():
        if ffn in names and text in names and head in names:
            break
    else:
        raise SignatureError("the checkpoint is neither in the original/ComfyUI Wan key layout nor in diffusers' "
                             "(no blocks.0.ffn / text embedding / output head weights).")
    dim, in_channels, *patch = names["patch_embedding.weight"]
    if len(patch) != 3 or dim % num_heads:
        raise SignatureError(f"patch embedding {names['patch_embedding.weight']} does not fit {num_heads} heads.")
    layers = {int(k.split(".")[1]) for k in names if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return ArchTag.from_config(dim=dim, ffn_dim=names[ffn][0], num_heads=num_heads, num_layers=len(layers),
                               in_channels=in_channels, out_channels=names[head][0] // (patch[0] * patch[1] * patch[2]),
                               text_dim=names[text][1], image_embedding=any(k.startswith(image) for k in names),
                               patch_size=patch, rope_axes=wan_rope_axes(dim // num_heads))


def _count(value) -> bool:
    return type(value) is int and 0 < value <= _INT_LIMIT


def _show(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return "×".join(str(v) for v in value)
    return str(value)
