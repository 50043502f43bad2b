"""Cache-to-Cache between two text encoders of a Qwen-Image pipeline (diffusers + transformers).

Qwen-Image and Qwen-Image-Edit condition their DiT on the last hidden states of a Qwen2.5-VL encoder
(``pipe.text_encoder``). A :class:`TextEncoderBridge` lets that encoder's self-attention read a second
vision-language model's (Qwen3-VL's) projected K/V while it encodes the prompt (and the edit image):
the sharer prefills the same text, and each fused receiver layer blends its K/V toward the sharer's,
aligned to the receiver's tokens and M-RoPE positions, through the same ``c2c_core.FusionRun`` as the
Wan bridge and the ComfyUI node (c2c_comfy/text_encoder.py). The DiT gets the conditioning it was
trained on, enriched by the stronger model. ``pipe(...)`` is called as usual::

    with TextEncoderBridge(qwen3vl, qwen3vl_processor, load_bundle("qwen3vl-to-qwen25vl.safetensors")).attach(pipe):
        image = pipe(prompt="...", image=edit_image).images[0]

Hook points, all transformers' own extension points (nothing copied, nothing patched):
  * a forward pre-hook on ``pipe.text_encoder`` sees each encoding call (the pipeline's template
    already applied, the image already preprocessed) and runs the sharer on the same text and image;
  * the receiver's K/V reach the bridge through the call's KV cache: transformers hands each layer's
    K/V, after k_norm and M-RoPE, to ``cache.update`` and attends with what it returns, so a
    ``DynamicCache`` whose ``update`` fuses is the prefill-fusion point of C2C itself (the stock call
    already builds a ``DynamicCache``; the bridge passes its own);
  * forward hooks on both language models' ``rotary_emb`` read the M-RoPE positions each model
    really used, so re-rotation goes from where the sharer's keys were made to where the receiver's are.
    With transformers 5 the Edit pipelines' receiver gets sequential positions for its image tokens
    (diffusers 0.42 passes no ``mm_token_type_ids``, without which transformers' Qwen2.5-VL builds no
    M-RoPE grid). A Qwen2.5-VL sharer is then called the same way (so an identity twin is the stock
    encoder bit for bit); Qwen3-VL refuses images without them and always gets its own grid positions.

The sharer reads the receiver's text decoded from its token ids (Qwen's byte-level tokenizer decodes
exactly; checked), with each run of image placeholders collapsed to one for the sharer's processor to
expand for its own patch grid, and the receiver's preprocessed edit image recovered from its pixel
values (checked by preprocessing it again).
"""
from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from c2c_core import FusionSchedule, ModelSignature, TokenGrid, health
from c2c_core.bundle import ProjectorBundle
from c2c_core.contract import SourceReport
from c2c_core.runtime import BankCache, FusionRun

from .bridge import check_architecture
from .errors import BridgeSetupError

__all__ = ["QWEN_VL_FAMILIES", "TextEncoderBridge", "TextEncoderBridgeConfig", "apply_text_encoder_bridge",
           "remove_text_encoder_bridge", "encoder_signature", "language_model"]

#: transformers ``model_type`` -> whether its M-RoPE interleaves the (t, h, w) sections (Qwen3-VL) or not
QWEN_VL_FAMILIES = {"qwen2_5_vl": False, "qwen3_vl": True}
#: families whose forward refuses image inputs without ``mm_token_type_ids`` (so the sharer always gets them)
_NEEDS_TOKEN_TYPES = {"qwen2_5_vl": False, "qwen3_vl": True}
_PLACEHOLDER_RUN = re.compile(r"(<\|(?:image|video)_pad\|>)\1+")


# -- what the bridge reads from a transformers Qwen-VL model --------------------------------------------

