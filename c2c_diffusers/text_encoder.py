"""Cache-to-Cache between two text encoders of a Qwen-Image pipeline (diffusers + transformers).

Qwen-Image and Qwen-Image-Edit condition their DiT on the last hidden states of a Qwen2.5-VL encoder
(``pipe.text_encoder``). A :class:`TextEncoderBridge` lets that encoder's self-attention read a second
vision-language model's (Qwen3-VL's) projected K/V while it encodes the prompt (and the edit image):
the sharer prefills the same text, and each fused receiver layer blends its K/V toward the sharer's,
aligned to the receiver's tokens, through the same ``c2c_core.FusionRun`` as the Wan bridge and the
ComfyUI node (c2c_comfy/text_encoder.py), with the same bundle files. The DiT gets the conditioning it was
trained on, enriched by the stronger model. ``pipe(...)`` is called as usual::

    with TextEncoderBridge(qwen3vl, qwen3vl_processor, load_bundle("qwen3vl-to-qwen25vl.safetensors")).attach(pipe):
        image = pipe(prompt="...", image=edit_image).images[0]

Where: pre-RoPE keys and values, as the ComfyUI host fuses them (c2c_comfy/text_encoder.py), so one
bundle means the same in both hosts: forward hooks on each fused layer's ``self_attn.k_proj`` (Qwen2.5-VL;
Qwen3-VL's keys are read after its ``k_norm``) and ``self_attn.v_proj``, transformers' own modules (no
forward is copied). The receiver then rotates the fused keys at its own M-RoPE positions, so the sharer's
other M-RoPE layout (Qwen3-VL interleaves its sections, with another theta) and its other image grid need
no re-rotation: only token alignment (``c2c_core.tokens``: text tokens by the UTF-8 bytes they cover, image
tokens on their 2-D grids). A forward pre-hook on ``pipe.text_encoder`` sees each encoding call (the pipeline's
template applied, the image preprocessed) and runs the sharer on the same text and image first.

The sharer reads the receiver's text decoded from its token ids (Qwen's byte-level tokenizer decodes
exactly; checked), with each run of image placeholders collapsed to one for the sharer's processor to
expand for its own patch grid, and the receiver's preprocessed edit image recovered from its pixel
values (checked by preprocessing it again). With transformers 5 the Edit pipelines' receiver gets
sequential positions for its image tokens (diffusers 0.42 passes no ``mm_token_type_ids``, without which
transformers' Qwen2.5-VL builds no M-RoPE grid); a Qwen2.5-VL sharer is called the same way (so an
identity twin is the stock encoder bit for bit), while Qwen3-VL, which refuses images without them,
always gets its own grid positions.
"""
from __future__ import annotations

import os
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from c2c_core import FusionSchedule, LayerMapError, ModelSignature, health, parse_layer_spec
from c2c_core.arch import TextEncoderArch
from c2c_core.bundle import ProjectorBundle
from c2c_core.contract import SourceReport
from c2c_core.mrope import VisionGrid
from c2c_core.runtime import BankCache, FusionRun
from c2c_core.signature import text_encoder_signature
from c2c_core.tokens import TokenLayout, align_tokens, spans_from_pieces

from .bridge import check_architecture
from .errors import BridgeSetupError

__all__ = ["TextEncoderBridge", "TextEncoderBridgeConfig", "apply_text_encoder_bridge", "remove_text_encoder_bridge",
           "encoder_arch", "encoder_signature", "language_model", "kv_hooks",
           "layouts", "recover_images", "token_pieces"]

#: transformers ``model_type`` -> c2c_core text-encoder family (c2c_core.arch.TEXT_ENCODER_FAMILIES)
FAMILIES = {"qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl"}
#: what may receive: Qwen-Image's encoder, whose hidden states its DiT was trained on (as the ComfyUI node)
RECEIVER_FAMILIES = ("qwen2.5-vl",)
#: families whose forward refuses image inputs without ``mm_token_type_ids`` (so the sharer always gets them)
NEEDS_TOKEN_TYPES = {"qwen2.5-vl": False, "qwen3-vl": True}
_PLACEHOLDER_RUN = re.compile(r"(<\|(?:image|video)_pad\|>)\1+")


