"""Bridged Qwen Text Encode: Qwen-Image's text encoder reads a Qwen3-VL sharer's K/V while it encodes."""
from __future__ import annotations

import logging
import math

from comfy_api.latest import io

from c2c_core import LayerMapError, parse_layer_spec
from c2c_core.errors import quote
from ..c2c_comfy import compat
from ..c2c_comfy.errors import BridgeInputError, check
from ..c2c_comfy.text_encoder import RECEIVER_KINDS, SHARER_KINDS, STOCK_NODES, BridgedClip, encoder_of, \
    encoder_signature
from .fuse import _reporter, parse_layer_strengths
from .projector import check_projector_fits, untrained_warning
from .types import CATEGORY, Projector

log = logging.getLogger("dit_cache_bridge")

MODES = list(STOCK_NODES)


class BridgedQwenTextEncode(io.ComfyNode):
    NODE = "Bridged Qwen Text Encode"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTCacheBridge_BridgedQwenTextEncode", display_name=cls.NODE, category=CATEGORY,
            description="Encodes a prompt (and edit images) for Qwen-Image / Qwen-Image-Edit with its own text "
                        "encoder (Qwen2.5-VL), whose self-attention reads the projected K/V of a sharer encoder "
                        "(Qwen3-VL) over the same prompt and images. The CONDITIONING goes to the stock Qwen-Image "
                        "sampler graph, like TextEncodeQwenImageEdit's.",
            inputs=[
                io.Clip.Input("clip", tooltip="The receiver: Qwen-Image's text encoder (Load CLIP, qwen_2.5_vl_7b, "
                                              "type qwen_image). Used through a copy, never changed."),
                io.Clip.Input("sharer_clip", tooltip="The sharer: a Qwen3-VL text encoder (Load CLIP, e.g. "
                                                     "qwen3_vl_8b; needs a ComfyUI with Qwen3-VL, 0.33 or newer)."),
                Projector.Input("projector", tooltip="A projector for this encoder pair (Load C2C Projector, or "
                                                     "Create C2C Projector with the two CLIPs)."),
                io.String.Input("prompt", multiline=True, dynamic_prompts=True),
                io.Combo.Input("mode", options=MODES, default="edit",
                               tooltip="text: the prompt alone (as CLIPTextEncode). edit: as "
                                       "TextEncodeQwenImageEdit (one image, its template). edit_plus: as "
                                       "TextEncodeQwenImageEditPlus (up to three images, 'Picture N:' template)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="How much of the projected sharer K/V replaces the receiver's: 0 = the stock "
                                       "encoder's conditioning (bit-identical), 1 = full projector output."),
                io.String.Input("layers", default="all",
                                tooltip="Window over the receiver's layers: fuse only these of the projector's "
                                        "layers ('all', ranges like '0-13', 'last8', 'first4')."),
                io.String.Input("layer_strengths", default="", optional=True,
                                tooltip="Optional per-layer strength multipliers, e.g. '0:0.5, 20:1.0'. Unlisted "
                                        "layers keep 1.0."),
                io.Vae.Input("vae", optional=True,
                             tooltip="edit / edit_plus: encodes the images as reference latents, as the stock nodes do."),
                io.Image.Input("image1", optional=True, tooltip="edit / edit_plus: the image to edit."),
                io.Image.Input("image2", optional=True, tooltip="edit_plus only."),
                io.Image.Input("image3", optional=True, tooltip="edit_plus only."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Conditioning for the Qwen-Image sampler graph.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, clip, sharer_clip, projector, prompt, mode, strength, layers, layer_strengths="", vae=None,
                image1=None, image2=None, image3=None) -> io.NodeOutput:
        node = cls.NODE
        images = [image1, image2, image3]
        check_mode(node, mode, images)
        check(type(strength) in (int, float) and math.isfinite(strength) and 0.0 <= strength <= 2.0, node, "strength",
              quote(strength, 40), "a number from 0 to 2", "use 1 for the projector's full output, 0 for none")
        receiver_sig = encoder_signature(encoder_of(node, "clip", clip, RECEIVER_KINDS))
        sharer_sig = encoder_signature(encoder_of(node, "sharer_clip", sharer_clip, SHARER_KINDS))
        check_projector_fits(node, projector, sharer_sig, receiver_sig)
        factors = layer_factors(node, projector, receiver_sig.num_layers, layers, layer_strengths)
        warning = untrained_warning(projector)
        if warning:
            log.warning("%s: %s", node, warning)
        bridged = BridgedClip(node, clip, sharer_clip, projector, strength, factors)
        inputs = {"clip": bridged if strength > 0 else compat.clone_clip(clip), "prompt": prompt, "vae": vae}
        if mode == "edit_plus":
            inputs.update(image1=image1, image2=image2, image3=image3)
        elif mode == "edit":
            inputs.update(image=image1)
        (conditioning,) = compat.run_stock_node(compat.stock_qwen_encode_node(STOCK_NODES[mode]), **inputs)
        send = _reporter(cls.hidden.unique_id if cls.hidden else None, [warning] if warning else [])
        if send is not None and bridged.report is not None:
            send(bridged.report)
        return io.NodeOutput(conditioning)


def check_mode(node: str, mode, images) -> None:
    """Each mode takes the images its stock node takes: an edit prompt without its image would silently encode the
    text-only template, and images in text mode would be dropped."""
    check(mode in MODES, node, "mode", quote(mode, 60), f"one of {MODES}", "pick a mode from the list")
    given = [f"image{i + 1}" for i, image in enumerate(images) if image is not None]
    if mode == "text":
        check(not given, node, given[0] if given else "mode", f"mode 'text' with {', '.join(given)} connected",
              "no image in text mode", "set mode to 'edit' or 'edit_plus', or disconnect the image")
    else:
        check("image1" in given, node, "image1", f"mode '{mode}' without image1",
              "the image to edit connected to image1", "connect the image (Load Image), or set mode to 'text'")
        check(mode == "edit_plus" or given == ["image1"], node, given[-1], f"mode 'edit' with {', '.join(given)}",
              "one image (image1) in mode 'edit'", "set mode to 'edit_plus' for two or three images")


def layer_factors(node: str, bundle, num_layers: int, layers: str, layer_strengths: str) -> dict:
    """Per-layer strength factors: the ``layers`` window (layers outside it: 0), then ``layer_strengths``."""
    check(isinstance(layers, str) and len(layers) <= 200, node, "layers", quote(layers, 60),
          "a layer list such as 'all', '0-13' or 'last8'", "type a layer list")
    try:
        window = set(parse_layer_spec(layers, num_layers))
    except (LayerMapError, ValueError) as e:
        raise BridgeInputError(node, "layers", quote(layers), "a layer list", str(e)) from e
    fused = set(bundle.layer_map.pairs)
    check(bool(window & fused), node, "layers", f"{quote(layers)} (layers {sorted(window)})",
          f"at least one of the projector's layers {sorted(fused)}", "widen the window, or use 'all'")
    factors = {layer: 0.0 for layer in fused - window}
    factors.update(parse_layer_strengths(node, layer_strengths, fused & window))
    return factors