def language_model(encoder):
    """The decoder a Qwen-VL model prefills with (``encoder.model.language_model``), refusing anything else."""
    model_type = getattr(getattr(encoder, "config", None), "model_type", None)
    if model_type not in QWEN_VL_FAMILIES:
        raise BridgeSetupError(
            f"expected a transformers Qwen2.5-VL or Qwen3-VL model (Qwen2_5_VLForConditionalGeneration, "
            f"Qwen3VLForConditionalGeneration or their *Model); got {type(encoder).__name__}"
            f"{f' (model_type {model_type!r})' if model_type else ''}. Pass pipe.text_encoder of a Qwen-Image pipeline "
            f"as the receiver and a Qwen3-VL model as the sharer.")
    inner = getattr(encoder, "model", encoder)
    text = getattr(inner, "language_model", None)
    if text is None or not hasattr(text, "rotary_emb") or not len(getattr(text, "layers", ())):
        raise BridgeSetupError(f"{type(encoder).__name__} has no language_model with layers and rotary_emb; expected "
                               f"transformers' Qwen-VL layout (model.language_model.layers[i].self_attn).")
    return text


def encoder_signature(encoder, name: str = "") -> ModelSignature:
    """Layers, K/V heads and head_dim of the decoder's self-attention (grouped-query models count K/V heads,
    the width a K/V projector maps)."""
    text = language_model(encoder)
    attn = text.layers[0].self_attn
    kv_heads = attn.k_proj.out_features // attn.head_dim
    return ModelSignature(num_layers=len(text.layers), num_heads=kv_heads, head_dim=attn.head_dim,
                          name=name or getattr(encoder.config, "model_type", type(encoder).__name__))


def _model_family(encoder) -> str:
    return encoder.config.model_type


# -- the caches that hand K/V over ------------------------------------------------------------------------

def _dynamic_cache():
    from transformers import DynamicCache
    return DynamicCache


class _TapCache:
    """Factory of DynamicCache subclasses whose ``update`` passes each layer's K/V through ``tap``."""

    _classes: dict = {}

    @classmethod
    def make(cls, config, tap):
        base = _dynamic_cache()
        klass = cls._classes.get(base)
        if klass is None:
            class BridgeCache(base):
                """A DynamicCache whose update hands (layer, k, v) to the bridge; k, v: (B, H_kv, N, D), after RoPE."""

                def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                    key_states, value_states = self._c2c_tap(layer_idx, key_states, value_states)
                    return super().update(key_states, value_states, layer_idx, *args, **kwargs)

            klass = cls._classes[base] = BridgeCache
        cache = klass(config=config)
        cache._c2c_tap = tap
        return cache


class _PositionTap:
    """Reads the (3, B, N) M-RoPE positions a language model's ``rotary_emb`` is called with."""

    def __init__(self, text_model):
        self.positions: Optional[Tensor] = None
        self.handle = text_model.rotary_emb.register_forward_hook(self._seen, with_kwargs=True)

    def _seen(self, module, args, kwargs, output):
        positions = args[1] if len(args) > 1 else kwargs["position_ids"]
        self.positions = positions.expand(3, -1, -1).detach()

    def remove(self):
        self.handle.remove()


# -- what one encoding call read ----------------------------------------------------------------------

@dataclass
class EncodedSide:
    """One encoder's view of one encoding call: per batch row the text, its token ids and character spans, and
    the M-RoPE positions the model used ((3, B, N), set once the model ran)."""

    texts: list
    input_ids: Tensor          # (B, N)
    attention_mask: Tensor     # (B, N)
    offsets: list              # per row: [(start, end)] character span of each token in texts[row]
    image_grid_thw: Optional[Tensor]
    family: str
    positions: Optional[Tensor] = None


def _tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def _decode_rows(tokenizer, input_ids: Tensor, attention_mask: Tensor) -> list:
    """The text of each row (padding dropped), decoded exactly: refused unless it tokenizes back to the same ids."""
    texts = []
    for row, mask in zip(input_ids, attention_mask):
        ids = row[mask.bool()].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
            raise BridgeSetupError(
                f"the receiver's tokenizer ({type(tokenizer).__name__}) does not decode its own tokens back to the "
                f"same text, so the sharer cannot be given the receiver's text; expected a Qwen byte-level tokenizer "
                f"(the pipeline's own).")
        texts.append(text)
    return texts