# -- what the bridge reads from a transformers Qwen-VL model --------------------------------------------

def language_model(encoder):
    """The decoder a Qwen-VL model prefills with (``encoder.model.language_model``), refusing anything else."""
    model_type = getattr(getattr(encoder, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise BridgeSetupError(
            f"expected a transformers Qwen2.5-VL or Qwen3-VL model (Qwen2_5_VLForConditionalGeneration, "
            f"Qwen3VLForConditionalGeneration or their *Model); got {type(encoder).__name__}"
            f"{f' (model_type {model_type!r})' if model_type else ''}. Pass pipe.text_encoder of a Qwen-Image pipeline "
            f"as the receiver and a Qwen3-VL model as the sharer.")
    text = getattr(getattr(encoder, "model", encoder), "language_model", None)
    if text is None or not len(getattr(text, "layers", ())) or not hasattr(text.layers[0], "self_attn"):
        raise BridgeSetupError(f"{type(encoder).__name__} has no language_model.layers[i].self_attn; expected "
                               f"transformers' Qwen-VL layout.")
    return text


def variant(family: str, text_config) -> str:
    """The tag's size label, named as ComfyUI's loader names the same checkpoint, so both hosts tag one model alike:
    ComfyUI tells Qwen2.5-VL sizes by the K/V width (256: 3B, 512: 7B) and Qwen3-VL ones by the hidden size
    (2560: 4B, any other: 8B)."""
    if family == "qwen2.5-vl":
        width = text_config.num_key_value_heads * (text_config.hidden_size // text_config.num_attention_heads)
        return {256: "3b", 512: "7b"}.get(width, "custom")
    return "4b" if text_config.hidden_size == 2560 else "8b"


def encoder_arch(encoder) -> TextEncoderArch:
    """The host-neutral architecture tag of a Qwen-VL model, from its configuration (c2c_core.arch)."""
    attn = language_model(encoder).layers[0].self_attn
    family = FAMILIES[encoder.config.model_type]
    text, vision = encoder.config.text_config, encoder.config.vision_config
    rope = text.rope_parameters
    return TextEncoderArch.from_config(
        family, variant(family, text), hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads, head_dim=attn.head_dim, vocab_size=text.vocab_size,
        rope_theta=int(rope["rope_theta"]), vision_patch=vision.patch_size, mrope_sections=rope.get("mrope_section"))


def encoder_signature(encoder) -> ModelSignature:
    """Layers, K/V heads and head_dim of the decoder's self-attention (grouped-query models count K/V heads,
    the width a K/V projector maps), with the architecture tag."""
    arch = encoder_arch(encoder)
    return text_encoder_signature(arch, name=arch.family)


def kv_hooks(text_model, layers, on_kv) -> list:
    """Forward hooks handing each of ``layers``' pre-RoPE K and V, (B, N, H_kv, D) each, to ``on_kv(layer, k, v)``.

    ``on_kv`` returns None (read only) or (k', v'): the layer then attends with them. K is read where
    transformers makes it (``k_norm``'s output, else ``k_proj``'s), V at ``v_proj``, which runs after it;
    V is replaced through the hook's return value, K by copying into its tensor, still unused at that
    point (RoPE comes after both). Returns the hook handles (``handle.remove()``)."""
    handles, seen = [], {}
    for layer in sorted(set(layers)):
        attn = text_model.layers[layer].self_attn
        heads = attn.k_proj.out_features // attn.head_dim

        def keys(module, args, out, layer=layer, heads=heads):
            seen[layer] = out if out.dim() == 4 else out.unflatten(-1, (heads, -1))

        def values(module, args, out, layer=layer, heads=heads):
            k = seen.pop(layer)
            v = out.unflatten(-1, (heads, -1))
            # under autograd the fusion gets its own K: a projector may keep it for backward, and K is overwritten
            fused = on_kv(layer, k.clone() if torch.is_grad_enabled() else k, v)
            if fused is None:
                return None
            k2, v2 = fused
            k.copy_(k2)
            return v2.flatten(-2)

        key_module = attn.k_norm if getattr(attn, "k_norm", None) is not None else attn.k_proj
        handles += [key_module.register_forward_hook(keys), attn.v_proj.register_forward_hook(values)]
    return handles


def _family(encoder) -> str:
    return FAMILIES[encoder.config.model_type]


def _tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


# -- the prompt as each model read it -----------------------------------------------------------------

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


def token_pieces(tokenizer, ids) -> list:
    """Each token's UTF-8 bytes (Qwen's tokenizers are byte-level BPE, so a token split inside a character still has
    its exact bytes): the unit c2c_core.tokens aligns by, as the ComfyUI host spans them (compat.token_pieces)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    return [added[i].encode("utf-8") if i in added else bytes(to_byte[ch] for ch in tokenizer.convert_ids_to_tokens(i))
            for i in ids]


def layouts(tokenizer, input_ids: Tensor, attention_mask: Tensor, image_token: int, image_grid_thw: Optional[Tensor],
            merge: int) -> list:
    """One ``c2c_core.tokens.TokenLayout`` per row: byte spans of the row's text with one placeholder per image (so
    that two models' texts agree around images of different token counts), each run of image tokens a block on its
    merged grid, ``None`` for padding."""
    grids = iter(image_grid_thw if image_grid_thw is not None else ())
    out = []
    for row, mask in zip(input_ids.tolist(), attention_mask.bool().tolist()):
        where = [i for i, m in enumerate(mask) if m]
        if where and where != list(range(where[0], where[-1] + 1)):
            raise BridgeSetupError("a prompt's attention mask has holes; expected padding on one side only.")
        ids = [row[i] for i in where]
        starts = [j for j, t in enumerate(ids) if t != image_token or j == 0 or ids[j - 1] != image_token]
        spans = spans_from_pieces(token_pieces(tokenizer, [ids[j] for j in starts]))
        full, vision = [None] * len(row), []
        for n, (j, span) in enumerate(zip(starts, spans)):
            if ids[j] != image_token:
                full[where[0] + j] = span
                continue
            block = VisionGrid.from_patch_grid(where[0] + j, next(grids), merge)
            size = (starts[n + 1] if n + 1 < len(starts) else len(ids)) - j
            if size != block.size:
                raise BridgeSetupError(f"an image block of {size} tokens where its grid has {block.size}; expected "
                                       f"the image_grid_thw the model's processor returned with these tokens.")
            vision.append(block)
        out.append(TokenLayout(spans=tuple(full), vision=tuple(vision)))
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


class _Gather:
    """FusionRun's ``align`` for one encoding call: receiver token j of row b reads sharer token ``index[b, j]``."""

    def __init__(self, index: Tensor):
        self.index = index

    def __call__(self, sk: Tensor, sv: Tensor):
        idx = self.index.to(sk.device)[:, :, None, None]
        return sk.gather(1, idx.expand(-1, -1, *sk.shape[2:])), sv.gather(1, idx.expand(-1, -1, *sv.shape[2:]))


# -- the bridge ---------------------------------------------------------------------------------------

class TextEncoderBridge:
    """Fuses a sharer Qwen-VL model's K/V into a Qwen-Image pipeline's Qwen2.5-VL text encoder.

    sharer: a transformers Qwen3-VL (or Qwen2.5-VL) model; sharer_processor: its processor (a
        ``Qwen3VLProcessor``; a tokenizer alone serves text-only pipelines). bundle: a
        ``c2c_core.ProjectorBundle`` made for this sharer -> receiver pair. strength: the global strength
        (0 = the stock encoder, bit for bit); layers: the window over the receiver's layers that fuse ("all",
        "0-13", "last8": ``c2c_core.parse_layer_spec``, as the ComfyUI node's ``layers``); layer_strengths:
        {receiver layer: factor} over the layer map's (0 switches a layer off). Every encoding call while
        attached fuses; ``last_report`` is the last call's ``c2c_core.RunReport``.
    """

    def __init__(self, sharer, sharer_processor, bundle, strength: float = 1.0, layer_strengths=None,
                 layers: str = "all"):
        if not isinstance(bundle, ProjectorBundle):
            raise BridgeSetupError(f"TextEncoderBridge(sharer, sharer_processor, bundle, …): bundle is a "
                                   f"{type(bundle).__name__}; expected a c2c_core.ProjectorBundle (load_bundle(path)).")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 2.0:
            raise BridgeSetupError(f"TextEncoderBridge strength={strength!r}; expected a number from 0 to 2.0.")
        self.sharer_text = language_model(sharer)
        self.sharer, self.sharer_processor = sharer, sharer_processor
        self.bundle = bundle
        self.strength = float(strength)
        self.layer_strengths = _layer_factors(bundle, layers, layer_strengths)
        self.banks = BankCache(bundle.bank)
        _check_side(bundle, "sharer", encoder_signature(sharer), sharer)
        self.encoder = self.pipeline = self.tokenizer = self.image_processor = None
        self.last_report = None
        self.last_alignment: Optional[Tensor] = None     # (B, N_receiver): the sharer token each token read
        self._handles: list = []
        self._call: Optional[_Call] = None
        self._training = False

    # -- attach / detach ------------------------------------------------------------------------------
    def attach(self, pipe, tokenizer=None) -> "TextEncoderBridge":
        """Attach to a Qwen-Image pipeline (its ``text_encoder`` and ``processor`` or ``tokenizer``), or to a bare
        Qwen2.5-VL encoder with its ``tokenizer`` (its processor, for image prompts)."""
        if self.encoder is not None:
            raise BridgeSetupError("this TextEncoderBridge is already attached; detach() it first or make another.")
        encoder = getattr(pipe, "text_encoder", pipe)
        if encoder is None:
            raise BridgeSetupError(f"{type(pipe).__name__} has no text_encoder (it was loaded with text_encoder=None); "
                                   f"load the pipeline with its Qwen2.5-VL text encoder.")
        receiver_text = language_model(encoder)
        if _family(encoder) not in RECEIVER_FAMILIES:
            raise BridgeSetupError(f"the receiver is a {_family(encoder)} model; expected Qwen-Image's text encoder "
                                   f"(one of {RECEIVER_FAMILIES}), whose hidden states its DiT was trained on. Pass "
                                   f"the Qwen3-VL model as the sharer.")
        processor = next((p for p in (tokenizer, getattr(pipe, "processor", None), getattr(pipe, "tokenizer", None))
                          if p is not None), None)
        if processor is None:
            raise BridgeSetupError(f"no tokenizer for {type(encoder).__name__}: attach to the pipeline, or pass "
                                   f"attach(text_encoder, tokenizer=…).")
        if encoder is self.sharer:
            raise BridgeSetupError("the sharer is the receiver itself; load the sharer as its own model.")
        _check_side(self.bundle, "receiver", encoder_signature(encoder), encoder)
        self.pipeline = pipe if encoder is not pipe else None
        self.encoder, self.receiver_text = encoder, receiver_text
        self.tokenizer = _tokenizer_of(processor)
        self.image_processor = getattr(processor, "image_processor", None)
        self._handles = [encoder.register_forward_pre_hook(self._before, with_kwargs=True),
                         encoder.register_forward_hook(self._after, always_call=True),
                         *kv_hooks(receiver_text, self.bundle.layer_map.pairs, self._fuse)]
        return self

    def detach(self) -> None:
        """Remove every hook: the encoder is the stock one again."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._call = [], None
        self.encoder = self.pipeline = None

    def __enter__(self) -> "TextEncoderBridge":
        if self.encoder is None:
            raise BridgeSetupError("`with TextEncoderBridge(...)`: attach it first: `with bridge.attach(pipe):`.")
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    @contextmanager
    def training(self):
        """Encoding calls inside fuse through the bundle's own bank as it is (no copy placed on the encoder's
        dtype, which autograd would not reach; no report statistics), as projector training needs; with a
        bank in the encoder's dtype that is bit for bit what inference fuses."""
        self._training = True
        try:
            yield self
        finally:
            self._training = False

    # -- one encoding call --------------------------------------------------------------------------------
    def _before(self, module, args, kwargs):
        self._call = None
        if args:
            raise BridgeSetupError("the text encoder was called with positional arguments; the bridge reads keyword "
                                   "arguments (input_ids=…, attention_mask=…) as diffusers' Qwen-Image pipelines "
                                   "pass them.")
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise BridgeSetupError("the text encoder was called with a KV cache; the bridge fuses a fresh prefill "
                                   "only (as the Qwen-Image pipelines encode prompts).")
        probe = self._run(None, None)
        if not probe.begin_call(0.0):
            self.last_report = probe.close(SourceReport())
            return None
        index, kv = self._prepare(kwargs)
        self.last_alignment = index
        self._call = _Call(index, kv)
        return None

    def _run(self, device, dtype, align=None) -> FusionRun:
        """A FusionRun for one encoding call; its bank is placed on ``device``/``dtype`` (none in training mode)."""
        return FusionRun(self.bundle, FusionSchedule(), self.strength, self.layer_strengths,
                         align=align or _Gather(torch.zeros(0, 0, dtype=torch.long)),
                         device=None if self._training else device, dtype=None if self._training else dtype,
                         banks=self.banks, stats=not self._training)

    def _after(self, module, args, output):
        call, self._call = self._call, None
        if call is None or call.run is None:
            return None
        report = call.run.close(SourceReport(sharer_forwards=1, peak_kv_bytes=call.kv_bytes))
        self.last_report = report
        if report.nonfinite_layers:
            raise BridgeSetupError(f"{health.nonfinite_hint(report.nonfinite_layers)} (TextEncoderBridge strength="
                                   f"{self.strength!r}; bridge.last_report has the details).")
        return None

    def _fuse(self, layer, k, v):
        call = self._call
        if call is None:
            return None
        if call.run is None:        # at the first fused layer: the K/V's device and dtype are known (CPU offload
            call.run = self._run(k.device, k.dtype, _Gather(call.index))     # moves the encoder only now)
            call.run.begin_call(0.0)
        if call.run.strength(layer) == 0.0:
            return None
        sk, sv = call.sharer_kv[call.run.sharer_layer(layer)]
        return call.run.fuse(layer, k, v, sk, sv)

    def _prepare(self, kwargs) -> tuple[Tensor, dict]:
        """Run the sharer on the receiver's text (and image): the (B, N) token alignment of this call and the
        sharer's K/V by layer."""
        input_ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if input_ids is None:
            raise BridgeSetupError("the text encoder was called without input_ids (inputs_embeds only); the bridge "
                                   "needs the token ids to give the sharer the same text.")
        if mask is None:
            mask = torch.ones_like(input_ids)
        image_token = self.encoder.config.image_token_id
        if kwargs.get("pixel_values") is None and bool((input_ids == image_token).any()):
            raise BridgeSetupError("the prompt holds image placeholders (<|image_pad|>) but the text encoder got no "
                                   "pixel_values; pass the edit image (QwenImageEditPipeline(image=…)).")
        texts = [_PLACEHOLDER_RUN.sub(r"\1", t) for t in _decode_rows(self.tokenizer, input_ids, mask)]
        receiver = layouts(self.tokenizer, input_ids, mask, image_token, kwargs.get("image_grid_thw"),
                           self.encoder.config.vision_config.spatial_merge_size)
        inputs = self._sharer_inputs(texts, kwargs)
        kv = self._run_sharer(inputs)
        sharer = layouts(_tokenizer_of(self.sharer_processor), inputs["input_ids"].cpu(),
                         inputs["attention_mask"].cpu(), self.sharer.config.image_token_id,
                         inputs.get("image_grid_thw"), self.sharer.config.vision_config.spatial_merge_size)
        return torch.stack([align_tokens(r, s) for r, s in zip(receiver, sharer)]), kv

    def _sharer_inputs(self, texts: list, kwargs) -> dict:
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
        grid = kwargs.get("image_grid_thw")
        images = recover_images(pixel_values, grid, self.image_processor)
        _check_recovered(images, pixel_values, grid, self.image_processor)
        inputs = dict(self.sharer_processor(text=texts, images=images, padding=True, return_tensors="pt"))
        if kwargs.get("mm_token_type_ids") is None and not NEEDS_TOKEN_TYPES[_family(self.sharer)]:
            inputs.pop("mm_token_type_ids", None)     # positions as the receiver got them (module docstring)
        return inputs

    def _run_sharer(self, inputs: dict) -> dict:
        """The sharer's pre-RoPE K/V of the layers the projector reads, from one forward over the prompt."""
        device = next(self.sharer.parameters()).device
        captured: dict = {}

        def keep(layer, k, v):
            captured[layer] = (k, v)
            return None

        handles = kv_hooks(self.sharer_text, set(self.bundle.layer_map.pairs.values()), keep)
        try:
            with torch.no_grad():            # the sharer is never trained through
                self.sharer(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()})
        finally:
            for handle in handles:
                handle.remove()
        return captured


def _layer_factors(bundle, layers: str, layer_strengths) -> dict:
    """Per receiver layer factors: 0 outside the ``layers`` window, then ``layer_strengths``."""
    try:
        window = set(parse_layer_spec(layers, bundle.receiver.num_layers))
    except (LayerMapError, TypeError) as exc:
        raise BridgeSetupError(f"TextEncoderBridge layers={layers!r}: {exc}") from None
    fused = set(bundle.layer_map.pairs)
    if not window & fused:
        raise BridgeSetupError(f"TextEncoderBridge layers={layers!r} selects layers {sorted(window)}, none of the "
                               f"projector's layers {sorted(fused)}; widen the window, or use 'all'.")
    return {**{layer: 0.0 for layer in fused - window}, **dict(layer_strengths or {})}


@dataclass
class _Call:
    """One fusing encoding call: the token alignment, the sharer's K/V by sharer layer, and the FusionRun (made at
    the first fused layer)."""

    index: Tensor
    sharer_kv: dict
    run: Optional[FusionRun] = None

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.sharer_kv.values() for t in pair)


