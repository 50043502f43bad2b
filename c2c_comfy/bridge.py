"""Runtime that attaches a sharer's K/V to a clone of the receiver (the ComfyUI side of c2c_core.contract).

Lifecycle, per sampling run of the bridged clone (K/V sources: c2c_comfy/live.py and c2c_comfy/recorded.py):
  OUTER_SAMPLE wrapper  -> ``BridgeRun`` is created (sharer conditioning, positions, projector on
                           the run's device, the guider's conds mapped to branches by uuid) and always
                           torn down in ``finally``;
  CALC_COND_BATCH       -> per model evaluation (a sampler may evaluate several times per step):
                           its index, for per-evaluation replay; the latent's shape is checked;
  APPLY_MODEL wrapper   -> per model call: branches of its CFG chunks, sigma percent and strengths are
                           resolved; nothing runs yet;
  self-attention hook   -> per fused block: ``Bridge._hand_off`` (the one torch.compiler.disable'd call: a
                           compiled receiver breaks its graph only there) hands the sharer's K/V over, made
                           ready by ``FusionRun.sharer_part``; at the call's first fused block it asks the bridge's
                           ``RefreshTracker`` whether the sharer runs (``c2c_core.refresh``) and has the K/V
                           source make that ``Call``'s K/V (live: the sharer runs now on the same x and sigma;
                           recorded: replayed). The ``LayerBlend`` it returns (``FusionRun.layer_blend``) then
                           fuses them into the receiver's: the traced part.
The sharer is asked for at the first fused block, not when the call starts, so a receiver step that a
receiver-side cache (ComfyUI's EasyCache) skips runs no sharer and is not counted by the tracker.
The tracker lives on the Bridge, across sampling runs: a run that starts where the previous one ended (at its
last sigma, on its output latent: a KSamplerAdvanced split) continues its step count and refresh cycle, and a
live source hands the K/V it holds over to it.
Fusion windows are sigma percent, as ComfyUI's ControlNet, hooks and EasyCache count them
(``model_sampling.percent_to_sigma``), so split samplers and partial denoise line up with core nodes.
Nothing is written onto the models given to us: the receiver and sharer are cloned, and all state
lives in this module's objects, referenced from closures (ModelPatcher.clone deep-copies
model_options, so state objects there return themselves from ``__deepcopy__``).
"""
from __future__ import annotations

import itertools
import logging

import comfy.patcher_extension
import torch

from c2c_core import FusionSchedule, ModelSignature, health
from c2c_core.contract import Call
from c2c_core.refresh import RefreshTracker, SignalMeter
from c2c_core.runtime import BankCache, FusionRun, RunReport, percent_of, step_index
from . import compat, memory
from .branches import branch_map, call_branches
from .errors import BridgeInputError
from .live import Shared

log = logging.getLogger("dit_cache_bridge")

_WRAPPER_KEY = "dit_cache_bridge"
_ids = itertools.count()


Report = RunReport      # what one bridged run did (c2c_core.runtime.RunReport), for the inspector and tests


