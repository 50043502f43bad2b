"""Runtime that attaches a sharer's K/V to a clone of the receiver.

Lifecycle, per sampling run of the bridged clone:
  OUTER_SAMPLE wrapper  -> ``BridgeRun`` is created (sharer conditioning, positions, projector on
                           the run's device) and always torn down in ``finally``;
  APPLY_MODEL wrapper   -> per model call: step and strength are resolved, and the K/V source makes
                           sure the sharer's K/V for this call's CFG chunks exist (live: the sharer
                           runs now on the same x and sigma; recorded: replayed);
  self-attention hook   -> per fused block: sharer K/V are aligned and fused into the receiver's.
Nothing is written onto the models given to us: the receiver and sharer are cloned, and all state
lives in this module's objects, referenced from closures (ModelPatcher.clone deep-copies
model_options, so state objects there return themselves from ``__deepcopy__``).
"""
from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass, field

import torch

import comfy.patcher_extension
import comfy.model_patcher
import comfy.sampler_helpers
import comfy.samplers

from ..c2c_core import FusionSchedule, LayerFuser, ModelSignature, RopeRerotation, align_kv, static_gate
from . import wan_hooks
from .errors import BridgeInputError

log = logging.getLogger("dit_cache_bridge")

COND, UNCOND = 0, 1
_WRAPPER_KEY = "dit_cache_bridge"
_ids = itertools.count()


def step_of(sigmas: list, sigma: float) -> int:
    """Index of the sampling step a sigma belongs to (samplers may evaluate between two sigmas)."""
    step = 0
    for i, s in enumerate(sigmas[:-1]):
        if s >= sigma - 1e-7 * max(1.0, abs(sigma)):
            step = i
    return step


class _Shared:
    """Mixin: survive ModelPatcher.clone()'s deepcopy of model_options by reference."""

    def __deepcopy__(self, memo):
        return self


# --------------------------------------------------------------------------------------------
# K/V sources
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class LiveSharer(_Shared):
    """A sharer model evaluated in lockstep inside each receiver model call (Capture KV Cache, live)."""
    model: object
    positive: list
    negative: list
    signature: ModelSignature
    layers: tuple | None = None          # sharer layers the user allows; None = what the map needs
    refresh_every: int = 1
    rope_alignment: str = "auto"         # "auto": re-rotate keys when the two models' RoPE positions differ
    grid_alignment: str = "refuse"       # or "nearest"/"trilinear": run the sharer on its own latent grid
    node: str = "Capture KV Cache"
    cond_inputs: tuple = ("positive", "negative")   # input names, for error messages


