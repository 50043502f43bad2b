"""The text-encoder bridge in ComfyUI: a receiver Qwen2.5-VL encodes a prompt reading a Qwen3-VL sharer's K/V.

Qwen-Image and Qwen-Image-Edit condition their DiT on Qwen2.5-VL's hidden states. Here the receiver encoder's
self-attention reads the sharer encoder's projected K/V of the same prompt (and images), layer by layer, through
the one fusion path (``c2c_core.FusionRun``), so the DiT gets the conditioning it was trained on, enriched by the
sharer.

Order: the sharer runs first over the whole prompt and keeps the K/V of the layers the projector reads; then the
receiver runs with them. Prefill is one forward of a few hundred to a few thousand tokens, so keeping those layers
costs little (bytes in the report), and the two encoders never need to be on the device together (ComfyUI loads
and offloads each CLIP as usual). Lockstep (c2c_core.lockstep) would only matter for bidirectional fusion.

Where: pre-RoPE keys and values, read and replaced with forward hooks on ComfyUI's own attention submodules
(compat.text_attention_hooks). The receiver rotates the fused keys at its own M-RoPE positions, so the sharer's
other M-RoPE layout (Qwen3-VL interleaves the sections) and its other image grid (16 px patches instead of 14) need
no re-rotation: only token alignment (text tokens to text tokens, image tokens resampled on their 2-D grids).

The stock encode nodes (TextEncodeQwenImageEdit / ...Plus) run unchanged with a :class:`BridgedClip` in place of
the receiver CLIP: their templates, image sizes and reference latents are the host's own, and strength 0 or an
identity twin gives their conditioning bit for bit.
"""
from __future__ import annotations

from typing import Optional

import torch

from c2c_core import FusionRun, FusionSchedule, ModelSignature, TokenGrid, resample_tokens
from c2c_core.contract import SourceReport
from . import compat
from .errors import BridgeInputError

#: the modes of the bridged node: which stock ComfyUI node's template and image handling it reproduces
STOCK_NODES = {"text": "TextEncodeQwenImageEdit", "edit": "TextEncodeQwenImageEdit",
               "edit_plus": "TextEncodeQwenImageEditPlus"}
RECEIVER_KINDS = ("qwen2.5-vl",)            # Qwen-Image's encoder: what its DiT was trained on
SHARER_KINDS = ("qwen2.5-vl", "qwen3-vl")   # qwen2.5-vl as a sharer: an identity twin, or another fine-tune


def encoder_of(node: str, input_name: str, clip, kinds) -> compat.QwenEncoder:
    """The Qwen-VL encoder of a CLIP input of ``kinds``, or an error naming what it is and how to load one."""
    wanted = " or ".join(k.replace("qwen", "Qwen").replace("-vl", "-VL") for k in kinds)
    missing = ("" if compat.qwen3vl_available() or "qwen3-vl" not in kinds else
               f" (this ComfyUI {compat.host_version()} has no Qwen3-VL text encoder: "
               "comfy/text_encoders/qwen3vl.py; update ComfyUI to 0.33 or newer for a Qwen3-VL sharer)")
    try:
        encoder = compat.qwen_encoder(clip)
    except compat.NotAQwenEncoder as e:
        raise BridgeInputError(node, input_name, f"{e}{missing}", f"a {wanted} text encoder",
                               "load it with Load CLIP (type qwen_image), e.g. qwen_2.5_vl_7b or qwen3_vl_8b") from e
    if encoder.kind not in kinds:
        raise BridgeInputError(node, input_name, f"a {encoder.kind} text encoder{missing}", f"a {wanted} text encoder",
                               "connect Qwen-Image's encoder (qwen_2.5_vl_7b) as clip and the Qwen3-VL as sharer_clip")
    return encoder


