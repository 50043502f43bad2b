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
no re-rotation: only token alignment (c2c_core.tokens.align_tokens: text tokens by the bytes they cover in the one
templated text both encoders read, image tokens cell by cell on their 2-D grids). c2c_core's
``build_text_alignment`` (gather, then M-RoPE re-rotation) is for hosts that fuse rotated keys; here the gather
alone is the ``align`` FusionRun takes.

The stock encode nodes (TextEncodeQwenImageEdit / ...Plus) run unchanged with a :class:`BridgedClip` in place of
the receiver CLIP: their templates, image sizes and reference latents are the host's own, and strength 0 or an
identity twin gives their conditioning bit for bit.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from c2c_core import (FusionRun, FusionSchedule, ModelSignature, TokenLayout, VisionGrid, align_tokens,
                      spans_from_pieces, text_encoder_signature)
from c2c_core.contract import SourceReport
from . import compat
from .errors import BridgeInputError

#: the modes of the bridged node: which stock ComfyUI node's template and image handling it reproduces
STOCK_NODES = {"text": "TextEncodeQwenImageEdit", "edit": "TextEncodeQwenImageEdit",
               "edit_plus": "TextEncodeQwenImageEditPlus"}
IMAGE_PIECE = b"<|image_pad|>"
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
    return text_encoder_signature(encoder.arch, name=encoder.kind)


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


def token_layout(pieces, spans_of_images, length) -> TokenLayout:
    """One encoder's sequence as c2c_core.tokens sees it: a byte span per text token of the shared text, and the
    image blocks the encoder expanded each image's ``<|image_pad|>`` into (``pieces``: None there;
    ``spans_of_images``: start, size, patch grid, from the encoder's own ``embeds_info``)."""
    spans = spans_from_pieces([IMAGE_PIECE if p is None else p for p in pieces])
    images = iter(spans_of_images)
    if sum(p is None for p in pieces) != len(spans_of_images):
        raise ValueError(f"{sum(p is None for p in pieces)} images in the tokens, {len(spans_of_images)} placed")
    out, vision = [], []
    for piece, span in zip(pieces, spans):
        if piece is None:
            start, size, patches = next(images)
            block = VisionGrid.from_patch_grid(start, patches)
            if block.size != size:
                raise ValueError(f"an image of {size} tokens on a {patches} patch grid")
            vision.append(block)
            out += [None] * size
        else:
            out.append(span)
    if len(out) != length:
        raise ValueError(f"the encoder's sequence has {length} tokens, its tokens and images {len(out)}")
    return TokenLayout(tuple(out), tuple(vision))


class BridgedClip:
    """Stands in for the receiver CLIP inside ComfyUI's own Qwen encode nodes, which call exactly ``tokenize`` and
    ``encode_from_tokens_scheduled``: the sharer encodes the receiver's exact text and images first, then the
    receiver encodes with the sharer's K/V fused into the projector's layers.

    ``layer_strengths``: {receiver layer: factor} over the bundle's map (0 switches a layer off). The run's report
    (c2c_core.RunReport) is in ``report`` after the encode. Inside :meth:`training` the same encode carries
    gradients to the bundle's bank (c2c_comfy/text_training.py)."""

    def __init__(self, node: str, receiver, sharer, bundle, strength: float, layer_strengths=None):
        self.node, self.bundle, self.strength = node, bundle, float(strength)
        self.layer_strengths = dict(layer_strengths or {})
        self.receiver, self.sharer = compat.clone_clip(receiver), compat.clone_clip(sharer)
        self.receiver_encoder = compat.qwen_encoder(self.receiver)
        self.sharer_encoder = compat.qwen_encoder(self.sharer)
        self._sharer_tokens: dict = {}
        self.report = None
        self.trains = False
        self._fresh_weights = False

    @contextmanager
    def training(self):
        """Encodes inside fuse through the bundle's own bank as it is (no copy placed on the encoder's dtype, which
        autograd would not reach; no report statistics) with autograd on (compat.grad_enabled), so the receiver's
        conditioning carries gradients to the bank; the sharer still encodes without. With a bank in the encoder's
        dtype the conditioning is the inference one bit for bit."""
        with compat.grad_enabled():
            if not self._fresh_weights:   # weights loaded inside a prompt are inference tensors: normal copies
                compat.fresh_weights_per_forward(compat.clip_patcher(self.receiver))
                compat.fresh_tensors_outside_layers(compat.clip_patcher(self.receiver))
                self._fresh_weights = True
            self.trains = True
            try:
                yield self
            finally:
                self.trains = False

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
        sharer = SharerKV(self.bundle.layer_map.pairs.values())
        with compat.text_attention_hooks(self.sharer_encoder, sharer.layers, sharer.start, sharer.keep), \
                torch.no_grad():            # the sharer is never trained through
            compat.encode_tokens(self.sharer, sharer_tokens)
        sharer_layout = token_layout(compat.token_pieces(self.sharer, sharer_tokens), sharer.spans, sharer.length)
        fusion = _ReceiverFusion(self, sharer, compat.token_pieces(self.receiver, tokens), sharer_layout)
        with compat.text_attention_hooks(self.receiver_encoder, sorted(self.bundle.layer_map.pairs), fusion.start,
                                         fusion.fuse):
            conditioning = self.receiver.encode_from_tokens_scheduled(tokens, **kwargs)
        self.report = fusion.close(sharer.nbytes)
        return conditioning


class _ReceiverFusion:
    """One receiver forward: the token alignment is built when the forward starts (the host has placed the images
    then), the FusionRun at the first fused layer (the K/V's device and dtype are known then)."""

    def __init__(self, clip: BridgedClip, sharer: SharerKV, receiver_pieces, sharer_layout: TokenLayout):
        self.clip, self.sharer = clip, sharer
        self.receiver_pieces, self.sharer_layout = receiver_pieces, sharer_layout
        self.index = None
        self.run: Optional[FusionRun] = None
        self.runs = 0

    def start(self, embeds_info, length):
        receiver_layout = token_layout(self.receiver_pieces, compat.vision_spans(embeds_info), length)
        self.index = align_tokens(receiver_layout, self.sharer_layout)
        self.runs += 1

    def fuse(self, layer, k, v):
        training = self.clip.trains
        if self.run is None:    # training: the bank itself, not a placed copy, and no statistics
            index = self.index.to(k.device)
            self.run = FusionRun(self.clip.bundle, FusionSchedule(), self.clip.strength, self.clip.layer_strengths,
                                 align=lambda sk, sv: (sk.index_select(1, index), sv.index_select(1, index)),
                                 device=None if training else k.device, dtype=None if training else k.dtype,
                                 stats=not training)
            self.run.begin_call(0.0)
        sk, sv = self.sharer.kv[self.run.sharer_layer(layer)]
        if training:            # the fusion gets K/V of its own: the hook overwrites the host's, which autograd keeps
            return self.run.fuse(layer, k.clone(), v.clone(), sk, sv)
        with torch.no_grad():   # ComfyUI encodes with grad mode on; the bank's parameters must not build a graph
            return self.run.fuse(layer, k, v, sk, sv)

    def close(self, kv_bytes: int):
        if self.run is None:
            return None
        return self.run.close(SourceReport(sharer_forwards=1, peak_kv_bytes=kv_bytes, copied_kv_bytes=0))