def _offsets(tokenizer, texts: list, input_ids: Tensor, attention_mask: Tensor) -> list:
    """Character spans of each (unpadded) token of each row, from the tokenizer's offset mapping."""
    out = []
    for text, row, mask in zip(texts, input_ids, attention_mask):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = row[mask.bool()].tolist()
        if enc["input_ids"] != ids:
            raise BridgeSetupError(f"the sharer's processor tokenized {text[:60]!r}… differently from its tokenizer; "
                                   f"expected the processor's own tokenizer.")
        out.append([tuple(span) for span in enc["offset_mapping"]])
    return out


def recover_images(pixel_values: Tensor, image_grid_thw: Tensor, image_processor) -> list:
    """The images a Qwen-VL image processor turned into ``pixel_values`` (uint8 RGB, at the size it resized to).

    Inverts its patch layout (patches of ``patch_size``, merged ``merge_size`` squared, repeated
    ``temporal_patch_size`` times) and its normalisation; the caller checks the result by preprocessing it again.
    """
    from PIL import Image
    p, m = image_processor.patch_size, image_processor.merge_size
    tps = image_processor.temporal_patch_size
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float64).view(-1, 1, 1)
    channels = mean.shape[0]
    images, start = [], 0
    for t, gh, gw in image_grid_thw.tolist():
        rows = pixel_values[start:start + t * gh * gw].detach().to("cpu", torch.float64)
        start += t * gh * gw
        x = rows[: gh * gw].reshape(gh // m, gw // m, m, m, channels, tps, p, p)[..., 0, :, :]
        x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, gh * p, gw * p)
        x = (x * std + mean) / float(image_processor.rescale_factor)
        pixels = x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        images.append(Image.fromarray(pixels))
    return images


def _check_recovered(images, pixel_values, image_grid_thw, image_processor) -> None:
    again = image_processor(images=images, return_tensors="pt")
    same_grid = torch.equal(again["image_grid_thw"].cpu(), image_grid_thw.cpu())
    if not same_grid or not torch.allclose(again["pixel_values"].float(), pixel_values.detach().float().cpu(),
                                           atol=2e-2, rtol=0):
        raise BridgeSetupError(
            f"could not recover the edit image from the receiver's pixel values with {type(image_processor).__name__} "
            f"(the sharer must read the same image); expected the pipeline's own Qwen2-VL image processor.")


# -- the bridge ---------------------------------------------------------------------------------------

