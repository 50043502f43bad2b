"""Capture KV Cache: declares a sharer and how its K/V are taken."""
from __future__ import annotations

from comfy_api.latest import io

from ..c2c_core import LayerMapError, parse_layer_spec
from .bridge import LiveSharer
from .errors import BridgeInputError
from .projector_nodes import model_signature
from .types import CATEGORY, KVSource


class CaptureKVCache(io.ComfyNode):
    NODE = "Capture KV Cache"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CaptureKVCache", display_name=cls.NODE, category=CATEGORY,
            description="The sharer model and its own conditioning. Its self-attention K/V are captured at every "
                        "sampling step of the receiver (same latent, same sigma) and handed to Fuse Caches.",
            inputs=sharer_inputs() + [
                io.String.Input("layers", default="auto",
                                tooltip="Sharer layers to capture: 'auto' captures exactly what the projector "
                                        "needs; or 'all', '0-3,7', 'last4'."),
                io.Int.Input("refresh_every", default=1, min=1, max=1000,
                             tooltip="Run the sharer every k-th step and reuse its K/V in between "
                                     "(1 = every model call, exact lockstep)."),
                io.Combo.Input("rope_alignment", options=["auto", "off"], default="auto",
                               tooltip="auto: re-rotate the sharer's keys to the receiver's RoPE positions when "
                                       "they differ (e.g. ChronoEdit under ScaleROPE scale_t 7). off: fuse as is."),
            ],
            outputs=[KVSource.Output(tooltip="A K/V source for Fuse Caches.")],
        )

    @classmethod
    def execute(cls, sharer, positive, negative, layers, refresh_every, rope_alignment) -> io.NodeOutput:
        return io.NodeOutput(make_live_source(cls.NODE, sharer, positive, negative, layers, refresh_every,
                                              rope_alignment))


def sharer_inputs(prefix: str = ""):
    return [
        io.Model.Input("sharer", tooltip="The model whose K/V are shared (e.g. ChronoEdit, or another Wan2.1)."),
        io.Conditioning.Input(f"{prefix}positive",
                              tooltip="The sharer's own positive conditioning (for an I2V sharer, from its "
                                      "WanImageToVideo node)."),
        io.Conditioning.Input(f"{prefix}negative", tooltip="The sharer's own negative conditioning."),
    ]


def make_live_source(node, sharer, positive, negative, layers="auto", refresh_every=1, rope_alignment="auto",
                     input_prefix=""):
    signature = model_signature(node, "sharer", sharer)
    chosen = None
    if layers.strip().lower() != "auto":
        try:
            chosen = tuple(parse_layer_spec(layers, signature.num_layers))
        except (LayerMapError, ValueError) as e:
            raise BridgeInputError(node, "layers", repr(layers), "'auto' or a layer list such as 'all', '0-3,7'",
                                   str(e)) from e
    return LiveSharer(model=sharer, positive=positive, negative=negative, signature=signature, layers=chosen,
                      refresh_every=int(refresh_every), rope_alignment=rope_alignment, node=node)