class _CapturedKV:
    """Sharer K/V of the current refresh window, by sharer layer and CFG chunk kind.

    One sharer call yields (rows, N, H*D) tensors covering several chunk kinds; they are kept whole
    and handed back whole when the receiver asks for the same kinds in the same order (no copy).
    """

    def __init__(self):
        self.batches: dict[int, list] = {}     # layer -> [(k, v, kinds)]
        self.window: dict[int, int] = {}       # kind -> refresh window of its K/V
        self.peak_bytes = 0

    def put(self, layer, k, v, kinds):
        entries = [e for e in self.batches.get(layer, []) if not set(e[2]) & set(kinds)]
        entries.append((k, v, tuple(kinds)))
        self.batches[layer] = entries
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def clear(self):
        self.batches, self.window = {}, {}

    @property
    def nbytes(self) -> int:
        """Bytes of K/V held (tensor sizes; they are the model's own tensors, referenced, not copied)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for entries in self.batches.values() for k, v, _ in entries)

    def get(self, layer, kinds):
        kinds = tuple(kinds)
        entries = self.batches.get(layer, [])
        for k, v, have in entries:
            if have == kinds:
                return k, v
        parts_k, parts_v = [], []
        for kind in kinds:
            for k, v, have in entries:
                if kind in have:
                    rows = k.shape[0] // len(have)
                    i = have.index(kind)
                    parts_k.append(k[i * rows:(i + 1) * rows])
                    parts_v.append(v[i * rows:(i + 1) * rows])
                    break
            else:
                raise KeyError((layer, kind))
        return torch.cat(parts_k), torch.cat(parts_v)


class _SharerDone(Exception):
    """Raised inside the sharer once its last needed layer is captured: later blocks are skipped."""


class LiveSharerRun:
    """Per-run side of a LiveSharer: conditioning, options and captured K/V."""

    def __init__(self, source: LiveSharer, sharer_patcher, capture_layers, noise, latent_image, denoise_mask, seed,
                 device):
        self.source = source
        self.patcher = sharer_patcher
        self.capture_layers = sorted(capture_layers)
        self.last_layer = self.capture_layers[-1] if self.capture_layers else -1
        self.captured = _CapturedKV()
        self.forwards = 0
        self._call_kinds = None
        self._started = False
        self.grid_mode = source.grid_alignment if source.grid_alignment != "refuse" else "nearest"
        sharer_shape = _sharer_latent_shape(source, latent_image)
        if sharer_shape != tuple(latent_image.shape[-3:]):
            noise = torch.zeros(*noise.shape[:-3], *sharer_shape, dtype=noise.dtype, device=noise.device)
            latent_image = resample_latent(latent_image, sharer_shape, self.grid_mode)
        self.latent_shape = sharer_shape
        conds = {"positive": comfy.sampler_helpers.convert_cond(source.positive),
                 "negative": comfy.sampler_helpers.convert_cond(source.negative)}
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            latent_image = sharer_patcher.model.process_latent_in(latent_image)
        self.conds = comfy.samplers.process_conds(sharer_patcher.model, noise, conds, device, latent_image,
                                                  denoise_mask, seed)
        self.model_options = comfy.model_patcher.create_model_options_clone(sharer_patcher.model_options)
        comfy.sampler_helpers.prepare_model_patcher(sharer_patcher, self.conds, self.model_options)
        self.grid = wan_hooks.token_grid(self.latent_shape)
        self.rope = wan_hooks.rope_spec(sharer_patcher)

    def ensure(self, x, t, kinds, step, window):
        """Run the sharer for the chunk kinds whose K/V are missing or from an older refresh window."""
        missing = [kind for kind in dict.fromkeys(kinds) if self.captured.window.get(kind) != window]
        if not missing:
            return
        if self.source.refresh_every == 1:
            self.captured.clear()           # lockstep: only this call's K/V are ever needed
        rows = x.shape[0] // len(kinds)
        conds = [self.conds["positive" if kind == COND else "negative"] for kind in missing]
        model = self.patcher.model
        receiver_patcher = getattr(model, "current_patcher", None)
        if not self._started:
            self._started = True
            self.patcher.pre_run()
        model.current_patcher = self.patcher
        self._call_kinds = missing
        try:
            x = resample_latent(x[:rows], self.latent_shape, self.grid_mode)
            comfy.samplers.calc_cond_batch(model, conds, x, t[:rows], self.model_options)
        finally:
            self._call_kinds = None
            model.current_patcher = receiver_patcher
        for kind in missing:
            self.captured.window[kind] = window

    def capture(self, layer, q, k, v, heads, transformer_options):
        if self._call_kinds is None:
            return k, v
        if layer in self.capture_layers:
            kinds = [self._call_kinds[i] for i in transformer_options["cond_or_uncond"]]
            self.captured.put(layer, k, v, kinds)
            if layer == self.last_layer:
                self.forwards += 1
                raise _SharerDone()
        return k, v

    def kv(self, layer, kinds):
        return self.captured.get(layer, kinds)

    def close(self):
        """Release captured K/V and end the sharer's run (ON_CLEANUP callbacks, hooks)."""
        self.peak_bytes = self.captured.peak_bytes
        self.captured = _CapturedKV()
        if self._started:
            model = self.patcher.model
            receiver_patcher = getattr(model, "current_patcher", None)
            self.patcher.cleanup()
            if receiver_patcher is not None and receiver_patcher is not self.patcher:
                model.current_patcher = receiver_patcher