class TextEncoderBridge:
    """Fuses a sharer Qwen-VL model's K/V into a Qwen-Image pipeline's Qwen2.5-VL text encoder.

    sharer: a transformers Qwen3-VL (or Qwen2.5-VL) model; sharer_processor: its processor (a
        ``Qwen3VLProcessor``; a tokenizer alone serves text-only pipelines). bundle: a
        ``c2c_core.ProjectorBundle`` made for this sharer -> receiver pair. strength: the global strength
        (0 = the stock encoder, bit for bit); layer_strengths: {receiver layer: factor} overriding the
        layer map's. Every encoding call while attached fuses; ``last_report`` is the last call's report.
    """

    def __init__(self, sharer, sharer_processor, bundle, strength: float = 1.0, layer_strengths=None):
        if not isinstance(bundle, ProjectorBundle):
            raise BridgeSetupError(f"TextEncoderBridge(sharer, sharer_processor, bundle, …): bundle is a "
                                   f"{type(bundle).__name__}; expected a c2c_core.ProjectorBundle (load_bundle(path)).")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 2.0:
            raise BridgeSetupError(f"TextEncoderBridge strength={strength!r}; expected a number from 0 to 2.0.")
        self.sharer_text = language_model(sharer)
        self.sharer = sharer
        self.sharer_processor = sharer_processor
        self.bundle = bundle
        self.strength = float(strength)
        self.layer_strengths = layer_strengths
        self.banks = BankCache(bundle.bank)
        self.sharer_signature = encoder_signature(sharer)
        _check_shape(bundle.sharer, self.sharer_signature, "sharer", sharer)
        check_architecture(bundle, "sharer", self.sharer_signature)
        self.pipeline = None
        self.encoder = None
        self.tokenizer = None
        self.image_processor = None
        self.last_report = None
        self._handles: list = []
        self._taps: list = []
        self._call = None
        self._training = False

    @property
    def fused_layers(self) -> list:
        return sorted(self.bundle.layer_map.pairs)

    # -- attach / detach ------------------------------------------------------------------------------
    def attach(self, pipe, tokenizer=None) -> "TextEncoderBridge":
        """Attach to a Qwen-Image pipeline (its ``text_encoder`` and ``tokenizer`` or ``processor``), or to a bare
        Qwen2.5-VL encoder with its ``tokenizer`` (a processor for image prompts)."""
        if self.encoder is not None:
            raise BridgeSetupError("this TextEncoderBridge is already attached; detach() it first or make another.")
        encoder = getattr(pipe, "text_encoder", pipe)
        if encoder is None:
            raise BridgeSetupError(f"{type(pipe).__name__} has no text_encoder (it was loaded with text_encoder=None); "
                                   f"load the pipeline with its Qwen2.5-VL text encoder.")
        receiver_text = language_model(encoder)
        processor = tokenizer or getattr(pipe, "processor", None) or getattr(pipe, "tokenizer", None)
        if processor is None:
            raise BridgeSetupError(f"no tokenizer for {type(encoder).__name__}: attach to the pipeline, or pass "
                                   f"attach(text_encoder, tokenizer=…).")
        found = encoder_signature(encoder)
        _check_shape(self.bundle.receiver, found, "receiver", encoder)
        check_architecture(self.bundle, "receiver", found)
        if encoder is self.sharer:
            raise BridgeSetupError("the sharer is the receiver itself; load the sharer as its own model.")
        self.pipeline = pipe if encoder is not pipe else None
        self.encoder, self.receiver_text = encoder, receiver_text
        self.tokenizer = _tokenizer_of(processor)
        self.image_processor = getattr(processor, "image_processor", None)
        self._handles = [encoder.register_forward_pre_hook(self._before, with_kwargs=True),
                         encoder.register_forward_hook(self._after, always_call=True)]
        self._taps = [_PositionTap(receiver_text), _PositionTap(self.sharer_text)]
        return self

    def detach(self) -> None:
        """Remove every hook: the encoder is the stock one again."""
        for handle in self._handles:
            handle.remove()
        for tap in self._taps:
            tap.remove()
        self._handles, self._taps = [], []
        self._call = None
        self.encoder = self.pipeline = None

    def __enter__(self) -> "TextEncoderBridge":
        if self.encoder is None:
            raise BridgeSetupError("`with TextEncoderBridge(...)`: attach it first: `with bridge.attach(pipe):`.")
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- one encoding call --------------------------------------------------------------------------------
    def _before(self, module, args, kwargs):
        self._call = None
        if args:
            raise BridgeSetupError("the text encoder was called with positional arguments; the bridge reads keyword "
                                   "arguments (input_ids=…, attention_mask=…) as diffusers' Qwen-Image pipelines pass them.")
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise BridgeSetupError("the text encoder was called with a KV cache; the bridge fuses a fresh prefill "
                                   "only (as the Qwen-Image pipelines encode prompts).")
        run = FusionRun(self.bundle, FusionSchedule(), self.strength, self.layer_strengths,
                        sharer_grid=TokenGrid(1, 1, 1), receiver_grid=TokenGrid(1, 1, 1),
                        device=None if self._training else self.encoder.device,
                        dtype=None if self._training else self.encoder.dtype, banks=self.banks,
                        stats=not self._training)
        if not run.begin_call(0.0):
            self.last_report = run.close(SourceReport())
            return args, kwargs
        receiver = self._receiver_side(kwargs)
        sharer, sharer_kv = self._run_sharer(receiver, kwargs)
        call = _Call(run, receiver, sharer, sharer_kv, self.bundle)
        run._align = call.align        # TODO(21a): FusionRun(align=…) once c2c_core has it
        self._call = call
        kwargs = dict(kwargs, cache=_TapCache.make(self.receiver_text.config, self._fuse), use_cache=True)
        return args, kwargs

    def _after(self, module, args, output):
        call, self._call = self._call, None
        if call is None:
            return output
        report = call.run.close(SourceReport(sharer_forwards=1, peak_kv_bytes=call.kv_bytes))
        self.last_report = report
        if report.nonfinite_layers:
            raise BridgeSetupError(f"{health.nonfinite_hint(report.nonfinite_layers)} (TextEncoderBridge strength="
                                   f"{self.strength!r}; bridge.last_report has the details).")
        return output

    def _fuse(self, layer, k, v):
        call = self._call
        if call is None or call.run.strength(layer) == 0.0:
            return k, v
        call.receiver.positions = self._taps[0].positions
        sk, sv = call.sharer_kv[call.run.sharer_layer(layer)]
        k2, v2 = call.run.fuse_tokens(layer, k.transpose(1, 2), v.transpose(1, 2), sk, sv)
        return k2.transpose(1, 2), v2.transpose(1, 2)

    def _receiver_side(self, kwargs) -> EncodedSide:
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if input_ids is None:
            raise BridgeSetupError("the text encoder was called without input_ids (inputs_embeds only); the bridge "
                                   "needs the token ids to give the sharer the same text.")
        if mask is None:
            mask = torch.ones_like(input_ids)
        texts = _decode_rows(self.tokenizer, input_ids, mask)
        offsets = _offsets(self.tokenizer, texts, input_ids, mask)
        grid = kwargs.get("image_grid_thw")
        image_token = getattr(self.encoder.config, "image_token_id", None)
        if kwargs.get("pixel_values") is None and image_token is not None and bool((input_ids == image_token).any()):
            raise BridgeSetupError("the prompt holds image placeholders (<|image_pad|>) but the text encoder got no "
                                   "pixel_values; pass the edit image (QwenImageEditPipeline(image=…)).")
        return EncodedSide(texts, input_ids, mask, offsets, grid, _model_family(self.encoder))

    def _sharer_inputs(self, receiver: EncodedSide, kwargs) -> dict:
        texts = [_PLACEHOLDER_RUN.sub(r"\1", t) for t in receiver.texts]
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            tokenizer = _tokenizer_of(self.sharer_processor)
            return dict(tokenizer(texts, padding=True, return_tensors="pt"))
        if getattr(self.sharer_processor, "image_processor", None) is None:
            raise BridgeSetupError(f"the receiver encodes an edit image but sharer_processor is a "
                                   f"{type(self.sharer_processor).__name__} without an image processor; pass the "
                                   f"sharer's Qwen3VLProcessor (AutoProcessor.from_pretrained(sharer path)).")
        if self.image_processor is None:
            raise BridgeSetupError("the receiver encodes an image but no receiver image processor is known; attach to "
                                   "the pipeline (its processor), or pass attach(text_encoder, tokenizer=processor).")
        images = recover_images(pixel_values, receiver.image_grid_thw, self.image_processor)
        _check_recovered(images, pixel_values, receiver.image_grid_thw, self.image_processor)
        return dict(self.sharer_processor(text=texts, images=images, padding=True, return_tensors="pt"))

    def _run_sharer(self, receiver: EncodedSide, kwargs):
        inputs = self._sharer_inputs(receiver, kwargs)
        device = next(self.sharer.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
        if kwargs.get("mm_token_type_ids") is None and not _NEEDS_TOKEN_TYPES[_model_family(self.sharer)]:
            inputs.pop("mm_token_type_ids", None)     # positions as the receiver got them (see module docstring)
        captured: dict = {}
        wanted = set(self.bundle.layer_map.pairs.values())

        def keep(layer, k, v):
            if layer in wanted:
                captured[layer] = (k.transpose(1, 2), v.transpose(1, 2))     # (B, N, H_kv, D)
            return k, v

        cache = _TapCache.make(self.sharer_text.config, keep)
        with torch.no_grad():            # the sharer is never trained through
            self.sharer(**inputs, cache=cache, use_cache=True)
        tokenizer = _tokenizer_of(self.sharer_processor)
        ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()
        texts = [tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False) for row, m in zip(ids, mask)]
        side = EncodedSide(texts, ids, mask, _offsets(tokenizer, texts, ids, mask), inputs.get("image_grid_thw"),
                           _model_family(self.sharer), positions=self._taps[1].positions)
        return side, captured


