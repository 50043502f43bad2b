"""Attach a sharer's K/V (live or recorded) to a diffusers receiver transformer, and detach it bit-for-bit.

The diffusers side of the host contract (c2c_core.contract; c2c_comfy/bridge.py is the ComfyUI side).
Lifecycle, per sampling run (one pipeline call):
  ``CallHook`` (pre_forward)   -> per model call: the CFG branch, step and noise percent are resolved and
                                  ``FusionRun.begin_call`` sets per-layer strengths; nothing runs yet;
  ``SelfAttentionTap``         -> per fused block. At the call's first one the bridge's ``RefreshTracker``
                                  decides whether the call gets fresh sharer K/V or reuses the last ones
                                  (``Call.window``) and the K/V source makes them (live: the sharer runs now,
                                  on the same latent and timestep, when the window is new); then the sharer's
                                  K/V are aligned and projected (kept per window and branch) and blended.
The sharer is asked for at the first fused block, not when the call starts (as in the ComfyUI host): a call
that a receiver-side cache (diffusers' FirstBlockCache) cuts short before its fused blocks runs no sharer and
is not counted by the tracker.
A run opens at the first call (or with :meth:`Bridge.session`) and closes when the session ends, when
sampling starts over (the timestep goes up), or at :meth:`Bridge.detach`; its report is ``last_report``.

CFG branches (``POSITIVE``/``NEGATIVE``) come from ``transformer.cache_context("cond"/"uncond")``
(WanPipeline). Pipelines that call the transformer without a cache context (WanImageToVideoPipeline,
ChronoEditPipeline in diffusers 0.42) get the documented fallback: within one timestep the first call is
"cond", the second "uncond" — the order every diffusers Wan pipeline uses. The step index comes from the context, else
from the timestep (a new value is a new step). The noise percent of a call (windows) follows ComfyUI's
convention for flow models, sigma = shift·(1−p) / (1 + (shift−1)·(1−p)), with the scheduler's shift,
so a window means the same steps in both hosts.

Nothing is written onto the models beyond diffusers' own extension points (``set_processor``, the
``HookRegistry``); ``detach`` gives back the original processors and removes the hook.
"""
from __future__ import annotations

import itertools
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from c2c_core import FusionSchedule, health
from c2c_core.bundle import ProjectorBundle, arch_mismatches
from c2c_core.contract import NEGATIVE, POSITIVE, Call
from c2c_core.errors import ScheduleError
from c2c_core.refresh import RefreshPolicy, RefreshTracker, SignalMeter
from c2c_core.runtime import BankCache, FusionRun, percent_of

from . import models
from .errors import BridgeSetupError
from .hooks import add_taps, register_call_hook, remove_call_hook, remove_taps

__all__ = ["Bridge", "C2CBridgeConfig", "CallClock", "apply_c2c_bridge", "flow_sigma", "remove_c2c_bridge"]

_CONTEXT_BRANCH = {"cond": POSITIVE, "uncond": NEGATIVE}     # diffusers' cache_context names
_ids = itertools.count()


def flow_sigma(percent: float, shift: float) -> float:
    """Sigma at ``percent`` through a flow model's schedule (ComfyUI's ``percent_to_sigma`` for Wan)."""
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    x = 1.0 - percent
    return shift * x / (1.0 + (shift - 1.0) * x)


def scheduler_sigmas(scheduler) -> Optional[list]:
    """The run's noise schedule (n + 1 sigmas, the last 0) a scheduler holds after ``set_timesteps``, or None."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or len(sigmas) < 2:
        return None
    return [float(s) for s in sigmas]


# A config's refresh fields -> RefreshPolicy's (BridgeConfig, WanChronoEditConfig and C2CBridgeConfig share the names).
REFRESH_FIELDS = {"refresh": "mode", "refresh_every": "every", "threshold": "threshold", "budget": "budget",
                  "max_reuse": "max_reuse"}


def refresh_policy(config) -> RefreshPolicy:
    """The ``c2c_core.refresh.RefreshPolicy`` a config's refresh fields describe; a bad value is refused naming the
    config's own field (``BridgeConfig.refresh_every=0; expected …``)."""
    owner = type(config).__name__
    try:
        return RefreshPolicy(**{policy: getattr(config, name) for name, policy in REFRESH_FIELDS.items()})
    except ScheduleError as e:
        message = str(e)
        for name, policy in REFRESH_FIELDS.items():
            message = message.replace(f"RefreshPolicy.{policy}=", f"{owner}.{name}=")
        if message.startswith(f"{owner}.refresh="):
            message += (f" Use 'every' (with refresh_every), 'adaptive' (threshold, max_reuse) or 'budget' (budget, "
                        f"max_reuse).")
        raise BridgeSetupError(message) from None


