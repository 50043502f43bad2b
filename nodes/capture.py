"""Capture KV Cache: declares a sharer and how its K/V are taken (live, or recorded for low VRAM)."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..c2c_core import LayerMapError, parse_layer_spec
from ..c2c_core.recording import STORAGE_DTYPES
from ..c2c_comfy import recorded
from ..c2c_comfy.live import LiveSharer
from ..c2c_comfy.errors import BridgeInputError
from .projector import check_projector_fits, model_signature
from .types import CATEGORY, KVSource, Projector

GRID_ALIGNMENTS = ["refuse", "nearest", "trilinear"]


class CaptureKVCache(io.ComfyNode):
    NODE = "Capture KV Cache"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTCacheBridge_CaptureKVCache", display_name=cls.NODE, category=CATEGORY,
            description="The sharer model and its own conditioning. live: its self-attention K/V are captured at "
                        "every model call of the receiver (same latent, same sigma). recorded: the sharer is "
                        "sampled here, alone, and its K/V recorded for replay, so only one model is resident.",
            inputs=sharer_inputs() + [
                io.Combo.Input("mode", options=["live", "recorded"], default="live",
                               tooltip="live: both models resident, the sharer runs inside each receiver step. "
                                       "recorded: sample the sharer now and record its K/V (low VRAM); needs "
                                       "latent_image and the sampler settings below, equal to the receiver's."),
                io.String.Input("layers", default="auto",
                                tooltip="Sharer layers to capture: 'auto' captures exactly what the projector "
                                        "needs (recorded mode: connect the projector, else all layers); or 'all', "
                                        "'0-3,7', 'last4'."),
                io.Int.Input("refresh_every", default=1, min=1, max=1000,
                             tooltip="Use fresh sharer K/V every k-th step and reuse them in between "
                                     "(1 = every model call, exact lockstep)."),
                io.Combo.Input("rope_alignment", options=["auto", "off"], default="auto",
                               tooltip="auto: re-rotate the sharer's keys to the receiver's RoPE positions when "
                                       "they differ (e.g. ChronoEdit under ScaleROPE scale_t 7). off: fuse as is."),
                io.Combo.Input("grid_alignment", options=GRID_ALIGNMENTS, default="refuse",
                               tooltip="When the sharer's conditioning has another latent size/length than the "
                                       "receiver's: refuse (error), or run the sharer on the receiver's latent "
                                       "resampled to its own grid and resample its K/V back (nearest/trilinear)."),
                Projector.Input("projector", optional=True,
                                tooltip="Optional: lets 'auto' layers capture exactly what this projector reads."),
                io.Latent.Input("latent_image", optional=True,
                                tooltip="Recorded mode: the latent the receiver samples (same size and length)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, optional=True,
                             tooltip="Recorded mode: the receiver's seed."),
                io.Int.Input("steps", default=20, min=1, max=10000, optional=True,
                             tooltip="Recorded mode: the receiver's number of steps."),
                io.Float.Input("cfg", default=4.0, min=0.0, max=100.0, step=0.1, round=0.01, optional=True,
                               tooltip="Recorded mode: CFG of the sharer's recording run (> 1 records the "
                                       "negative pass the receiver's CFG needs)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, optional=True,
                               tooltip="Recorded mode: the receiver's sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, optional=True,
                               tooltip="Recorded mode: the receiver's scheduler."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Recorded mode: the receiver's denoise."),
                io.Combo.Input("storage_dtype", options=list(STORAGE_DTYPES), default="bf16", optional=True,
                               tooltip="Recorded mode: precision of the stored K/V (fp32 exact; bf16/fp16 half "
                                       "the memory; fp8 a quarter, with a per-tensor scale)."),
                io.Combo.Input("storage", options=["ram", "disk"], default="ram", optional=True,
                               tooltip="Recorded mode: keep the recording in RAM, or spill it to safetensors "
                                       "files in ComfyUI's temp folder (read back one step at a time)."),
            ],
            outputs=[KVSource.Output(tooltip="A K/V source for Fuse Caches (or Save KV Cache when recorded).")],
        )

    @classmethod
    def execute(cls, sharer, positive, negative, mode="live", layers="auto", refresh_every=1, rope_alignment="auto",
                grid_alignment="refuse", projector=None, latent_image=None, seed=0, steps=20, cfg=4.0,
                sampler_name="euler", scheduler="simple", denoise=1.0, storage_dtype="bf16",
                storage="ram") -> io.NodeOutput:
        source = make_live_source(cls.NODE, sharer, positive, negative, layers, refresh_every, rope_alignment,
                                  grid_alignment, projector)
        if mode == "live":
            return io.NodeOutput(source)
        chosen = source.layers if source.layers is not None else tuple(range(source.signature.num_layers))
        recording = recorded.record(cls.NODE, sharer, positive, negative, chosen, latent_image, seed, steps, cfg,
                                    sampler_name, scheduler, denoise, storage_dtype, storage, source.signature)
        return io.NodeOutput(recorded.RecordedSource(recording, source.signature, chosen, int(refresh_every),
                                                     rope_alignment, grid_alignment, cls.NODE))


def sharer_inputs(prefix: str = ""):
    return [
        io.Model.Input("sharer", tooltip="The model whose K/V are shared (e.g. ChronoEdit, or another Wan2.1)."),
        io.Conditioning.Input(f"{prefix}positive",
                              tooltip="The sharer's own positive conditioning (for an I2V sharer, from its "
                                      "WanImageToVideo node)."),
        io.Conditioning.Input(f"{prefix}negative", tooltip="The sharer's own negative conditioning."),
    ]


def make_live_source(node, sharer, positive, negative, layers="auto", refresh_every=1, rope_alignment="auto",
                     grid_alignment="refuse", projector=None, cond_inputs=("positive", "negative")):
    signature = model_signature(node, "sharer", sharer)
    chosen = None
    if layers.strip().lower() != "auto":
        try:
            chosen = tuple(parse_layer_spec(layers, signature.num_layers))
        except (LayerMapError, ValueError) as e:
            raise BridgeInputError(node, "layers", repr(layers), "'auto' or a layer list such as 'all', '0-3,7'",
                                   str(e)) from e
    elif projector is not None:
        check_projector_fits(node, projector, signature, projector.receiver)
        chosen = tuple(sorted(set(projector.layer_map.pairs.values())))
    return LiveSharer(model=sharer, positive=positive, negative=negative, signature=signature, layers=chosen,
                      refresh_every=int(refresh_every), rope_alignment=rope_alignment,
                      grid_alignment=grid_alignment, node=node, cond_inputs=cond_inputs)