def _sharer_latent_shape(source: LiveSharer, latent_image) -> tuple:
    """(frames, height, width) the sharer runs on: its image latent's, where its conditioning has one.

    With grid_alignment "refuse" a different size is an error; otherwise the sharer runs on the
    receiver's latent resampled to that size and its K/V are resampled back to the receiver's grid.
    """
    target = tuple(latent_image.shape[-3:])
    for input_name, conditioning in zip(source.cond_inputs, (source.positive, source.negative)):
        for _, extras in conditioning:
            image = extras.get("concat_latent_image")
            if image is None or tuple(image.shape[-3:]) == target:
                continue
            if source.grid_alignment == "refuse":
                where = ("set grid_alignment to 'nearest' or 'trilinear' to resample" if source.node == "Capture KV Cache"
                         else "use Capture KV Cache with grid_alignment 'nearest' or 'trilinear' + Fuse Caches to resample")
                raise BridgeInputError(
                    source.node, input_name,
                    f"its image latent is {tuple(image.shape[-3:])} (frames, height, width)",
                    f"the sampled latent's {target}",
                    "give the sharer's WanImageToVideo/ChronoEdit node the same width, height and length as the "
                    f"receiver's latent, or {where}")
            return tuple(image.shape[-3:])
    return target


def resample_latent(x, shape, mode):
    """A video latent (B, C, T, H, W) resampled to (T, H, W) = shape; the same tensor when it fits."""
    if tuple(x.shape[-3:]) == tuple(shape):
        return x
    return torch.nn.functional.interpolate(x, size=tuple(shape), mode=mode)


def _sharer_apply_model(executor, x, *args, **kwargs):
    """APPLY_MODEL wrapper of the sharer clone: stop the forward once the last needed layer is captured."""
    try:
        return executor(x, *args, **kwargs)
    except _SharerDone:
        return torch.zeros_like(x)


# --------------------------------------------------------------------------------------------
# The bridge
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Report(_Shared):
    """What one bridged run did, for the fusion inspector and the tests."""
    layers: list = field(default_factory=list)
    strength: dict = field(default_factory=dict)       # receiver layer -> mean effective strength
    k_change: dict = field(default_factory=dict)       # receiver layer -> mean relative K change
    v_change: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)           # receiver layer -> {"k": g, "v": g} (data-independent part)
    sharer_forwards: int = 0
    model_calls: int = 0
    peak_kv_bytes: int = 0          # most sharer K/V held at once (live mode)

    def to_json(self):
        return {"layers": self.layers, "strength": self.strength, "k_change": self.k_change,
                "v_change": self.v_change, "gate": self.gate, "sharer_forwards": self.sharer_forwards, "model_calls": self.model_calls,
                "peak_kv_bytes": self.peak_kv_bytes}