class Bridge(Shared):
    """Fuses one K/V source into a receiver through one projector bundle."""

    def __init__(self, source, bundle, strength: float, schedule: FusionSchedule, receiver_signature: ModelSignature,
                 on_report=None, node: str = "Fuse Caches", model_input: str = "model"):
        self.node = node
        self.model_input = model_input      # the node's input the receiver came in through (for errors)
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
        self.banks = BankCache(bundle.bank)     # the projector bank placed on the run's device, kept across runs
        self.tracker = RefreshTracker(source.refresh)   # when the sharer runs; kept across runs (split samplers)
        self.meter = SignalMeter(source.refresh)        # the tracker's signal, measured on the receiver's input
        self._last_out = None           # the previous run's output latent and the K/V its source handed over
        self._kept = None

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
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, self.key,
                                     self._calc_cond_batch)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, self.key, self._apply_model)
        self.source.attach(self, patched, receiver)
        memory.register_bank(self, patched, receiver)
        return patched

    # -- wrappers ---------------------------------------------------------------------------
    def _outer_sample(self, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                      disable_pbar=False, seed=None, *args, **kwargs):
        guider = executor.class_obj
        previous = self.run
        continues = self._last_out is not None and _same_latent(latent_image, self._last_out)
        kept, self._kept, self._last_out = self._kept, None, None
        self.run = BridgeRun(self, guider, noise, latent_image, denoise_mask, seed, sigmas, continues, kept)
        try:
            out = executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                           *args, **kwargs)
            self._last_out = out
        finally:
            run, self.run = self.run, previous
            if run.sigmas[-1] == 0.0 or self.source.refresh.always:
                self._last_out = None                       # nothing a next run could continue or reuse
            if self._last_out is not None:
                self._kept = run.source_run.handover()     # a split sampler's next half may reuse them
            self.last_report = run.close()
            if self.on_report is not None:
                try:
                    self.on_report(self.last_report)
                except Exception:  # a broken UI channel must not fail the sampling run
                    log.exception("dit_cache_bridge: could not send the fusion report")
        if self.last_report.nonfinite_layers:    # read once per run (c2c_core.health): never a silent black latent
            raise BridgeInputError(self.node, "strength", health.nonfinite_hint(self.last_report.nonfinite_layers),
                                   "finite fused K/V", "see the likely causes above")
        return out

    def _calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        run = self.run
        if run is not None:
            run.begin_evaluation(x_in)
        return executor(model, conds, x_in, timestep, model_options)

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
    @torch.compiler.disable
    def capture(self, layer, q, k, v, heads, transformer_options):
        """The sharer's self-attention hook: its K/V go to the run's source. A compiled sharer's one graph break per
        captured layer: the source keeps the tensors, ends the forward (SharerDone) or switches coroutines
        (lockstep), none of which torch.compile can trace (docs/compile.md)."""
        run = self.run
        if run is None:
            return k, v
        return run.source_run.capture(layer, k, v)

    def _fuse(self, layer, q, k, v, heads, transformer_options):
        """The receiver's self-attention hook: the hand-off, then the blend (what a compiled receiver traces)."""
        handed = self._hand_off(layer, k, v)
        if handed is None:
            return k, v
        blend, pk, pv = handed
        return blend(k, v, pk, pv)

    @torch.compiler.disable
    def _hand_off(self, layer, k, v):
        """THE boundary between the two models, once per fused layer: everything that decides or reaches the sharer
        (the run, the tracker, the source's ensure/kv, the sharer part and its cache) runs here, never traced, so a
        compiled receiver breaks its graph only at this call and traces the blend it returns as the same code for
        every layer (docs/compile.md). Returns (LayerBlend, pk, pv), or None when the layer does not fuse now."""
        run = self.run
        if run is None or not run.fusing:
            return None
        return run.hand_off(layer, k, v)


def _same_latent(latent, previous) -> bool:
    """True when ``latent`` is the previous run's output (one read per run): the run continues that one."""
    return (tuple(latent.shape) == tuple(previous.shape)
            and bool(torch.equal(latent.to(previous.device, previous.dtype), previous)))