def encoder_signature(encoder: compat.QwenEncoder) -> ModelSignature:
    """What a projector sees of one encoder: its layers, its K/V heads (grouped-query: fewer than its query heads)
    and head width."""
    return ModelSignature(num_layers=encoder.num_layers, num_heads=encoder.num_kv_heads, head_dim=encoder.head_dim,
                          name=encoder.kind)


class SharerKV:
    """The sharer's pre-RoPE K/V of the layers the projector reads, from one forward over the prompt."""

    def __init__(self, layers):
        self.layers = sorted(set(layers))
        self.kv: dict = {}
        self.spans: list = []
        self.length: Optional[int] = None

    def start(self, embeds_info, length):
        self.spans, self.length = compat.vision_spans(embeds_info), length

    def keep(self, layer, k, v):
        self.kv[layer] = (k, v)      # views of the host's own tensors: nothing copied

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.kv.values() for t in pair)


def token_index(receiver_ids, receiver_spans, receiver_length, sharer_ids, sharer_spans, sharer_length) -> torch.Tensor:
    """For each receiver position, the sharer position it reads: (N_r,) int64.

    Both token lists are ids with None where an image stands; the encoders expand each image into a span of
    merged patches (``*_spans``: start, length, (t, h, w)). Text tokens pair one to one (the two tokenizations
    agree: see :func:`check_same_tokens`); an image's tokens are resampled from the sharer's grid onto the
    receiver's (nearest, c2c_core.resample_tokens), so each receiver patch reads the sharer patch over the same
    part of the picture."""
    if len(receiver_spans) != len(sharer_spans):
        raise ValueError(f"{len(receiver_spans)} images in the receiver's prompt, {len(sharer_spans)} in the sharer's")
    index = torch.empty(receiver_length, dtype=torch.int64)
    r_pos = s_pos = 0
    r_images, s_images = iter(receiver_spans), iter(sharer_spans)
    for r_id, s_id in zip(receiver_ids, sharer_ids):
        if r_id is None:
            (r_start, r_len, r_grid), (s_start, s_len, s_grid) = next(r_images), next(s_images)
            cells = torch.arange(s_start, s_start + s_len, dtype=torch.int64).view(1, s_len, 1, 1)
            index[r_start:r_start + r_len] = resample_tokens(cells, TokenGrid(*s_grid), TokenGrid(*r_grid)).reshape(-1)
            r_pos, s_pos = r_start + r_len, s_start + s_len
        else:
            index[r_pos] = s_pos
            r_pos, s_pos = r_pos + 1, s_pos + 1
    if r_pos != receiver_length or s_pos != sharer_length:
        raise ValueError(f"token walk ended at {r_pos}/{receiver_length} (receiver), {s_pos}/{sharer_length} (sharer)")
    return index


def check_same_tokens(node: str, receiver_ids, sharer_ids) -> None:
    """The text tokens must pair one to one. ComfyUI's Qwen2.5-VL and Qwen3-VL share one tokenizer
    (qwen25_tokenizer), so the sharer's tokenization of the receiver's exact text agrees; a host that ever
    shipped another one is refused here, by what differs, instead of fusing shifted tokens."""
    if receiver_ids != sharer_ids:
        first = next((i for i, (a, b) in enumerate(zip(receiver_ids, sharer_ids)) if a != b),
                     min(len(receiver_ids), len(sharer_ids)))
        raise BridgeInputError(node, "sharer_clip", f"a tokenizer that splits the prompt differently from the "
                               f"receiver's ({len(sharer_ids)} vs {len(receiver_ids)} tokens, first difference at "
                               f"token {first})", "a sharer with the receiver's tokenizer (Qwen2.5-VL, Qwen3-VL)",
                               "use a Qwen3-VL or Qwen2.5-VL text encoder as the sharer")