class Bridge(_Shared):
    """Fuses one K/V source into a receiver through one projector bundle."""

    def __init__(self, source, bundle, strength: float, schedule: FusionSchedule, receiver_signature: ModelSignature,
                 on_report=None, node: str = "Fuse Caches"):
        self.node = node
        self.source = source
        self.bundle = bundle
        self.schedule = schedule
        self.strength = strength
        self.receiver_signature = receiver_signature
        self.on_report = on_report
        self.key = f"{_WRAPPER_KEY}.{next(_ids)}"
        self.run: BridgeRun | None = None
        self.last_report: Report | None = None
        self._banks: dict = {}

    @property
    def fused_layers(self):
        return sorted(self.bundle.layer_map.pairs)

    @property
    def sharer_layers(self):
        return sorted(set(self.bundle.layer_map.pairs.values()))

    def attach(self, receiver):
        """A clone of ``receiver`` that fuses this bridge's K/V; ``receiver`` itself is untouched."""
        patched = receiver.clone()
        wan_hooks.hook_self_attention(patched, self.fused_layers, self._fuse)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, self.key, self._outer_sample)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, self.key, self._apply_model)
        if isinstance(self.source, LiveSharer):
            self._sharer = self.source.model.clone()
            wan_hooks.hook_self_attention(self._sharer, self.sharer_layers, self._capture)
            self._sharer.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, self.key,
                                              _sharer_apply_model)
            if self._sharer.model is not receiver.model:
                patched.set_additional_models(self.key, [self._sharer])
        return patched

    # -- wrappers ---------------------------------------------------------------------------
    def _outer_sample(self, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                      disable_pbar=False, seed=None, *args, **kwargs):
        guider = executor.class_obj
        previous = self.run
        self.run = BridgeRun(self, guider, noise, latent_image, denoise_mask, seed, sigmas)
        try:
            return executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                            *args, **kwargs)
        finally:
            run, self.run = self.run, previous
            self.last_report = run.close()
            if self.on_report is not None:
                try:
                    self.on_report(self.last_report)
                except Exception:  # a broken UI channel must not fail the sampling run
                    log.exception("dit_cache_bridge: could not send the fusion report")

    def _apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                     **kwargs):
        run = self.run
        if run is not None:
            run.begin_call(x, t, transformer_options)
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            if run is not None:
                run.end_call()

    # -- hooks ------------------------------------------------------------------------------
    def _capture(self, layer, q, k, v, heads, transformer_options):
        run = self.run
        if run is None:
            return k, v
        return run.source_run.capture(layer, q, k, v, heads, transformer_options)

    def _fuse(self, layer, q, k, v, heads, transformer_options):
        run = self.run
        if run is None or not run.active:
            return k, v
        return run.fuse(layer, k, v, heads)

    def bank_for(self, device, dtype):
        """The projector bank on the run's device and dtype; the user's bank object is never moved."""
        bank = self.bundle.bank
        first = next(iter(bank.parameters()), None)
        if first is None or (first.device == device and first.dtype == dtype):
            return bank
        key = (str(device), dtype)
        if key not in self._banks:
            self._banks = {key: copy.deepcopy(bank).to(device=device, dtype=dtype).eval()}
        return self._banks[key]


