"""The one-call Python API: a config object and a bridge over a Wan pipeline and a ChronoEdit pipeline.

    config = BridgeConfig(projector="wan_chronoedit_c2c.safetensors", strength=0.8, end=0.6)
    bridge = WanChronoEditBridge(config, wan_pipe, chronoedit_pipe)
    video = bridge.generate_with_fusion(image, prompt="...", num_inference_steps=20).frames[0]
    bridge.last_report          # what fused: strengths, K/V change per layer, sharer forwards

The design document's spelling runs through the same code (``WanChronoEditConfig.bridge_config()``)::

    config = WanChronoEditConfig(projector_type="gating", fusion_direction="bidirectional")
    bridge = WanChronoEditBridge(config=config, wan_model=wan_pipe, chronoedit_model=chronoedit_pipe)
    bridge.generate_with_fusion(wan_inputs={"video_latents": ..., "text_embeddings": ...},
                                chronoedit_inputs={"text_embeddings": ..., "image": image}, target_model="wan")

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
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from c2c_core import FusionSchedule, LayerMap, ProjectorBank, load_bundle, save_bundle
from c2c_core.bundle import ProjectorBundle
from c2c_core.contract import DIRECTIONS
from c2c_core.recording import DiskStore, RamStore, STORAGE_DTYPES
from c2c_core.refresh import RefreshPolicy

from . import lockstep, models
from .bridge import Bridge, refresh_policy
from .errors import BridgeSetupError
from .live import GRID_ALIGNMENTS, LiveSharer, SharerInputs
from .recorded import KVRecorder, RecordedSharer

__all__ = ["BridgeConfig", "WanChronoEditBridge", "WanChronoEditConfig"]

TARGETS = ("wan", "chronoedit")
MODES = ("live", "recorded")
STRENGTH_MAX = 2.0


def _choice(name, value, allowed):
    _choice_arg(f"BridgeConfig.{name}", value, allowed)


def _choice_arg(name, value, allowed):
    if value not in allowed:
        raise BridgeSetupError(f"{name}={value!r}; expected one of {allowed}.")


@dataclass
class RunSettings:
    """The settings both spellings share under one name (BridgeConfig's docstring says what each does)."""

    mode: str = "live"
    start: float = 0.0
    end: float = 1.0
    ramp: str = "constant"
    refresh: str = RefreshPolicy.mode
    refresh_every: int = RefreshPolicy.every
    threshold: float = RefreshPolicy.threshold
    budget: int = RefreshPolicy.budget
    max_reuse: int = RefreshPolicy.max_reuse
    rope_alignment: str = "auto"
    grid_alignment: str = "refuse"
    storage_dtype: str = "bf16"
    record_folder: Optional[str] = None
    backward_projector: object = None
    backward_strength: float = 1.0


@dataclass
class BridgeConfig(RunSettings):
    """What to fuse, how strongly and when.

    projector: a bundle file (.safetensors written by DiT Cache Bridge, in ComfyUI or here) or a loaded
        ProjectorBundle; None builds an untrained bank of ``projector_kind`` (identity and weighted need
        no training) with layer ``mapping`` (terminal, identity, uniform, position).
    target: the receiver, "wan" (ChronoEdit shares) or "chronoedit" (Wan shares).
    direction: "sharer_to_receiver", or "bidirectional": the sharer steps block by block with the receiver
        and its self-attention also reads the receiver's K/V of the paired block through
        ``backward_projector`` (receiver -> sharer; None takes the backward bank of a two-bank ``projector``
        bundle, else builds an untrained one of ``projector_kind`` and ``mapping`` with the models swapped) at
        ``backward_strength``. Live mode, the sharer in every call (refresh "every", refresh_every 1), needs greenlet.
    mode: "live" or "recorded" (``storage_dtype`` fp32/fp16/bf16/fp8_e4m3fn, ``record_folder`` None = RAM).
    strength, start, end, ramp: c2c_core.FusionSchedule; windows are in percent of the noise schedule, as in
        ComfyUI. refresh, refresh_every, threshold, budget, max_reuse: when the sharer's K/V are renewed, as the ComfyUI
        nodes' inputs of the same names (c2c_core.refresh.RefreshPolicy): "every" refresh_every steps, "adaptive"
        when the noise level fell by ``threshold`` of the schedule (0.11 = 11 %; the policy's default signal,
        sigma) since the sharer last ran, or "budget": at most ``budget`` sharer runs per run, late in the
        schedule; adaptive and budget reuse at most ``max_reuse`` steps in a row. rope_alignment: "auto"
        re-rotates sharer keys to the receiver's RoPE positions (read from each model), "off" does not. grid_alignment: "refuse" a sharer latent of
        another size, or resample it ("nearest", "trilinear").
    """

    projector: object = None
    projector_kind: str = "identity"
    mapping: str = "terminal"
    projector_hparams: Optional[dict] = None
    target: str = "wan"
    direction: str = "sharer_to_receiver"
    strength: float = 1.0

    def __post_init__(self):
        _choice("target", self.target, TARGETS)
        _choice("direction", self.direction, DIRECTIONS)
        _choice("mode", self.mode, MODES)
        _choice("rope_alignment", self.rope_alignment, ("auto", "off"))
        _choice("grid_alignment", self.grid_alignment, GRID_ALIGNMENTS)
        _choice("storage_dtype", self.storage_dtype, tuple(STORAGE_DTYPES))
        for name in ("strength", "backward_strength"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= STRENGTH_MAX:
                raise BridgeSetupError(f"BridgeConfig.{name}={value!r}; expected a number from 0 to {STRENGTH_MAX} "
                                       f"(0 leaves the receiver as it is, 1 takes the projected K/V; as the ComfyUI "
                                       f"node). Pass a value in that range.")
        policy = self.refresh_policy()
        if self.direction == "bidirectional":
            if self.mode != "live":
                raise BridgeSetupError("BridgeConfig.direction='bidirectional' with mode='recorded'; expected mode "
                                       "'live' (a recorded sharer cannot receive). Use mode='live' or fuse one way.")
            if not policy.always:
                found, expected = ((f"refresh_every={self.refresh_every}", "1") if self.refresh == "every"
                                   else (f"refresh={self.refresh!r}", "refresh='every' with refresh_every=1"))
                raise BridgeSetupError(f"BridgeConfig.direction='bidirectional' with {found}; expected {expected} "
                                       f"(both models run block by block in every call).")
            if not lockstep.available():
                raise BridgeSetupError("BridgeConfig.direction='bidirectional' needs the Python package greenlet; "
                                       "run `pip install greenlet` or fuse one way.")
        self.schedule()

    def schedule(self) -> FusionSchedule:
        return FusionSchedule(start=self.start, end=self.end, ramp=self.ramp)

    def refresh_policy(self) -> RefreshPolicy:
        """When the sharer runs; a bad refresh field is refused naming it (``BridgeConfig.budget=0; …``)."""
        return refresh_policy(self)


def _check_finite(bundle: ProjectorBundle, name: str) -> None:
    """An in-memory bundle gets the check a file gets when it is read: no NaN/Inf weights."""
    for bank, where in ((bundle.bank, ""), (getattr(getattr(bundle, "backward", None), "bank", None), "backward ")):
        for pname, p in ([] if bank is None else bank.state_dict().items()):
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise BridgeSetupError(f"{name}: the {where}projector weight {pname!r} holds NaN or Inf; expected "
                                       f"finite weights. Retrain it, or load a good bundle file.")


FUSION_DIRECTIONS = {"chrono_to_wan": ("wan", "sharer_to_receiver"),      # ChronoEdit shares, Wan generates
                     "wan_to_chrono": ("chronoedit", "sharer_to_receiver"),
                     "bidirectional": ("wan", "bidirectional")}        # the default target; generate_with_fusion picks


@dataclass
class WanChronoEditConfig(RunSettings):
    """The design document's spelling of ``BridgeConfig`` (docs/diffusers.md puts the two side by side).

    projector_type: the bank's kind (identity, weighted, gating, full, c2c, auto); projector_hidden_dim its
    hidden width (gating, full, c2c). fusion_direction: "chrono_to_wan", "wan_to_chrono" or "bidirectional".
    fusion_alpha: the strength (0..2). layer_mapping_strategy: terminal, identity, uniform, position.
    projector: a trained bundle file or ProjectorBundle instead of an untrained bank. The other fields are
    BridgeConfig's, under the same names. ``bridge_config()`` is what runs: there is one implementation.
    """

    projector_type: str = "identity"
    fusion_direction: str = "chrono_to_wan"
    projector_hidden_dim: Optional[int] = None
    fusion_alpha: float = 1.0
    layer_mapping_strategy: str = "terminal"
    projector: object = None

    def __post_init__(self):
        if self.fusion_direction not in FUSION_DIRECTIONS:
            raise BridgeSetupError(f"WanChronoEditConfig.fusion_direction={self.fusion_direction!r}; expected one of "
                                   f"{tuple(FUSION_DIRECTIONS)}.")
        if self.projector_hidden_dim is not None and self.projector_type not in HIDDEN_DIM_KINDS:
            raise BridgeSetupError(f"WanChronoEditConfig.projector_hidden_dim={self.projector_hidden_dim!r} with "
                                   f"projector_type={self.projector_type!r}, which has no hidden layer; expected one "
                                   f"of {HIDDEN_DIM_KINDS} or projector_hidden_dim=None.")
        try:
            self.bridge_config()
        except BridgeSetupError as e:          # name the field as the caller spelled it
            message = str(e).replace("BridgeConfig.strength=", "WanChronoEditConfig.fusion_alpha=")
            raise BridgeSetupError(message.replace("BridgeConfig.", "WanChronoEditConfig.")) from None

    def bridge_config(self) -> BridgeConfig:
        target, direction = FUSION_DIRECTIONS[self.fusion_direction]
        hparams = None if self.projector_hidden_dim is None else {"hidden_dim": self.projector_hidden_dim}
        shared = {f.name: getattr(self, f.name) for f in fields(RunSettings)}
        return BridgeConfig(projector=self.projector, projector_kind=self.projector_type,
                            mapping=self.layer_mapping_strategy, projector_hparams=hparams, target=target,
                            direction=direction, strength=self.fusion_alpha, **shared)


HIDDEN_DIM_KINDS = ("gating", "full", "c2c")

# The design's per-model input dicts: key -> the pipeline keyword it feeds.
INPUT_KEYS = {"video_latents": "latents", "text_embeddings": "prompt_embeds",
              "negative_text_embeddings": "negative_prompt_embeds", "image": "image", "image_embeds": "image_embeds",
              "condition_latents": "condition"}


def _same_noise(generator):
    """A generator in the state of ``generator`` (not advanced by the sharer's sampling), or seed 0."""
    if generator is None:
        return torch.Generator().manual_seed(0)
    if isinstance(generator, list):
        return [_same_noise(g) for g in generator]
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def _model_inputs(name: str, inputs) -> dict:
    """One of the design's ``wan_inputs``/``chronoedit_inputs`` dicts, checked, as pipeline keywords."""
    if inputs is None:
        return {}
    if not isinstance(inputs, dict):
        raise BridgeSetupError(f"{name} is a {type(inputs).__name__}; expected a dict with keys from {tuple(INPUT_KEYS)}.")
    unknown = sorted(set(inputs) - set(INPUT_KEYS))
    if unknown:
        raise BridgeSetupError(f"{name} has the key(s) {unknown}; expected keys from {tuple(INPUT_KEYS)}.")
    return {INPUT_KEYS[k]: v for k, v in inputs.items() if v is not None}


def _pipeline_of(name: str, model, scheduler):
    """A bare Wan-family transformer in a WanPipeline without text encoder and VAE (latents in, latents out);
    a pipeline as it is. Such a model takes embeddings, and an image-to-video one only shares (given its
    ``image_embeds`` and ``condition_latents``): generating from an image needs its pipeline's VAE."""
    if getattr(model, "transformer", None) is not None or not hasattr(model, "blocks"):
        return model
    if scheduler is None:
        raise BridgeSetupError(f"{name} is a bare {type(model).__name__}; pass scheduler= (e.g. the "
                               f"FlowMatchEulerDiscreteScheduler of its pipeline) or the pipeline itself.")
    from diffusers import WanPipeline
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                       scheduler=type(scheduler).from_config(scheduler.config))
    pipe.bare = True
    return pipe


def _is_chronoedit(pipe) -> bool:
    return "ChronoEdit" in type(pipe.transformer).__name__


class WanChronoEditBridge:
    """Generate with one of a Wan pipeline and a ChronoEdit pipeline while the other shares its K/V.

    ``config`` is a BridgeConfig or the design's WanChronoEditConfig (run as its ``bridge_config()``).
    """

    def __init__(self, config, wan_model, chronoedit_model, scheduler=None):
        wan_model, chronoedit_model = (_pipeline_of(name, m, scheduler) for name, m in
                                       (("wan_model", wan_model), ("chronoedit_model", chronoedit_model)))
        if isinstance(config, WanChronoEditConfig):
            config = config.bridge_config()
        if not isinstance(config, BridgeConfig):
            raise BridgeSetupError(f"config is a {type(config).__name__}; expected a WanChronoEditConfig or BridgeConfig.")
        self.config = config
        self.wan, self.chronoedit = wan_model, chronoedit_model
        for name, pipe in (("wan_model", wan_model), ("chronoedit_model", chronoedit_model)):
            if getattr(pipe, "transformer", None) is None:
                raise BridgeSetupError(f"{name} is a {type(pipe).__name__}; expected a diffusers Wan or ChronoEdit "
                                       f"pipeline (WanPipeline, WanImageToVideoPipeline, ChronoEditPipeline; "
                                       f"WanChronoEditBridge.from_pretrained loads them from folders) or its "
                                       f"transformer with scheduler=.")
        if _is_chronoedit(wan_model) and not _is_chronoedit(chronoedit_model):
            raise BridgeSetupError(f"wan_model is a {type(wan_model).__name__} ({type(wan_model.transformer).__name__}) "
                                   f"and chronoedit_model a {type(chronoedit_model).__name__}: the pipelines are "
                                   f"swapped. Pass wan_model=<the Wan pipeline>, chronoedit_model=<the ChronoEdit pipeline>.")
        self._roles = {}
        self.receiver, self.sharer, self.bundle, self.backward = self._roles_for(config.target)
        self.last_report = None
        self.last_backward_report = None
        self.last_recording = None

    @classmethod
    def from_pretrained(cls, config, wan_path, chronoedit_path, torch_dtype=None, **kwargs):
        """Both pipelines from local (or hub) diffusers folders, as ``DiffusionPipeline.from_pretrained`` reads
        them (``torch_dtype`` and other keywords go to both)."""
        from diffusers import DiffusionPipeline
        load = lambda path: DiffusionPipeline.from_pretrained(path, torch_dtype=torch_dtype, **kwargs)  # noqa: E731
        return cls(config=config, wan_model=load(wan_path), chronoedit_model=load(chronoedit_path))

    def _roles_for(self, target: str):
        """(receiver, sharer, bundle, backward bundle) when ``target`` generates; built once per target."""
        if target not in self._roles:
            receiver, sharer = (self.wan, self.chronoedit) if target == "wan" else (self.chronoedit, self.wan)
            if target != self.config.target:          # bidirectional only (checked by the caller): the banks swap
                _, _, forward, backward = self._roles_for(self.config.target)
                self._roles[target] = (receiver, sharer, backward, forward)
            else:
                bundle = self._bundle(self.config.projector, "projector", sharer, receiver)
                backward = None
                if self.config.direction == "bidirectional":
                    stored = getattr(bundle, "backward", None)   # a two-bank bundle carries its own backward bank
                    chosen = (stored if self.config.backward_projector is None and stored is not None
                              else self.config.backward_projector)
                    backward = self._bundle(chosen, "backward_projector", receiver, sharer)
                self._roles[target] = (receiver, sharer, bundle, backward)
        return self._roles[target]

    def _bundle(self, p, name, sharer_pipe, receiver_pipe) -> ProjectorBundle:
        if isinstance(p, ProjectorBundle):
            _check_finite(p, f"BridgeConfig.{name}")
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

    def _target(self, target_model) -> str:
        cfg = self.config
        if target_model is None:
            return cfg.target
        _choice_arg("target_model", target_model, TARGETS)
        if target_model != cfg.target and cfg.direction != "bidirectional":
            sharer = "chrono" if cfg.target == "wan" else "wan"
            receiver = "wan" if cfg.target == "wan" else "chrono"
            raise BridgeSetupError(f"target_model={target_model!r}, but the config fuses one way into {cfg.target!r} "
                                   f"(fusion_direction='{sharer}_to_{receiver}', BridgeConfig target={cfg.target!r}); "
                                   f"pass target_model={cfg.target!r}, or a config that fuses into {target_model!r} "
                                   f"or both ways (fusion_direction='bidirectional').")
        return target_model

    @torch.no_grad()
    def generate_with_fusion(self, image=None, prompt=None, negative_prompt=None, *, wan_inputs=None,
                             chronoedit_inputs=None, target_model=None, prompt_embeds=None,
                             negative_prompt_embeds=None, image_embeds=None, sharer_prompt_embeds=None,
                             sharer_negative_prompt_embeds=None, height: Optional[int] = None,
                             width: Optional[int] = None, num_frames: Optional[int] = None,
                             num_inference_steps: int = 20, guidance_scale: Optional[float] = None,
                             generator=None, output_type: str = "np", **receiver_kwargs):
        """Run the receiver pipeline with the sharer fused in; returns the receiver pipeline's output.

        Two spellings of the inputs. The design's: ``wan_inputs``/``chronoedit_inputs`` dicts with
        ``video_latents`` (the starting noise, B×16×F×H×W; it sets height, width and num_frames),
        ``text_embeddings`` (and ``negative_text_embeddings`` for guidance; without them guidance is off),
        ``image`` (ChronoEdit's input frame) and ``image_embeds``; ``target_model`` ("wan" or "chronoedit")
        picks the model that generates (any with fusion_direction "bidirectional", else the config's).
        Or pipeline keywords: ``image`` conditions whichever model is image-to-video (ChronoEdit always),
        ``prompt``/``prompt_embeds`` the receiver, ``sharer_prompt_embeds`` the sharer (default: the receiver's).
        Other keyword arguments go to the receiver pipeline. Defaults: 480×832, 5 frames, guidance 5.0.
        """
        cfg = self.config
        target = self._target(target_model)
        self.receiver, self.sharer, self.bundle, self.backward = self._roles_for(target)
        sharer_condition = None
        if getattr(self.receiver, "bare", False):
            if models.is_image_to_video(self.receiver.transformer):
                raise BridgeSetupError(f"target_model={target!r} is a bare image-to-video "
                                       f"{type(self.receiver.transformer).__name__}: it can share but not generate "
                                       f"(its pipeline's VAE encodes the image). Pass its pipeline to generate with it.")
            if output_type != "latent":
                raise BridgeSetupError(f"output_type={output_type!r} with a bare transformer (no VAE to decode); "
                                       f"pass output_type='latent' or the pipeline.")
        if wan_inputs is not None or chronoedit_inputs is not None:
            own = {"wan": _model_inputs("wan_inputs", wan_inputs),
                   "chronoedit": _model_inputs("chronoedit_inputs", chronoedit_inputs)}
            mine, theirs = own[target], own["chronoedit" if target == "wan" else "wan"]
            image = image if image is not None else (mine.get("image") if mine.get("image") is not None
                                                     else theirs.get("image"))
            prompt_embeds = mine.get("prompt_embeds", prompt_embeds)
            negative_prompt_embeds = mine.get("negative_prompt_embeds", negative_prompt_embeds)
            image_embeds = mine.get("image_embeds", theirs.get("image_embeds", image_embeds))
            sharer_prompt_embeds = theirs.get("prompt_embeds", sharer_prompt_embeds)
            sharer_negative_prompt_embeds = theirs.get("negative_prompt_embeds", sharer_negative_prompt_embeds)
            if sharer_prompt_embeds is not None and sharer_negative_prompt_embeds is None:
                sharer_negative_prompt_embeds = negative_prompt_embeds
            sharer_condition = theirs.get("condition")
            if mine.get("condition") is not None:
                raise BridgeSetupError(f"{target}_inputs has condition_latents; the model that generates gets its "
                                       f"image through image= and its pipeline's VAE. Give condition_latents only "
                                       f"to the sharer.")
            latents = mine.get("latents", theirs.get("latents"))
            if latents is not None:
                receiver_kwargs["latents"] = latents
            if guidance_scale is None and negative_prompt_embeds is None and prompt is None:
                guidance_scale = 1.0
        latents = receiver_kwargs.get("latents")
        if latents is not None:
            height, width, num_frames = self._size_of(latents, height, width, num_frames)
        height, width = height or 480, width or 832
        num_frames = num_frames or 5
        guidance_scale = 5.0 if guidance_scale is None else guidance_scale
        self._check_call(height, width, prompt_embeds, negative_prompt_embeds, sharer_prompt_embeds)
        common = dict(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, output_type=output_type)
        inputs = self._sharer_inputs(image, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, image_embeds,
                                     sharer_prompt_embeds, sharer_negative_prompt_embeds, height, width, num_frames,
                                     guidance_scale, sharer_condition)
        if cfg.mode == "live":
            source = LiveSharer(self.sharer.transformer, inputs, grid_alignment=cfg.grid_alignment,
                                backward=self.backward, backward_strength=cfg.backward_strength)
        else:
            source = RecordedSharer(self._record(image, common, inputs, generator), grid_alignment=cfg.grid_alignment)
        bridge = Bridge(source, self.bundle, strength=cfg.strength, schedule=cfg.schedule(),
                        rope_alignment=cfg.rope_alignment, refresh=cfg.refresh_policy()).attach(self.receiver)
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

    def _size_of(self, latents, height, width, num_frames):
        """height, width, num_frames from a B×C×F×H×W latent (the receiver's VAE factors); given values must agree."""
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            raise BridgeSetupError(f"video_latents is a {getattr(latents, 'shape', type(latents).__name__)}; expected a "
                                   f"5-D tensor B×C×F×H×W (C = 16 latent channels).")
        spatial = getattr(self.receiver, "vae_scale_factor_spatial", 8)
        temporal = getattr(self.receiver, "vae_scale_factor_temporal", 4)
        found = (latents.shape[3] * spatial, latents.shape[4] * spatial, (latents.shape[2] - 1) * temporal + 1)
        for name, given, size in zip(("height", "width", "num_frames"), (height, width, num_frames), found):
            if given is not None and given != size:
                raise BridgeSetupError(f"{name}={given} but video_latents {tuple(latents.shape)} make {size}; "
                                       f"leave {name} out or pass latents of that size.")
        return found

    def _check_call(self, height, width, prompt_embeds, negative_prompt_embeds, sharer_prompt_embeds):
        """What diffusers would only fail on deep inside (or after sampling the sharer): refuse it here."""
        for name, value in (("height", height), ("width", width)):
            if value % 16:
                raise BridgeSetupError(f"{name}={value} is not divisible by 16 (VAE factor 8 × patch 2); "
                                       f"pass {name}={value // 16 * 16 or 16} or {(value // 16 + 1) * 16}.")
        for name, embeds, pipe in (("prompt_embeds", prompt_embeds, self.receiver),
                                   ("negative_prompt_embeds", negative_prompt_embeds, self.receiver),
                                   ("sharer_prompt_embeds", sharer_prompt_embeds, self.sharer)):
            if embeds is None:
                continue
            want = pipe.transformer.config.text_dim
            if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[-1] != want:
                shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
                raise BridgeSetupError(f"{name} has shape {shape}; expected batch × tokens × {want} (the umT5 text "
                                       f"encoder's width that {type(pipe.transformer).__name__} reads). Pass the "
                                       f"text encoder's last hidden states, or prompt= with the pipeline's encoder.")

    def save_projectors(self, path) -> None:
        """Write the bundle in use (and its backward bank, when bidirectional) as one .safetensors file."""
        backward = None if self.backward is None else (self.backward.bank, self.backward.layer_map)
        save_bundle(path, self.bundle.bank, self.bundle.layer_map, backward=backward)

    def load_projectors(self, path) -> None:
        """Use the bundle file at ``path`` (written by save_projectors, train_projector or ComfyUI) from now on."""
        self.config = replace(self.config, projector=load_bundle(path), backward_projector=None)
        self._roles = {}
        self.receiver, self.sharer, self.bundle, self.backward = self._roles_for(self.config.target)

    def train_projector(self, samples_folder, steps: int = 1000, lr: float = 1e-4, seed: int = 0, device="cpu"):
        """Train the bundle in use on the sample files in ``samples_folder`` (c2c_diffusers.training.save_training_sample),
        the models frozen; returns c2c_core's TrainResult. One-way, live: the sharer runs on each batch's x_t."""
        from c2c_core import TrainConfig, train_bank, velocity_loss
        from .training import bridged_velocity, open_training_set, sample_batches
        receiver = self.receiver.transformer
        batches = sample_batches(open_training_set(samples_folder), seed=seed, device=device)
        bridge = Bridge(LiveSharer(self.sharer.transformer, batches(0).sharer), self.bundle).attach(receiver)
        frozen = [(p, p.requires_grad) for t in (receiver, self.sharer.transformer) for p in t.parameters()]
        for p, _ in frozen:                        # only the bank learns: no gradients (nor their memory) for the models
            p.requires_grad_(False)
        self.bundle.bank.train()
        try:
            with torch.enable_grad():
                return train_bank(self.bundle.bank, self.bundle.layer_map, batches,
                                  velocity_loss(bridged_velocity(bridge, receiver)), TrainConfig(steps=steps, lr=lr, seed=seed))
        finally:
            bridge.detach()
            self.bundle.bank.eval()
            for p, wanted in frozen:
                p.requires_grad_(wanted)

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
                       guidance_scale, condition=None) -> SharerInputs:
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
        if condition is not None:                # given with image_embeds (a bare transformer: no VAE here)
            return SharerInputs(pe, ne, image_embeds=image_embeds, condition=condition)
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