def scheduler_shift(scheduler) -> float:
    """The flow shift a diffusers scheduler applies (FlowMatchEuler: shift, UniPC/DPM: flow_shift)."""
    config = getattr(scheduler, "config", {}) or {}
    for name in ("shift", "flow_shift"):
        value = config.get(name) if hasattr(config, "get") else None
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return 1.0



def check_architecture(bundle, role: str, found) -> None:
    """Same shapes are not enough: a projector learned one network's keys and values. Refuse a model whose
    architecture tag differs from the one the bundle names for ``role`` (untagged bundles: shapes only)."""
    sharer = found if role == "sharer" else bundle.sharer
    receiver = found if role == "receiver" else bundle.receiver
    for mismatch in arch_mismatches(bundle, sharer, receiver):
        raise BridgeSetupError(f"{mismatch.describe()}. Use the projector trained for this pair of models (same "
                               f"shapes are not enough: it learned another network's keys and values).")

class CallClock:
    """CFG branch and step of each transformer call: from the pipeline's cache context, else by call order.

    A context's ``step_index`` and name win (WanPipeline gives both; then the timestep is never read back
    from the device). Otherwise a new timestep value is a new step, and within one step the first call is
    the positive branch ("cond"), the second the negative ("uncond") — the fallback for pipelines without
    ``cache_context``.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.step, self.calls, self.value = -1, 0, None

    @staticmethod
    def needs_timestep(context) -> bool:
        return context is None or context.step_index is None or context.sigma is None

    def restarted(self, value, context) -> bool:
        """True when sampling started over (the step index or the timestep went back)."""
        if context is not None and context.step_index is not None:
            return 0 <= context.step_index < self.step
        return self.value is not None and value > self.value

    def tick(self, value, context) -> tuple[int, int]:
        """(branch, step) of this call."""
        if context is not None and context.step_index is not None:
            new_step = int(context.step_index) != self.step
            step = int(context.step_index)
        else:
            new_step = value != self.value
            step = self.step + 1 if new_step else self.step
        self.calls = 0 if new_step else self.calls + 1
        self.step, self.value = step, value
        if context is not None and context.name in _CONTEXT_BRANCH:
            return _CONTEXT_BRANCH[context.name], step
        return (POSITIVE if self.calls % 2 == 0 else NEGATIVE), step


def call_inputs(args, kwargs, context=None):
    """(hidden_states, timestep, timestep as a float or None) of a Wan transformer call.

    The float is read back only when the cache context lacks the step index or sigma.
    """
    latent = args[0] if args else kwargs["hidden_states"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    value = float(timestep.flatten()[0]) if CallClock.needs_timestep(context) else None
    return latent, timestep, value


@contextmanager
def _offload_lifted(pipeline, transformers):
    """Take a pipeline's model CPU offload hooks off for the block and put them back after it."""
    device = getattr(pipeline, "_offload_device", None)
    if pipeline is None or device is None or not any(hasattr(t, "_hf_hook") for t in transformers):
        yield
        return
    pipeline.remove_all_hooks()
    try:
        yield
    finally:
        pipeline.enable_model_cpu_offload(device=device)


