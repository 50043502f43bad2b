"""Fuse Caches: a receiver clone that fuses a K/V source through a projector."""
from __future__ import annotations

import dataclasses
import logging
import math

from comfy_api.latest import io

from c2c_core import RAMPS, FusionSchedule, ScheduleError
from c2c_core.contract import DIRECTIONS
from ..c2c_comfy.bridge import Bridge
from ..c2c_comfy.errors import BridgeInputError, check
from ..c2c_comfy.live import with_direction
from ..c2c_comfy.validate import check_inputs
from .projector import check_projector_fits, check_same_latent, model_signature, untrained_warning
from .types import CATEGORY, KVSource, Projector

log = logging.getLogger("dit_cache_bridge")


def fusion_inputs():
    return [
        io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01,
                       tooltip="How much of the projected sharer K/V replaces the receiver's: 0 = receiver alone "
                               "(bit-identical), 1 = full projector output; above 1 extrapolates past the "
                               "projector output (receiver + strength × (projected − receiver)), for experiments."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Where fusion starts, in percent of the noise schedule (sigma percent, as "
                               "ControlNet and hooks count it): 0 = the first step of a full run."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Where fusion stops, in percent of the noise schedule (sigma percent, inclusive); "
                               "the sharer is not run outside the window. Split samplers (KSamplerAdvanced) and "
                               "partial denoise see the same window as one full run."),
        io.Combo.Input("ramp", options=list(RAMPS), default="constant", optional=True,
                       tooltip="Strength over the window: constant, rising, falling, or a cosine fall."),
        io.String.Input("layer_strengths", default="", optional=True,
                        tooltip="Optional per-layer strength multipliers, e.g. '0:0.5, 12:1.0, 39:0'. "
                                "Unlisted layers keep 1.0."),
        io.Combo.Input("direction", options=list(DIRECTIONS), default=DIRECTIONS[0], optional=True,
                       tooltip="sharer_to_receiver: the receiver reads the sharer's K/V. bidirectional (live only): "
                               "the sharer also reads the receiver's K/V of the same block through "
                               "backward_projector, so the sharer's later layers carry what it received."),
        Projector.Input("backward_projector", optional=True,
                        tooltip="bidirectional: a projector from the receiver to the sharer (Create C2C Projector "
                                "with the two models swapped, or a trained one). Not needed when the projector "
                                "bundle holds a backward bank; connected, it wins over that bank."),
        io.Float.Input("backward_strength", default=1.0, min=0.0, max=2.0, step=0.01, optional=True,
                       tooltip="bidirectional: strength of the receiver -> sharer fusion (0 = the sharer stays "
                               "itself: the same as sharer_to_receiver)."),
    ]