def _check_shape(made_for: ModelSignature, found: ModelSignature, role: str, model) -> None:
    if not found.same_shape(made_for):
        raise BridgeSetupError(
            f"{role} {type(model).__name__} has {found.num_layers} layers × {found.num_heads} K/V heads × "
            f"{found.head_dim}; the projector bundle was made for {made_for.num_layers} × {made_for.num_heads} × "
            f"{made_for.head_dim}. Use the bundle made for this {role}.")


class _Call:
    """One fusing encoding call: its FusionRun, both sides and the sharer's K/V by sharer layer."""

    def __init__(self, run: FusionRun, receiver: EncodedSide, sharer: EncodedSide, sharer_kv: dict, bundle):
        self.run, self.receiver, self.sharer, self.sharer_kv = run, receiver, sharer, sharer_kv
        self.kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in sharer_kv.values())
        self._align = None

    def align(self, sk: Tensor, sv: Tensor):
        if self._align is None:
            self._align = _provisional_alignment(self.receiver, self.sharer)
        return self._align(sk, sv)


def _provisional_alignment(receiver: EncodedSide, sharer: EncodedSide):
    """Identity alignment for two identical tokenizations at identical positions (TODO(21a): c2c_core.tokens/mrope)."""
    if not (torch.equal(receiver.input_ids.cpu(), sharer.input_ids.cpu())
            and torch.equal(receiver.positions.cpu(), sharer.positions.cpu())):
        raise BridgeSetupError("token alignment between different tokenizations needs c2c_core.tokens (issue 21).")
    return lambda sk, sv: (sk, sv)