class Bridge:
    """Fuses one K/V source into one receiver (or a Wan2.2 pair of experts) through one projector bundle.

    source: a ``LiveSharer`` or ``RecordedSharer``. bundle: a ``c2c_core.ProjectorBundle``
        (``load_bundle(path)``) whose receiver signature matches the receiver transformer. strength, schedule,
        layer_strengths, rope_alignment: as in ``c2c_core.runtime.FusionRun``. scheduler: the receiver pipeline's
        scheduler (its shift places windows, its sigmas are the run's schedule; without one, shift 1).
        refresh: when the sharer runs, a ``c2c_core.refresh.RefreshPolicy`` (default: every model call). The
        bridge keeps one ``RefreshTracker`` for it across runs (``bridge.tracker``): a run that starts where the
        previous one ended (a schedule sampled in two parts) continues its step count. The argument order is
        the ComfyUI bridge's: ``Bridge(source, bundle, strength, schedule, …)``.
    """

    def __init__(self, source, bundle, strength: float = 1.0, schedule: FusionSchedule = FusionSchedule(),
                 layer_strengths=None, rope_alignment: str = "auto", scheduler=None,
                 refresh: RefreshPolicy = RefreshPolicy()):
        if not isinstance(bundle, ProjectorBundle):
            swapped = " (the arguments are swapped: the source comes first)" if isinstance(source, ProjectorBundle) else ""
            raise BridgeSetupError(f"Bridge(source, bundle, …): bundle is a {type(bundle).__name__}{swapped}; expected a "
                                   f"c2c_core.ProjectorBundle (load_bundle(path)). Call Bridge(LiveSharer(...) or "
                                   f"RecordedSharer(...), bundle, …).")
        if rope_alignment not in ("auto", "off"):
            raise BridgeSetupError(f"rope_alignment={rope_alignment!r}; expected 'auto' or 'off'.")
        if not isinstance(refresh, RefreshPolicy):
            raise BridgeSetupError(f"Bridge(refresh=…) is a {type(refresh).__name__}; expected a "
                                   f"c2c_core.refresh.RefreshPolicy, e.g. RefreshPolicy(mode='budget', budget=2).")
        self.bundle = bundle
        self.refresh = refresh
        self.tracker = RefreshTracker(refresh)      # outlives runs: a split schedule continues its count
        self.meter = SignalMeter(refresh)
        self.source = source
        self.strength = float(strength)
        self.schedule = schedule
        self.layer_strengths = layer_strengths
        self.rope_alignment = rope_alignment
        self.scheduler = scheduler
        self.key = f"dit_cache_bridge.{next(_ids)}"
        self.receivers: list = []
        self.pipeline = None
        self.banks = BankCache(bundle.bank)
        self.run: FusionRun | None = None
        self.source_run = None
        self.last_report = None
        self.last_backward_report = None   # bidirectional: the receiver -> sharer fusion's report
        self.in_sharer = False          # set by a live source while the sharer runs (it may be the receiver)
        self._call = None                # the call now running, once its first fused block decided it
        self._pending = None             # a call that fuses, not yet decided
        self._clock = CallClock()
        self._session = False
        self._training = False
        self._sigmas = None              # the run's schedule given to session(), else the scheduler's
        self.continued = False           # the open run continues the previous run's schedule (tracker.begin_run)
        self.continuable = False         # the open run ends above sigma 0: a later run may continue it

    @property
    def fused_layers(self) -> list:
        return sorted(self.bundle.layer_map.pairs)

    @property
    def sharer_layers(self) -> list:
        return sorted(set(self.bundle.layer_map.pairs.values()))

    # -- attach / detach ----------------------------------------------------------------------------
    def attach(self, receiver, scheduler=None) -> "Bridge":
        """Attach to a transformer, or to a pipeline's ``transformer`` (and ``transformer_2``, Wan2.2).

        CPU offload: diffusers removes and re-adds accelerate's hooks after every pipeline call, which
        keeps a hook registered *before* them and drops one registered after. Attached to a pipeline
        whose model CPU offload is on, the bridge therefore takes the offload hooks off, attaches and
        puts them back (and the same on detach). A bare transformer with accelerate hooks is refused.
        """
        transformers = [receiver]
        self.pipeline = None
        if hasattr(receiver, "components"):
            self.pipeline = receiver
            scheduler = scheduler or getattr(receiver, "scheduler", None)
            transformers = [t for t in (getattr(receiver, "transformer", None), getattr(receiver, "transformer_2", None))
                            if t is not None]
        elif hasattr(receiver, "_hf_hook"):
            raise BridgeSetupError(
                f"{type(receiver).__name__} carries accelerate hooks (enable_model_cpu_offload was called); diffusers "
                f"re-creates them after each pipeline call and would drop the bridge. Attach to the pipeline instead "
                f"(bridge.attach(pipe)), or attach before calling pipe.enable_model_cpu_offload().")
        self.scheduler = scheduler or self.scheduler
        for transformer in transformers:
            found = models.signature(transformer)
            if not found.same_shape(self.bundle.receiver):
                raise BridgeSetupError(
                    f"receiver {type(transformer).__name__} has {found.num_layers} layers × {found.num_heads} heads × "
                    f"{found.head_dim}; the projector bundle was made for {self.bundle.receiver.num_layers} × "
                    f"{self.bundle.receiver.num_heads} × {self.bundle.receiver.head_dim}. Use a bundle for this model.")
            check_architecture(self.bundle, "receiver", found)
            if any(t is transformer for t in self.receivers):
                raise BridgeSetupError(f"this bridge is already attached to that {type(transformer).__name__}.")
        self.source.attach(self)
        try:
            with _offload_lifted(self.pipeline, transformers):
                for transformer in transformers:
                    self.receivers.append(transformer)
                    add_taps(transformer, self.fused_layers, self.key, self._fuse)
                    register_call_hook(transformer, self.key, self)
        except BaseException:
            self.detach()           # nothing half-attached stays behind
            raise
        return self

    def detach(self) -> None:
        """Close the open run and give back the receivers' original processors and forward."""
        self.close_run()
        with _offload_lifted(self.pipeline, self.receivers):
            for transformer in self.receivers:
                remove_call_hook(transformer, self.key)
                remove_taps(transformer, self.key)
        self.receivers = []
        self.source.detach(self)

    @contextmanager
    def session(self, training: bool = False, sigmas=None):
        """One sampling run: opened at the first call inside, closed (``last_report`` set) at exit.

        ``training``: the run fuses through the bundle's own bank as it is (no copy placed on the
        latents' dtype, which autograd would not reach; no report statistics), as projector training
        needs; with a bank in the receiver's dtype that is bit for bit what inference fuses.
        ``sigmas``: the run's noise schedule (n + 1 sigmas) for a sampling loop of your own; a pipeline's
        scheduler gives it by itself. A refresh policy other than every-call needs one of the two.
        """
        self.close_run()
        self._session, self._training = True, bool(training)
        self._sigmas = None if sigmas is None else [float(s) for s in sigmas]
        try:
            yield self
        finally:
            self._session = self._training = False
            report = self.close_run()
            self._sigmas = None
        if report is not None and report.nonfinite_layers:   # as ComfyUI: never a silent black video
            raise BridgeSetupError(f"{health.nonfinite_hint(report.nonfinite_layers)} (Bridge strength="
                                   f"{self.strength!r}; bridge.last_report has the details).")

    def close_run(self):
        run, source_run = self.run, self.source_run
        self.run = self.source_run = None
        self._call = self._pending = None
        self._clock.reset()
        if run is None:
            return self.last_report
        self.last_report = run.close(source_run.close(), self.tracker.report().to_json())
        return self.last_report

    # -- per model call (CallHook listener) ----------------------------------------------------------
    def begin_call(self, module, args, kwargs, context):
        if self.in_sharer:              # the sharer's own forward (it may be the receiver): not a receiver call
            return args, kwargs
        self._call = self._pending = None
        latent, timestep, value = call_inputs(args, kwargs, context)
        if self.run is not None and not self._session and self._clock.restarted(value, context):
            self.close_run()            # sampling started over: a new run
        sigma = context.sigma if context is not None and context.sigma is not None else value / self._train_steps()
        if self.run is None:
            self._open_run(module, latent, float(sigma))
        branch, step = self._clock.tick(value, context)
        shift = scheduler_shift(self.scheduler)
        percent = percent_of(sigma, lambda p: flow_sigma(p, shift), snap=(self.schedule.start, self.schedule.end))
        if self.run.begin_call(percent):
            self._pending = (latent[:, : module.config.out_channels], latent, timestep, branch, step, float(sigma))
        return args, kwargs

    def end_call(self):
        if not self.in_sharer:
            self._call = self._pending = None

    def _decide(self) -> Call:
        """At the call's first fused block: the tracker decides whether the sharer runs (a call a receiver-side cache
        cut short is never decided nor counted), and the K/V source makes the call's K/V."""
        x, latent, timestep, branch, step, sigma = self._pending
        refresh = self.tracker.decide(sigma, self.meter.signal(x))
        call = self._call = Call(latent, timestep, (branch,), step, sigma, refresh.window, step)
        self._pending = None
        self.source_run.ensure(call)
        return call

    def _train_steps(self) -> float:
        config = getattr(self.scheduler, "config", None)
        return float(config.get("num_train_timesteps", 1000)) if config is not None else 1000.0

    def _open_run(self, receiver, latent, sigma: float):
        sigmas = self._sigmas or scheduler_sigmas(self.scheduler)
        if sigmas is None:
            if not self.refresh.always:
                raise BridgeSetupError(
                    f"refresh {self.refresh.describe()} needs the run's noise schedule, and this bridge has no "
                    f"scheduler; attach it to the pipeline, pass Bridge(scheduler=pipe.scheduler), or run your own "
                    f"loop inside bridge.session(sigmas=…).")
            sigmas = [sigma, 0.0]       # every call runs the sharer: the schedule only numbers the report's steps
        self.continued = self.tracker.begin_run(sigmas)
        self.continuable = sigmas[-1] != 0.0
        shape = tuple(latent.shape)
        self.source_run = self.source.open_run(self, shape)
        self.run = FusionRun(
            self.bundle, self.schedule, self.strength, self.layer_strengths,
            sharer_rope=self.source_run.rope, receiver_rope=models.rope_spec(receiver, shape),
            sharer_grid=self.source_run.grid, receiver_grid=models.token_grid(receiver, shape),
            rope_alignment=self.rope_alignment, grid_mode=self.source_run.grid_mode,
            device=None if self._training else latent.device, dtype=None if self._training else latent.dtype,
            banks=self.banks, stats=not self._training)

    # -- per fused layer (SelfAttentionTap hook) -----------------------------------------------------
    def _fuse(self, layer, k, v):
        call, run = self._call, self.run
        if (call is None and self._pending is None) or self.in_sharer or run.strength(layer) == 0.0:
            return k, v
        if call is None:
            call = self._decide()
        self.source_run.offer(layer, k, v)        # bidirectional: the sharer's next blocks read them
        pk, pv = self._sharer_part(layer, k, call)
        return run.blend(layer, k, v, pk, pv)

    def _sharer_part(self, layer, k, call):
        """The sharer's K/V for receiver ``layer``, aligned and through the projector's sharer side
        (``FusionRun.sharer_part``), kept per layer and CFG branch while the refresh window holds: a call that reuses
        the sharer's K/V recomputes nothing that depends only on them, and does not fetch them."""
        run = self.run
        key = None if self._training or self.refresh.always else (call.window, call.branches)
        cached = run.cached_part(layer, key)
        if cached is not None:
            return cached
        sk, sv = self.source_run.kv(run.sharer_layer(layer), call)
        return run.sharer_part(layer, sk, sv, key, like=k)



