"""Runtime that attaches a sharer's K/V to a clone of the receiver.

Lifecycle, per sampling run of the bridged clone (K/V sources: c2c_comfy/live.py and c2c_comfy/recorded.py):
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

from ..c2c_core import FusionSchedule, LayerFuser, ModelSignature, RopeRerotation, align_kv, static_gate
from . import compat
from .live import COND, Shared

log = logging.getLogger("dit_cache_bridge")

_WRAPPER_KEY = "dit_cache_bridge"
_ids = itertools.count()


def step_of(sigmas: list, sigma: float) -> int:
    """Index of the sampling step a sigma belongs to (samplers may evaluate between two sigmas)."""
    step = 0
    for i, s in enumerate(sigmas[:-1]):
        if s >= sigma - 1e-7 * max(1.0, abs(sigma)):
            step = i
    return step


# --------------------------------------------------------------------------------------------
# The bridge
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Report(Shared):
    """What one bridged run did, for the fusion inspector and the tests."""
    layers: list = field(default_factory=list)
    strength: dict = field(default_factory=dict)       # receiver layer -> mean strength over fusing calls
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


class Bridge(Shared):
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
        self.sharer_patcher = None      # set by a live source when attached
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
        compat.hook_self_attention(patched, self.fused_layers, self._fuse)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, self.key, self._outer_sample)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, self.key, self._apply_model)
        self.source.attach(self, patched, receiver)
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
    def capture(self, layer, q, k, v, heads, transformer_options):
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
        self.grid = compat.token_grid(noise.shape)
        self.receiver_rope = compat.rope_spec(receiver)
        self._rerotation = None
        self.report = Report(layers=bridge.fused_layers)
        self._strength_sum = {layer: 0.0 for layer in bridge.fused_layers}
        self._change = {layer: ([], []) for layer in bridge.fused_layers}
        self._calls = 0
        self._active_calls = 0
        self.strengths = {}
        self.active = False
        self.kinds = None
        self.progress = 0.0
        self.source_run = bridge.source.open_run(self, guider, noise, latent_image, denoise_mask, seed)
        self.sharer_rope = self.source_run.rope
        model = receiver.model
        self.compute_dtype = model.manual_cast_dtype or model.get_dtype()
        self.fuser = None

    # -- per model call -----------------------------------------------------------------------
    def begin_call(self, x, t, transformer_options):
        """Resolve this call's step and per-layer strengths; fetch sharer K/V only if a layer fuses."""
        self._calls += 1
        self.kinds = list(transformer_options.get("cond_or_uncond", [COND]))
        step = step_of(self.sigmas, float(t.flatten()[0]))
        self.progress = step / max(1, self.steps - 1)
        if self.fuser is None:
            bridge = self.bridge
            bank = bridge.bank_for(x.device, self.compute_dtype)
            self.fuser = LayerFuser(bank, bridge.bundle.layer_map, bridge.schedule, bridge.strength)
        self.strengths = {layer: self.fuser.strength_at(layer, self.progress) for layer in self.report.layers}
        self.active = any(s != 0.0 for s in self.strengths.values())
        if not self.active:
            return
        self._active_calls += 1
        for layer, strength in self.strengths.items():
            self._strength_sum[layer] += strength
        refresh = self.bridge.source.refresh_every
        self.source_run.ensure(x, t, self.kinds, step, step // refresh if refresh > 1 else ("call", self._calls))

    def end_call(self):
        self.active = False
        self.kinds = None

    # -- per fused layer ------------------------------------------------------------------------
    def fuse(self, layer, k, v, heads):
        if self.strengths[layer] == 0.0:
            return k, v                     # switched off for this step: no sharer K/V, no alignment
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
            r.strength[layer] = self._strength_sum[layer] / self._active_calls if self._active_calls else 0.0
            bank = self.bridge.bundle.bank
            r.gate[layer] = {which: static_gate(bank.projector(layer, which)) for which in ("k", "v")}
        return r
