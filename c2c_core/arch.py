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

__all__ = ["ArchTag", "LATENT_FAMILIES", "arch_from_weights", "wan_rope_axes"]

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

    def differences(self, other: "ArchTag") -> list[str]:
        """'field: self vs other' for each field that differs (empty when the architectures agree)."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{f.name} {_show(mine)} vs {_show(theirs)}")
        return out


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
