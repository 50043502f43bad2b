"""The one-call Python API: a config object and a bridge over a Wan pipeline and a ChronoEdit pipeline.

    config = BridgeConfig(projector="wan_chronoedit_c2c.safetensors", strength=0.8, end=0.6)
    bridge = WanChronoEditBridge(config, wan_pipe, chronoedit_pipe)
    video = bridge.generate_with_fusion(image, prompt="...", num_inference_steps=20).frames[0]
    bridge.last_report          # what fused: strengths, K/V change per layer, sharer forwards

``target`` names the receiver (the model that generates); the other one shares (``direction``
"bidirectional": it also receives the receiver's K/V, block by block, through ``backward_projector``).
Live mode runs the sharer inside every receiver call; recorded mode samples the sharer alone first (its own trajectory,
kept in RAM or on disk) and replays its K/V, so only one model computes at a time. The sharer gets the
same prompt (Wan and ChronoEdit share the umT5 text encoder) unless its own embeddings are given;
an image-to-video sharer (ChronoEdit) gets the image through its own pipeline (CLIP embeddings,
VAE-encoded condition latent).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Optional

import torch

from c2c_core import FusionSchedule, LayerMap, ProjectorBank, load_bundle
from c2c_core.bundle import ProjectorBundle
from c2c_core.contract import DIRECTIONS
from c2c_core.recording import DiskStore, RamStore, STORAGE_DTYPES

from . import lockstep, models
from .bridge import Bridge
from .errors import BridgeSetupError
from .live import GRID_ALIGNMENTS, LiveSharer, SharerInputs
from .recorded import KVRecorder, RecordedSharer

__all__ = ["BridgeConfig", "WanChronoEditBridge"]

TARGETS = ("wan", "chronoedit")
MODES = ("live", "recorded")


def _choice(name, value, allowed):
    if value not in allowed:
        raise BridgeSetupError(f"BridgeConfig.{name}={value!r}; expected one of {allowed}.")


@dataclass
class BridgeConfig:
    """What to fuse, how strongly and when.

    projector: a bundle file (.safetensors written by DiT Cache Bridge, in ComfyUI or here) or a loaded
        ProjectorBundle; None builds an untrained bank of ``projector_kind`` (identity and weighted need
        no training) with layer ``mapping`` (terminal, identity, uniform, position).
    target: the receiver, "wan" (ChronoEdit shares) or "chronoedit" (Wan shares).
    direction: "sharer_to_receiver", or "bidirectional": the sharer steps block by block with the receiver
        and its self-attention also reads the receiver's K/V of the paired block through
        ``backward_projector`` (receiver -> sharer; None takes the backward bank of a two-bank ``projector``
        bundle, else builds an untrained one of ``projector_kind`` and ``mapping`` with the models swapped) at ``backward_strength``. Live mode, refresh_every 1, needs greenlet.
    mode: "live" or "recorded" (``storage_dtype`` fp32/fp16/bf16/fp8_e4m3fn, ``record_folder`` None = RAM).
    strength, start, end, ramp, refresh_every: c2c_core.FusionSchedule; windows are in percent of the
        noise schedule, as in ComfyUI. rope_alignment: "auto" re-rotates sharer keys to the receiver's
        RoPE positions (read from each model), "off" does not. grid_alignment: "refuse" a sharer latent of
        another size, or resample it ("nearest", "trilinear").
    """

    projector: object = None
    projector_kind: str = "identity"
    mapping: str = "terminal"
    projector_hparams: Optional[dict] = None
    target: str = "wan"
    direction: str = "sharer_to_receiver"
    mode: str = "live"
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    ramp: str = "constant"
    refresh_every: int = 1
    rope_alignment: str = "auto"
    grid_alignment: str = "refuse"
    storage_dtype: str = "bf16"
    record_folder: Optional[str] = None
    backward_projector: object = None
    backward_strength: float = 1.0

    def __post_init__(self):
        _choice("target", self.target, TARGETS)
        _choice("direction", self.direction, DIRECTIONS)
        _choice("mode", self.mode, MODES)
        _choice("rope_alignment", self.rope_alignment, ("auto", "off"))
        _choice("grid_alignment", self.grid_alignment, GRID_ALIGNMENTS)
        _choice("storage_dtype", self.storage_dtype, tuple(STORAGE_DTYPES))
        if self.direction == "bidirectional":
            if self.mode != "live":
                raise BridgeSetupError("BridgeConfig.direction='bidirectional' with mode='recorded'; expected mode "
                                       "'live' (a recorded sharer cannot receive). Use mode='live' or fuse one way.")
            if self.refresh_every != 1:
                raise BridgeSetupError(f"BridgeConfig.direction='bidirectional' with refresh_every={self.refresh_every}; "
                                       f"expected 1 (both models run block by block in every call).")
            if not lockstep.available():
                raise BridgeSetupError("BridgeConfig.direction='bidirectional' needs the Python package greenlet; "
                                       "run `pip install greenlet` or fuse one way.")
        self.schedule()

    def schedule(self) -> FusionSchedule:
        return FusionSchedule(start=self.start, end=self.end, ramp=self.ramp, refresh_every=self.refresh_every)


def _same_noise(generator):
    """A generator in the state of ``generator`` (not advanced by the sharer's sampling), or seed 0."""
    if generator is None:
        return torch.Generator().manual_seed(0)
    if isinstance(generator, list):
        return [_same_noise(g) for g in generator]
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


class WanChronoEditBridge:
    """Generate with one of a Wan pipeline and a ChronoEdit pipeline while the other shares its K/V."""

    def __init__(self, config: BridgeConfig, wan, chronoedit):
        self.config = config
        self.wan, self.chronoedit = wan, chronoedit
        for name, pipe in (("wan", wan), ("chronoedit", chronoedit)):
            if getattr(pipe, "transformer", None) is None:
                raise BridgeSetupError(f"the {name} pipeline has no transformer; expected a diffusers Wan or ChronoEdit "
                                       f"pipeline (WanPipeline, WanImageToVideoPipeline, ChronoEditPipeline).")
        self.receiver, self.sharer = (wan, chronoedit) if config.target == "wan" else (chronoedit, wan)
        self.bundle = self._bundle(config.projector, "projector", self.sharer, self.receiver)
        self.backward = None
        if config.direction == "bidirectional":
            stored = getattr(self.bundle, "backward", None)      # a two-bank bundle carries its own backward bank
            chosen = stored if config.backward_projector is None and stored is not None else config.backward_projector
            self.backward = self._bundle(chosen, "backward_projector", self.receiver, self.sharer)
        self.last_report = None
        self.last_backward_report = None
        self.last_recording = None

    def _bundle(self, p, name, sharer_pipe, receiver_pipe) -> ProjectorBundle:
        if isinstance(p, ProjectorBundle):
            return p
        if isinstance(p, (str, os.PathLike)):
            return load_bundle(p)
        if p is not None:
            raise BridgeSetupError(f"BridgeConfig.{name} is a {type(p).__name__}; expected a bundle path, a "
                                   f"ProjectorBundle or None.")
        sharer = models.signature(sharer_pipe.transformer, "sharer")
        receiver = models.signature(receiver_pipe.transformer, "receiver")
        layer_map = LayerMap.build(self.config.mapping, sharer.num_layers, receiver.num_layers)
        bank = ProjectorBank.build(self.config.projector_kind, sharer, receiver, layer_map.layers,
                                   **(self.config.projector_hparams or {})).eval()
        return ProjectorBundle(bank=bank, layer_map=layer_map, sharer=sharer, receiver=receiver)

    @torch.no_grad()
    def generate_with_fusion(self, image=None, prompt=None, negative_prompt=None, *, prompt_embeds=None,
                             negative_prompt_embeds=None, image_embeds=None, sharer_prompt_embeds=None,
                             sharer_negative_prompt_embeds=None, height: int = 480, width: int = 832,
                             num_frames: int = 5, num_inference_steps: int = 20, guidance_scale: float = 5.0,
                             generator=None, output_type: str = "np", **receiver_kwargs):
        """Run the receiver pipeline with the sharer fused in; returns the receiver pipeline's output.

        ``image`` conditions whichever model is image-to-video (ChronoEdit always). Other keyword
        arguments go to the receiver pipeline. ChronoEdit generates 5 frames (2 latent frames) unless
        its temporal reasoning is enabled; give the Wan side the same num_frames, height and width.
        """
        cfg = self.config
        common = dict(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type=output_type)
        inputs = self._sharer_inputs(image, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, image_embeds,
                                     sharer_prompt_embeds, sharer_negative_prompt_embeds, height, width, num_frames,
                                     guidance_scale)
        if cfg.mode == "live":
            source = LiveSharer(self.sharer.transformer, inputs, grid_alignment=cfg.grid_alignment,
                                backward=self.backward, backward_strength=cfg.backward_strength)
        else:
            source = RecordedSharer(self._record(image, common, inputs, generator), grid_alignment=cfg.grid_alignment)
        bridge = Bridge(source, self.bundle, strength=cfg.strength, schedule=cfg.schedule(),
                        rope_alignment=cfg.rope_alignment).attach(self.receiver)
        kwargs = dict(common, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                      generator=generator, **receiver_kwargs)
        kwargs.update(self._image_kwargs(self.receiver, image, image_embeds))
        try:
            with bridge.session():
                return self.receiver(**kwargs)
        finally:
            bridge.detach()
            self.last_report = bridge.last_report
            self.last_backward_report = bridge.last_backward_report

    def _record(self, image, common, inputs: SharerInputs, common_generator):
        """Sample the sharer alone with the run's settings, noise and the receiver's scheduler; record what the projector reads."""
        layers = sorted(set(self.bundle.layer_map.pairs.values()))
        folder = self.config.record_folder
        store = DiskStore(folder) if folder else RamStore()
        kwargs = dict(common, prompt=None, negative_prompt=None, prompt_embeds=inputs.prompt_embeds,
                      negative_prompt_embeds=inputs.negative_prompt_embeds, output_type="latent",
                      generator=_same_noise(common_generator))
        kwargs.update(self._image_kwargs(self.sharer, image, None))
        own = self.sharer.scheduler          # replay needs the receiver's noise schedule: sample with its scheduler
        self.sharer.scheduler = type(self.receiver.scheduler).from_config(self.receiver.scheduler.config)
        try:
            with KVRecorder(self.sharer.transformer, layers, storage_dtype=self.config.storage_dtype, store=store) as rec:
                self.sharer(**kwargs)
        finally:
            self.sharer.scheduler = own
        self.last_recording = rec.recording
        return rec.recording

    @staticmethod
    def _image_kwargs(pipe, image, image_embeds) -> dict:
        accepted = inspect.signature(type(pipe).__call__).parameters
        out = {}
        if "image" in accepted:
            if image is None:
                raise BridgeSetupError(f"{type(pipe).__name__} is image-to-video and needs image=; got None.")
            out["image"] = image
            if image_embeds is not None and getattr(pipe, "image_encoder", None) is None:
                out["image_embeds"] = image_embeds
        return out

    def _sharer_inputs(self, image, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, image_embeds,
                       sharer_prompt_embeds, sharer_negative_prompt_embeds, height, width, num_frames,
                       guidance_scale) -> SharerInputs:
        pipe = self.sharer
        device = self.receiver._execution_device
        dtype = pipe.transformer.dtype
        pe, ne = sharer_prompt_embeds, sharer_negative_prompt_embeds
        if pe is None:
            pe, ne = pipe.encode_prompt(prompt, negative_prompt, do_classifier_free_guidance=guidance_scale > 1.0,
                                        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                        max_sequence_length=512, device=device, dtype=dtype)
        if not models.is_image_to_video(pipe.transformer):
            return SharerInputs(pe, ne)
        if image is None:
            raise BridgeSetupError(f"the sharer {type(pipe.transformer).__name__} is image-to-video and needs image=; "
                                   f"got None.")
        if getattr(pipe, "image_encoder", None) is not None:
            image_embeds = pipe.encode_image(image, device)
        elif image_embeds is None:
            raise BridgeSetupError("the sharer pipeline has no image_encoder; pass image_embeds= (CLIP penultimate "
                                   "hidden states) or load the pipeline with its image encoder.")
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(device, torch.float32)
        _, condition = pipe.prepare_latents(pixels, 1, pipe.vae.config.z_dim, height, width, num_frames, torch.float32,
                                            device, torch.Generator(device=device).manual_seed(0))
        return SharerInputs(pe, ne, image_embeds=image_embeds, condition=condition)