# -- diffusers' shape: a config dataclass, apply_…(pipe, config) / remove_…(pipe) ---------------------------

@dataclass
class TextEncoderBridgeConfig:
    """What ``apply_text_encoder_bridge`` fuses: projector (a bundle file or ProjectorBundle), strength (0..2),
    layer_strengths ({receiver layer: factor} or None)."""

    projector: object
    strength: float = 1.0
    layer_strengths: Optional[dict] = None


_applied: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def apply_text_encoder_bridge(pipe, config: TextEncoderBridgeConfig, sharer, sharer_processor) -> TextEncoderBridge:
    """Fuse ``sharer`` (a Qwen3-VL model and its processor) into ``pipe``'s Qwen2.5-VL text encoder until
    ``remove_text_encoder_bridge(pipe)``. Returns the bridge (its ``last_report``)."""
    from c2c_core import load_bundle
    if not isinstance(config, TextEncoderBridgeConfig):
        raise BridgeSetupError(f"apply_text_encoder_bridge(pipe, config, …): config is a {type(config).__name__}; "
                               f"expected a TextEncoderBridgeConfig.")
    bundle = config.projector
    if isinstance(bundle, (str, os.PathLike)):
        bundle = load_bundle(bundle)
    bridge = TextEncoderBridge(sharer, sharer_processor, bundle, config.strength, config.layer_strengths).attach(pipe)
    _applied.setdefault(pipe, []).append(bridge)
    return bridge


def remove_text_encoder_bridge(pipe) -> None:
    """Detach every bridge ``apply_text_encoder_bridge`` put on ``pipe`` (most recent first); a no-op without one."""
    for bridge in reversed(_applied.pop(pipe, [])):
        bridge.detach()