class BridgedClip:
    """Stands in for the receiver CLIP inside ComfyUI's own Qwen encode nodes, which call exactly ``tokenize`` and
    ``encode_from_tokens_scheduled``: the sharer encodes the receiver's exact text and images first, then the
    receiver encodes with the sharer's K/V fused into the projector's layers.

    ``layer_strengths``: {receiver layer: factor} over the bundle's map (0 switches a layer off). The run's report
    (c2c_core.RunReport) is in ``report`` after the encode."""

    def __init__(self, node: str, receiver, sharer, bundle, strength: float, layer_strengths=None):
        self.node, self.bundle, self.strength = node, bundle, float(strength)
        self.layer_strengths = dict(layer_strengths or {})
        self.receiver, self.sharer = compat.clone_clip(receiver), compat.clone_clip(sharer)
        self.receiver_encoder = compat.qwen_encoder(self.receiver)
        self.sharer_encoder = compat.qwen_encoder(self.sharer)
        self._sharer_tokens: dict = {}
        self.report = None

    def tokenize(self, text, **kwargs):
        tokens = self.receiver.tokenize(text, **kwargs)
        exact = compat.tokenizer_text(self.receiver, tokens)     # the template applied, <|image_pad|> per image
        self._sharer_tokens[id(tokens)] = (tokens, self.sharer.tokenize(exact, images=list(kwargs.get("images") or [])))
        return tokens

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        kept = self._sharer_tokens.pop(id(tokens), None)
        if kept is None or kept[0] is not tokens:
            raise RuntimeError(f"{self.node}: tokens that did not come from this node's tokenize()")
        sharer_tokens = kept[1]
        receiver_ids, sharer_ids = compat.token_ids(tokens), compat.token_ids(sharer_tokens)
        check_same_tokens(self.node, receiver_ids, sharer_ids)
        sharer = SharerKV(self.bundle.layer_map.pairs.values())
        with compat.text_attention_hooks(self.sharer_encoder, sharer.layers, sharer.start, sharer.keep):
            compat.encode_tokens(self.sharer, sharer_tokens)
        fusion = _ReceiverFusion(self, sharer, receiver_ids, sharer_ids)
        with compat.text_attention_hooks(self.receiver_encoder, sorted(self.bundle.layer_map.pairs), fusion.start,
                                         fusion.fuse):
            conditioning = self.receiver.encode_from_tokens_scheduled(tokens, **kwargs)
        self.report = fusion.close(sharer.nbytes)
        return conditioning


class _ReceiverFusion:
    """One receiver forward: the token alignment is built when the forward starts (the host has placed the images
    then), the FusionRun at the first fused layer (the K/V's device and dtype are known then)."""

    def __init__(self, clip: BridgedClip, sharer: SharerKV, receiver_ids, sharer_ids):
        self.clip, self.sharer = clip, sharer
        self.receiver_ids, self.sharer_ids = receiver_ids, sharer_ids
        self.index = None
        self.run: Optional[FusionRun] = None
        self.runs = 0

    def start(self, embeds_info, length):
        self.index = token_index(self.receiver_ids, compat.vision_spans(embeds_info), length,
                                 self.sharer_ids, self.sharer.spans, self.sharer.length)
        self.runs += 1

    def fuse(self, layer, k, v):
        if self.run is None:
            index = self.index.to(k.device)
            self.run = FusionRun(self.clip.bundle, FusionSchedule(), self.clip.strength, self.clip.layer_strengths,
                                 align=lambda sk, sv: (sk.index_select(1, index), sv.index_select(1, index)),
                                 device=k.device, dtype=k.dtype)
            self.run.begin_call(0.0)
        sk, sv = self.sharer.kv[self.run.sharer_layer(layer)]
        with torch.no_grad():   # ComfyUI encodes with grad mode on; the bank's parameters must not build a graph
            return self.run.fuse(layer, k, v, sk, sv)

    def close(self, kv_bytes: int):
        if self.run is None:
            return None
        return self.run.close(SourceReport(sharer_forwards=1, peak_kv_bytes=kv_bytes, copied_kv_bytes=0))