class FuseCaches(io.ComfyNode):
    NODE = "Fuse Caches"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTCacheBridge_FuseCaches", display_name=cls.NODE, category=CATEGORY,
            description="Returns a copy of the receiver that fuses the sharer's projected K/V into its "
                        "self-attention at every step. Use it with the stock KSampler, KSamplerAdvanced or "
                        "SamplerCustomAdvanced. Chain several Fuse Caches to add more sharers.",
            inputs=[
                io.Model.Input("model", tooltip="The receiver model (e.g. Wan2.1). It is cloned, never changed."),
                KVSource.Input("kv_source", tooltip="From Capture KV Cache (live), or Record KV Cache / Load KV "
                                                    "Cache (recorded)."),
                Projector.Input("projector", tooltip="From Load C2C Projector or Create C2C Projector."),
            ] + fusion_inputs(),
            outputs=[io.Model.Output(tooltip="The bridged receiver (a clone).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, kv_source, projector, strength, start_percent, end_percent, ramp="constant",
                layer_strengths="", direction=DIRECTIONS[0], backward_projector=None,
                backward_strength=1.0) -> io.NodeOutput:
        check_inputs(cls, locals())
        patched = bridge_model(cls.NODE, model, kv_source, projector, strength, start_percent, end_percent, ramp,
                               layer_strengths, report_to=cls.hidden.unique_id if cls.hidden else None,
                               direction=direction, backward_projector=backward_projector,
                               backward_strength=backward_strength)
        return io.NodeOutput(patched)


def parse_layer_strengths(node: str, text: str, layers) -> dict:
    out = {}
    for item in filter(None, (p.strip() for p in (text or "").replace(";", ",").split(","))):
        try:
            layer, value = item.split(":")
            layer, value = int(layer), float(value)
        except ValueError:
            raise BridgeInputError(node, "layer_strengths", repr(item), "'layer:strength' pairs such as '0:0.5, 3:1'",
                                   "write each entry as layer index, colon, number") from None
        check(layer in layers, node, "layer_strengths", f"layer {layer}",
              f"one of the fused receiver layers {sorted(layers)}", "remove it or fuse that layer in the projector")
        check(math.isfinite(value) and 0.0 <= value <= 2.0, node, "layer_strengths",
              f"strength {value} for layer {layer}", "a value from 0 to 2 (as strength)", "use 0 to switch a layer off")
        out[layer] = value
    return out


def bridge_model(node, model, source, bundle, strength, start_percent, end_percent, ramp="constant",
                 layer_strengths="", report_to=None, model_input="model", direction=DIRECTIONS[0],
                 backward_projector=None, backward_strength=1.0):
    """Validate everything, then return a bridged clone of ``model``."""
    receiver_sig = model_signature(node, model_input, model)
    if isinstance(getattr(source, "model", None), type(model)):
        check_same_latent(node, "sharer" if source.node == node else model_input, source.model, model)
    check_projector_fits(node, bundle, source.signature, receiver_sig)
    if direction == DIRECTIONS[1]:
        backward_projector = backward_bank(node, bundle, backward_projector, source.signature, receiver_sig)
    source = with_direction(node, source, direction, backward_projector, backward_strength, receiver_sig)
    needed = sorted(set(bundle.layer_map.pairs.values()))
    if getattr(source, "layers", None) is not None:
        missing = sorted(set(needed) - set(source.layers))
        check(not missing, node, "kv_source", f"a capture of sharer layers {list(source.layers)}",
              f"all sharer layers the projector reads ({needed})",
              f"add layers {missing} in {getattr(source, 'node', 'Capture KV Cache')}, or set its layers to 'auto'")
    try:
        schedule = FusionSchedule(start=start_percent, end=end_percent, ramp=ramp)
    except ScheduleError as e:
        raise BridgeInputError(node, "start_percent", f"window {start_percent}–{end_percent}",
                               "start_percent ≤ end_percent", str(e)) from e
    warnings = [w for w in (untrained_warning(bundle),) if w]
    for warning in warnings:
        log.warning("%s: %s", node, warning)
    warnings += source.warnings         # logged by the node that made the source
    per_layer = parse_layer_strengths(node, layer_strengths, set(bundle.layer_map.pairs))
    if per_layer:
        layer_map = dataclasses.replace(bundle.layer_map, strengths={**bundle.layer_map.strengths, **per_layer})
        bundle = dataclasses.replace(bundle, layer_map=layer_map)
    bridge = Bridge(source, bundle, float(strength), schedule, receiver_sig, on_report=_reporter(report_to, warnings), node=node,
                    model_input=model_input)
    return bridge.attach(model)


def backward_bank(node, bundle, backward_projector, sharer_sig, receiver_sig):
    """The receiver -> sharer bank for bidirectional fusion: the connected backward_projector wins, else the
    projector bundle's own backward bank; None when there is neither (with_direction then says what to connect)."""
    if backward_projector is not None:
        if backward_projector.sharer.same_shape(receiver_sig) and backward_projector.receiver.same_shape(sharer_sig):
            check_projector_fits(node, backward_projector, receiver_sig, sharer_sig, input_name="backward_projector")
        return backward_projector
    return getattr(bundle, "backward", None)


def _reporter(node_id, warnings=()):
    """Send each run's per-layer report (and what the user should know about it) to the fusion inspector."""
    if node_id is None:
        return None

    def send(report):
        from server import PromptServer
        if getattr(PromptServer, "instance", None) is not None:
            PromptServer.instance.send_sync("dit_cache_bridge.report", {"node": str(node_id), "report": {
                **report.to_json(), "warnings": list(warnings)}})
    return send