class BridgeRun:
    """State of one sampling run of a bridged model; created and closed by the OUTER_SAMPLE wrapper.

    The host-free part (strengths, alignment, projection, statistics) is a ``c2c_core.runtime.FusionRun``;
    this class adds what only ComfyUI knows: the run's sigmas, the K/V source and the CFG chunks.
    """

    def __init__(self, bridge: Bridge, guider, noise, latent_image, denoise_mask, seed, sigmas, continues=False,
                 kept=None):
        self.bridge = bridge
        receiver = guider.model_patcher
        self.device = receiver.load_device
        self.seed = seed
        self.sigmas = [float(s) for s in sigmas]
        self.steps = max(1, len(self.sigmas) - 1)
        self.noise_shape = tuple(noise.shape)
        self.grid = compat.token_grid(noise.shape)
        self.receiver_rope = compat.rope_spec(receiver)
        self.guider = guider
        self.branches = branch_map(guider, bridge.node, bridge.model_input, middle=bridge.source.has_middle)
        self._percent_to_sigma = compat.percent_to_sigma(receiver)
        self._percents: dict = {}
        self.evaluation = -1            # index of the current model evaluation (several per step for heun …)
        self.fusing = False             # the model call now running fuses in some layer
        self.call: Call | None = None   # that call, once its first fused layer asked the tracker
        self._pending = None            # (x, t, branches, step, sigma) of a fusing call not yet decided
        self._part_key = None           # FusionRun.sharer_part's cache key for the call (None: no cache)
        self.continued = bridge.tracker.begin_run(self.sigmas, continues=continues)
        self.source_run = bridge.source.open_run(self, guider, noise, latent_image, denoise_mask, seed)
        if self.continued:
            self.source_run.resume(kept)
        self.sharer_rope = self.source_run.rope
        self.fusion = FusionRun(bridge.bundle, bridge.schedule, bridge.strength, sharer_rope=self.sharer_rope,
                                receiver_rope=self.receiver_rope, sharer_grid=self.source_run.grid,
                                receiver_grid=self.grid, rope_alignment=bridge.source.rope_alignment,
                                grid_mode=self.source_run.grid_mode, device=self.device,
                                dtype=compat.compute_dtype(receiver), banks=bridge.banks)

    def percent(self, sigma: float) -> float:
        """Sigma percent of ``sigma`` (ComfyUI's convention), computed once per distinct sigma."""
        p = self._percents.get(sigma)
        if p is None:
            schedule = self.bridge.schedule
            p = self._percents[sigma] = percent_of(sigma, self._percent_to_sigma, (schedule.start, schedule.end))
        return p

    # -- per model evaluation and call ----------------------------------------------------------
    def begin_evaluation(self, x_in):
        """One model evaluation (all CFG chunks at one sigma); checks the latent is the sampled one."""
        if tuple(x_in.shape) != self.noise_shape:
            raise BridgeInputError(
                self.bridge.node, self.bridge.model_input, f"a model evaluation on a latent of shape "
                f"{tuple(x_in.shape)}", f"the sampled latent's {self.noise_shape}",
                "remove context windows (context options) from the bridged model: the bridge fuses K/V of the "
                "whole latent")
        self.evaluation += 1

    def begin_call(self, x, t, transformer_options):
        """Resolve this call's chunk branches and per-layer strengths; fetch sharer K/V only if a layer fuses."""
        bridge = self.bridge
        branches = call_branches(transformer_options, self.branches, bridge.node, bridge.model_input)
        batch = self.noise_shape[0]
        if x.shape[0] != len(branches) * batch or tuple(x.shape[1:]) != self.noise_shape[1:]:
            raise BridgeInputError(
                bridge.node, bridge.model_input, f"a model call on {len(branches)} chunk(s) of shape "
                f"{(x.shape[0] // max(1, len(branches)),) + tuple(x.shape[1:])}",
                f"whole-latent chunks of the sampled latent's shape {self.noise_shape}",
                "remove area or mask conditioning (ConditioningSetArea/Mask) from the receiver's prompts: the bridge "
                "fuses K/V of the whole latent")
        sigma = float(t.flatten()[0])
        if not self.fusion.begin_call(self.percent(sigma)):
            return
        self.fusing = True
        self._pending = (x, t, branches, step_index(self.sigmas, sigma), sigma)

    def end_call(self):
        self.fusing, self.call, self._pending = False, None, None

    # -- per fused layer ------------------------------------------------------------------------
    def hand_off(self, layer, k, v):
        """k, v (B, N, H*D) as the attention override hands them over -> (LayerBlend, pk, pv) that fuse them (same
        layout), or None when the layer is switched off in this call (no sharer K/V, no alignment)."""
        blend = self.fusion.layer_blend(layer, k.device)
        if blend is None:
            return None
        if k.shape[1] != self.grid.numel:
            bridge = self.bridge
            raise BridgeInputError(
                bridge.node, bridge.model_input, f"self-attention over {k.shape[1]} tokens in layer {layer}",
                f"the {self.grid.numel} tokens of the sampled latent ({self.grid.frames}×{self.grid.height}×"
                f"{self.grid.width})", "remove conditioning that adds tokens to the receiver's attention (reference "
                "latents, extra frames) or fuse a model without it")
        pk, pv = self._sharer_kv(layer, k, v)
        return blend, pk, pv

    def _sharer_kv(self, layer, k, v):
        """The hand-off, per fused layer: the sharer's K/V for receiver ``layer``, aligned and through the projector's
        sharer side (cached while the sharer's K/V are reused). Everything that decides lives here (the tracker, the
        source's ensure/kv, the cache lookup), inside the boundary ``Bridge._hand_off``."""
        call = self.call if self.call is not None else self._decide()
        self.source_run.offer(layer, k, v)         # bidirectional lockstep: the sharer's next blocks read them
        cached = self.fusion.cached_part(layer, self._part_key)
        if cached is not None:
            return cached
        sk, sv = self.source_run.kv(self.fusion.sharer_layer(layer), call)
        return self.fusion.sharer_part(layer, sk, sv, self._part_key, like=k)

    def _decide(self) -> Call:
        """At the call's first fused layer: ask the tracker whether the sharer runs, and have the source make the K/V."""
        bridge = self.bridge
        x, t, branches, step, sigma = self._pending
        signal = bridge.meter.signal(x[:self.noise_shape[0]])      # the latent once, whatever the CFG chunks
        refresh = bridge.tracker.decide(sigma, signal, evaluation=self.evaluation)
        self.call = Call(x, t, branches, step, sigma, refresh.window, self.evaluation)
        self._part_key = None if bridge.source.refresh.always else (refresh.window, branches)
        self.source_run.ensure(self.call)
        return self.call

    def close(self) -> RunReport:
        return self.fusion.close(self.source_run.close(), self.bridge.tracker.report().to_json())
