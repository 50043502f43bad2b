"""Record KV Cache: sample the sharer alone and record its K/V, so only one model is resident at a time."""
from __future__ import annotations

from comfy_api.latest import io

from c2c_core.recording import STORAGE_DTYPES
from ..c2c_comfy import compat, recorded
from ..c2c_comfy.live import missing_image_warnings
from ..c2c_comfy.errors import check
from ..c2c_comfy.validate import check_inputs
from .capture import DEFAULT_REFRESH, GRID_ALIGNMENTS, capture_layers, refresh_inputs, refresh_policy, sharer_inputs
from .projector import model_signature
from .types import CATEGORY, KVSource, Projector


class RecordKVCache(io.ComfyNode):
    NODE = "Record KV Cache"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTCacheBridge_RecordKVCache", display_name=cls.NODE, category=f"{CATEGORY}/recorded",
            description="Samples the sharer alone with the receiver's sampler settings and records its "
                        "self-attention K/V (recorded, low-VRAM mode); Fuse Caches then replays them into the "
                        "receiver, so the two models are never resident together.",
            inputs=sharer_inputs() + [
                io.Latent.Input("latent_image",
                                tooltip="The latent the receiver's KSampler samples (same size and length)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The noise seed: the receiver's KSampler seed (set both to 'fixed', or "
                                     "feed both from one seed node)."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The receiver's number of steps."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG of the recording run; > 1 also records the negative pass the "
                                       "receiver's CFG needs. Use the receiver's cfg."),
                io.Combo.Input("sampler_name", options=compat.sampler_names(),
                               tooltip="The receiver's sampler."),
                io.Combo.Input("scheduler", options=compat.scheduler_names(),
                               tooltip="The receiver's scheduler."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="The receiver's denoise."),
                io.String.Input("layers", default="auto",
                                tooltip="Sharer layers to record: 'auto' records exactly what the connected "
                                        "projector reads (all layers without one); or 'all', '0-3,7', 'last4'."),
                io.Combo.Input("storage_dtype", options=list(STORAGE_DTYPES), default="bf16",
                               tooltip="Precision of the stored K/V: fp32 exact; bf16/fp16 half the memory; fp8 "
                                       "a quarter, with a per-tensor scale."),
                io.Combo.Input("storage", options=["ram", "disk"], default="ram",
                               tooltip="Keep the recording in RAM, or spill it to safetensors files in "
                                       "ComfyUI's temp folder (read back one step at a time)."),
                io.Int.Input("refresh_every", default=1, min=1, max=1000,
                             tooltip="Replay: reuse each recorded step's K/V for k steps (1 = every step)."),
                io.Combo.Input("rope_alignment", options=["auto", "off"], default="auto",
                               tooltip="Replay: re-rotate the sharer's keys to the receiver's RoPE positions "
                                       "when they differ (e.g. ChronoEdit under ScaleROPE scale_t 7). off: as is."),
                io.Combo.Input("grid_alignment", options=GRID_ALIGNMENTS, default="refuse",
                               tooltip="Replay: when the receiver's latent grid differs from the recording's, "
                                       "refuse (error) or resample the K/V (nearest/trilinear)."),
                Projector.Input("projector", optional=True,
                                tooltip="Optional: lets 'auto' layers record exactly what this projector reads."),
            ] + refresh_inputs(),
            outputs=[KVSource.Output(tooltip="The recording: a K/V source for Fuse Caches or Save KV Cache.")],
        )

    @classmethod
    def execute(cls, sharer, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                denoise=1.0, layers="auto", storage_dtype="bf16", storage="ram", refresh_every=1,
                rope_alignment="auto", grid_alignment="refuse", projector=None, refresh="every",
                threshold=DEFAULT_REFRESH.threshold, budget=DEFAULT_REFRESH.budget,
                max_reuse=DEFAULT_REFRESH.max_reuse) -> io.NodeOutput:
        check_inputs(cls, locals())
        policy = refresh_policy(cls.NODE, refresh, refresh_every, threshold, budget, max_reuse)
        signature = model_signature(cls.NODE, "sharer", sharer)
        chosen = capture_layers(cls.NODE, signature, layers, projector)
        if chosen is None:
            chosen = tuple(range(signature.num_layers))
        check_image_latents(cls.NODE, {"positive": positive, "negative": negative}, latent_image)
        check_latent_channels(cls.NODE, sharer, latent_image)
        warnings = missing_image_warnings(cls.NODE, sharer, {"positive": positive, "negative": negative})
        recording = recorded.record(cls.NODE, sharer, positive, negative, chosen, latent_image, seed, steps, cfg,
                                    sampler_name, scheduler, denoise, storage_dtype, storage, signature)
        return io.NodeOutput(recorded.RecordedSharer(recording, signature, chosen, policy,
                                                     rope_alignment, grid_alignment, cls.NODE, warnings))


def check_latent_channels(node: str, sharer, latent_image) -> None:
    """The recorded latent must be the sharer's format (Wan2.2-TI2V-5B: 48 channels, Wan2.1: 16), before any load."""
    name, channels = compat.latent_format(sharer)
    shape = tuple(latent_image["samples"].shape)
    check(len(shape) == 5 and shape[1] == channels, node, "latent_image",
          f"a latent of shape {shape}", f"the sharer's {name} latent (batch, {channels} channels, frames, height, "
          "width)", "make the latent with the empty-latent node of the sharer's family (Wan2.2-TI2V-5B: "
          "Wan22ImageToVideoLatent; Wan2.1, ChronoEdit, Wan2.2 A14B: EmptyHunyuanLatentVideo)")


def check_image_latents(node: str, conditionings: dict, latent_image,
                        fix: str = "give the sharer's WanImageToVideo/ChronoEdit node the width, height and length "
                                   "of the latent you record on") -> None:
    """The sharer's image latent (I2V conditioning) must have the sampled latent's grid; checked before any model loads."""
    target = tuple(latent_image["samples"].shape[-3:])
    for input_name, conditioning in conditionings.items():
        for _, extras in conditioning:
            image = extras.get("concat_latent_image")
            found = None if image is None else tuple(image.shape[-3:])
            check(found is None or found == target, node, input_name,
                  f"its image latent is {found} (frames, height, width)", f"the sampled latent's {target}", fix)
