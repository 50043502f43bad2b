"""Bridged KSampler: Capture KV Cache + Fuse Caches + KSampler in one node (KSampler's inputs first, in its order)."""
from __future__ import annotations

from comfy_api.latest import io

from ..c2c_comfy import compat
from ..c2c_comfy.validate import check_inputs
from .capture import DEFAULT_REFRESH, make_live_source, refresh_inputs, refresh_policy, sharer_inputs
from .fuse import bridge_model, fusion_inputs
from .record import check_image_latents
from .types import CATEGORY, Projector


class BridgedKSampler(io.ComfyNode):
    NODE = "Bridged KSampler"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTCacheBridge_BridgedKSampler", display_name=cls.NODE, category=CATEGORY,
            description="Samples the receiver while the sharer runs in lockstep and its projected K/V are fused "
                        "into the receiver's self-attention. Same result as Capture KV Cache → Fuse Caches → KSampler.",
            inputs=[
                io.Model.Input("receiver", tooltip="The model that samples (e.g. Wan2.1). Never changed."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The number of denoising steps."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (both models use their own negative)."),
                io.Combo.Input("sampler_name", options=compat.sampler_names(),
                               tooltip="The sampling algorithm."),
                io.Combo.Input("scheduler", options=compat.scheduler_names(),
                               tooltip="How sigmas are spaced over the steps."),
                io.Conditioning.Input("positive", tooltip="The receiver's positive conditioning."),
                io.Conditioning.Input("negative", tooltip="The receiver's negative conditioning."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Amount of denoising applied."),
            ] + sharer_inputs(prefix="sharer_") + [
                Projector.Input("projector", tooltip="From Load C2C Projector or Create C2C Projector."),
            ] + fusion_inputs() + refresh_inputs(every=True),
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, receiver, positive, negative, sharer, sharer_positive, sharer_negative, projector, strength,
                start_percent, end_percent, seed, steps, cfg, sampler_name, scheduler, latent_image, denoise=1.0,
                ramp="constant", layer_strengths="", direction="sharer_to_receiver", backward_projector=None,
                backward_strength=1.0, refresh_every=1, refresh="every", threshold=DEFAULT_REFRESH.threshold,
                budget=DEFAULT_REFRESH.budget, max_reuse=DEFAULT_REFRESH.max_reuse) -> io.NodeOutput:
        check_inputs(cls, locals())
        policy = refresh_policy(cls.NODE, refresh, refresh_every, threshold, budget, max_reuse)
        check_image_latents(cls.NODE, {"sharer_positive": sharer_positive, "sharer_negative": sharer_negative},
                            latent_image, fix="give the sharer's WanImageToVideo/ChronoEdit node the receiver latent's "
                            "width, height and length, or use Capture KV Cache with grid_alignment 'nearest' or "
                            "'trilinear' + Fuse Caches to resample")
        source = make_live_source(cls.NODE, sharer, sharer_positive, sharer_negative,
                                  refresh=policy, cond_inputs=("sharer_positive", "sharer_negative"))
        node_id = cls.hidden.unique_id if cls.hidden else None
        patched = bridge_model(cls.NODE, receiver, source, projector, strength, start_percent, end_percent, ramp,
                               layer_strengths, report_to=node_id, model_input="receiver", direction=direction,
                               backward_projector=backward_projector, backward_strength=backward_strength)
        (latent,) = compat.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive,
                                                negative, latent_image, denoise=denoise)
        return io.NodeOutput(latent)