def _check_side(bundle, role: str, found: ModelSignature, model) -> None:
    made_for = getattr(bundle, role)
    if not found.same_shape(made_for):
        raise BridgeSetupError(
            f"{role} {type(model).__name__} has {found.num_layers} layers × {found.num_heads} K/V heads × "
            f"{found.head_dim}; the projector bundle was made for {made_for.num_layers} × {made_for.num_heads} × "
            f"{made_for.head_dim}. Use the bundle made for this {role}.")
    check_architecture(bundle, role, found)


# -- diffusers' shape: a config dataclass, apply_…(pipe, config) / remove_…(pipe) ---------------------------

@dataclass
class TextEncoderBridgeConfig:
    """What ``apply_text_encoder_bridge`` fuses: projector (a bundle file or ProjectorBundle), strength (0..2),
    layers (the window over receiver layers: "all", "0-13", "last8"), layer_strengths ({receiver layer: factor})."""

    projector: object
    strength: float = 1.0
    layers: str = "all"
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
    bridge = TextEncoderBridge(sharer, sharer_processor, bundle, config.strength, config.layer_strengths,
                               config.layers).attach(pipe)
    _applied.setdefault(pipe, []).append(bridge)
    return bridge


def remove_text_encoder_bridge(pipe) -> None:
    """Detach every bridge ``apply_text_encoder_bridge`` put on ``pipe`` (most recent first); a no-op without one."""
    for bridge in reversed(_applied.pop(pipe, [])):
        bridge.detach()