class BridgeRun:
    """State of one sampling run of a bridged model; created and closed by the OUTER_SAMPLE wrapper."""

    STATS_TOKEN_STRIDE = 16   # measure K/V change on every 16th token: cheap, and enough for a plot

    def __init__(self, bridge: Bridge, guider, noise, latent_image, denoise_mask, seed, sigmas):
        self.bridge = bridge
        receiver = guider.model_patcher
        self.device = receiver.load_device
        self.seed = seed
        self.sigmas = [float(s) for s in sigmas]
        self.steps = max(1, len(self.sigmas) - 1)
        self.grid = wan_hooks.token_grid(noise.shape)
        self.receiver_rope = wan_hooks.rope_spec(receiver)
        self._rerotation = None
        self.report = Report(layers=bridge.fused_layers)
        self._strength_sum = {layer: 0.0 for layer in bridge.fused_layers}
        self._change = {layer: ([], []) for layer in bridge.fused_layers}
        self._calls = 0
        self.active = False
        self.kinds = None
        self.progress = 0.0
        source = bridge.source
        if isinstance(source, LiveSharer):
            self.source_run = LiveSharerRun(source, bridge._sharer, bridge.sharer_layers, noise.to(self.device),
                                            latent_image.to(self.device), denoise_mask, seed, self.device)
        else:
            self.source_run = source.open_run(self, guider)
        self.sharer_rope = self.source_run.rope
        model = receiver.model
        self.compute_dtype = model.manual_cast_dtype or model.get_dtype()
        self.fuser = None

    # -- per model call -----------------------------------------------------------------------
    def begin_call(self, x, t, transformer_options):
        self._calls += 1
        self.kinds = list(transformer_options.get("cond_or_uncond", [COND]))
        step = step_of(self.sigmas, float(t.flatten()[0]))
        self.progress = step / max(1, self.steps - 1)
        self.active = self.bridge.schedule.active(self.progress) and self.bridge.strength != 0.0
        if not self.active:
            return
        if self.fuser is None:
            bridge = self.bridge
            bank = bridge.bank_for(x.device, self.compute_dtype)
            self.fuser = LayerFuser(bank, bridge.bundle.layer_map, bridge.schedule, bridge.strength)
        refresh = self.bridge.source.refresh_every
        self.source_run.ensure(x, t, self.kinds, step, step // refresh if refresh > 1 else ("call", self._calls))

    def end_call(self):
        self.active = False
        self.kinds = None

    # -- per fused layer ------------------------------------------------------------------------
    def fuse(self, layer, k, v, heads):
        bridge = self.bridge
        sharer_layer = bridge.bundle.layer_map.pairs[layer]
        sk, sv = self.source_run.kv(sharer_layer, self.kinds)
        sk, sv = sk.to(device=k.device, dtype=k.dtype), sv.to(device=v.device, dtype=v.dtype)
        sig = bridge.bundle.sharer
        sk = sk.reshape(*sk.shape[:2], sig.num_heads, sig.head_dim)
        sv = sv.reshape(*sv.shape[:2], sig.num_heads, sig.head_dim)
        sk, sv = self.align(sk, sv)
        kh = k.reshape(*k.shape[:2], heads, -1)
        vh = v.reshape(*v.shape[:2], heads, -1)
        k2 = self.fuser.fuse_layer(layer, "k", sk, kh, self.progress)
        v2 = self.fuser.fuse_layer(layer, "v", sv, vh, self.progress)
        self._measure(layer, kh, k2, vh, v2)
        return k2.reshape(k.shape), v2.reshape(v.shape)

    def align(self, sk, sv):
        """Bring sharer K/V onto the receiver's token grid and RoPE positions (see c2c_core.align)."""
        src_grid = self.source_run.grid
        src_rope = self.sharer_rope if self.bridge.source.rope_alignment == "auto" else self.receiver_rope
        if src_grid == self.grid:
            if self._rerotation is None:
                self._rerotation = RopeRerotation(src_rope.positions(src_grid), self.receiver_rope.positions(self.grid),
                                                  sk.shape[-1], src_rope.theta)
            return self._rerotation.apply(sk), sv
        return align_kv(sk, sv, src_grid, self.grid, src_rope, self.receiver_rope, self.source_run.grid_mode)

    def _measure(self, layer, kh, k2, vh, v2):
        """Queue the relative K/V change on a token subsample; reduced to floats once, at the end."""
        self._strength_sum[layer] += self.fuser.strength_at(layer, self.progress)
        s = self.STATS_TOKEN_STRIDE
        with torch.no_grad():
            for before, after, out in ((kh, k2, self._change[layer][0]), (vh, v2, self._change[layer][1])):
                b = before[:, ::s].float()
                out.append((after[:, ::s].float() - b).norm() / b.norm().clamp_min(1e-12))

    def close(self) -> Report:
        self.source_run.close()
        r = self.report
        r.model_calls = self._calls
        r.sharer_forwards = getattr(self.source_run, "forwards", 0)
        r.peak_kv_bytes = getattr(self.source_run, "peak_bytes", 0)
        for layer in r.layers:
            ks, vs = self._change[layer]
            r.k_change[layer] = float(torch.stack(ks).mean()) if ks else 0.0
            r.v_change[layer] = float(torch.stack(vs).mean()) if vs else 0.0
            r.strength[layer] = self._strength_sum[layer] / len(ks) if ks else 0.0
            bank = self.bridge.bundle.bank
            r.gate[layer] = {which: static_gate(bank.projector(layer, which)) for which in ("k", "v")}
        return r