# -- diffusers' own shape: a config dataclass, apply_…(module, config) / remove_…(module) -------------------------

@dataclass
class C2CBridgeConfig:
    """What ``apply_c2c_bridge`` fuses, as diffusers' ``FirstBlockCacheConfig`` says what ``apply_first_block_cache``
    caches. projector: a bundle file or ``ProjectorBundle``; strength (0..2), start/end (percent of the noise
    schedule), ramp: ``c2c_core.FusionSchedule``; layer_strengths: per receiver layer, or None; rope_alignment:
    "auto" or "off". refresh ("every", "adaptive", "budget"), refresh_every, threshold, budget, max_reuse: when
    the sharer runs, ``c2c_core.refresh.RefreshPolicy`` (BridgeConfig's fields of the same names)."""

    projector: object
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    ramp: str = "constant"
    refresh_every: int = RefreshPolicy.every
    layer_strengths: Optional[dict] = None
    rope_alignment: str = "auto"
    refresh: str = RefreshPolicy.mode
    threshold: float = RefreshPolicy.threshold
    budget: int = RefreshPolicy.budget
    max_reuse: int = RefreshPolicy.max_reuse


_applied: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()     # module -> bridges apply_c2c_bridge attached


def apply_c2c_bridge(module, config: C2CBridgeConfig, sharer, scheduler=None) -> Bridge:
    """Fuse ``sharer`` (a LiveSharer or RecordedSharer) into ``module``: a Wan-family transformer, or its pipeline
    (needed under model CPU offload; Wan2.2's two experts). Stacks with diffusers' caches and offloading;
    ``remove_c2c_bridge(module)`` gives the module back bit for bit. Returns the Bridge (its ``last_report``)."""
    from c2c_core import load_bundle
    if not isinstance(config, C2CBridgeConfig):
        raise BridgeSetupError(f"apply_c2c_bridge(module, config, sharer=…): config is a {type(config).__name__}; "
                               f"expected a C2CBridgeConfig.")
    if not 0.0 <= float(config.strength) <= 2.0:
        raise BridgeSetupError(f"C2CBridgeConfig.strength={config.strength!r}; expected a number from 0 to 2.0. "
                               f"Pass a value in that range.")
    bundle = config.projector
    if isinstance(bundle, (str, os.PathLike)):
        bundle = load_bundle(bundle)
    policy = refresh_policy(config)
    schedule = FusionSchedule(start=config.start, end=config.end, ramp=config.ramp)
    bridge = Bridge(sharer, bundle, strength=config.strength, schedule=schedule,
                    layer_strengths=config.layer_strengths, rope_alignment=config.rope_alignment,
                    scheduler=scheduler, refresh=policy).attach(module)
    _applied.setdefault(module, []).append(bridge)
    return bridge


def remove_c2c_bridge(module) -> None:
    """Detach every bridge ``apply_c2c_bridge`` put on ``module`` (most recent first); a no-op when there is none."""
    for bridge in reversed(_applied.pop(module, [])):
        bridge.detach()
