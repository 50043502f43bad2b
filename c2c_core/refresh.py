"""When the sharer runs: one policy and one tracker for every host (issue 19).

A bridged model call either runs the sharer (fresh K/V) or reuses the K/V of the last call that did.
:class:`RefreshPolicy` says how to choose; :class:`RefreshTracker` is the only code that chooses. A host
keeps one tracker per bridged model, across sampling runs, and asks it once per model evaluation::

    tracker.begin_run(sigmas)                  # the run's schedule (n + 1 sigmas for n steps)
    refresh = tracker.decide(sigma, signal)    # Refresh(run_sharer, window, step), per model call that fuses
    tracker.report()                           # RefreshReport: which steps ran the sharer, forwards saved

Modes:
  every     run on steps 0, k, 2k, ... of the schedule (``every`` = k); k = 1 runs in every model evaluation.
  adaptive  run when the change the ``signal`` measured since the sharer last ran reaches ``threshold``.
  budget    at most ``budget`` sharer runs per run, placed where the signal says the K/V change most.

Signals (what ``threshold`` is measured in, one unit a user can read: a fraction, 0.1 = 10 %):
  sigma     (default) change of the noise level since the previous decision, as a fraction of the schedule's
            first sigma (free: no tensor read at all). A schedule-position prior, blind to the noise that
            ancestral/SDE samplers inject, which the two input signals read as change (docs/refresh.md).
  input     relative L1 change of the receiver's input latent since the previous decision
            (TeaCache/EasyCache style: the input moves with the step, and K/V move with the input).
            The host measures it with :func:`input_change` (one device read per decision, none per layer).
  magnitude relative change of the input's L2 norm (MagCache style magnitude ratio, ``|1 - |x|/|x_prev||``),
            via :func:`magnitude_change`; cheaper to keep than ``input`` (no copy of the latent is held).

Guards: the first step of a run always runs the sharer; in adaptive mode at most ``max_reuse`` schedule steps
in a row reuse (budget: below); ``threshold=0`` decides exactly as ``every=1``. Steps are sigma indices, so
a run whose first sigma is the previous run's last (a KSamplerAdvanced split) continues the count and the
cycle of the one before, as one KSampler would.

Budget: spend like adaptive, with the threshold the budget implies. The run's whole noise travel (first sigma
-> 0) is known up front, also to the first part of a split sampler: 1 in ``sigma`` units. A forward is spent when
the change since the sharer last ran reaches ``expected change of the whole run / budget``, so each forward serves
an equal share of the run. The expected change is the travel times a calibration (the signal's change per unit of
sigma travelled), taken from the previous run of this tracker when it had as many steps, else from the decisions
of this run so far. Because the signals grow toward the low-noise end, this places forwards late, where they count
most (experiments/REFRESH.md). Guards: never more than ``budget`` forwards; when as many steps are left as forwards
(a run that ends at sigma 0), the rest run; ``max_reuse`` forces a run only where the forwards left can pay for it
to the end (``forwards left >= ceil(steps left / (max_reuse + 1))``): until then a budget too small for the cap
is placed by the signal alone. A run that ends above sigma 0 (a split's first part) cannot see its end: neither
rule applies in it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .contract import same_sigma
from .errors import ScheduleError
from .runtime import step_index

__all__ = ["REFRESH_MODES", "SIGNALS", "RefreshPolicy", "Refresh", "RefreshReport", "RefreshTracker",
           "input_change", "magnitude_change", "kv_change", "SignalMeter"]

REFRESH_MODES = ("every", "adaptive", "budget")
SIGNALS = ("input", "sigma", "magnitude")
_FIELDS = ("mode", "every", "threshold", "max_reuse", "budget", "signal")


def _int(name: str, value: Any, lo: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ScheduleError(f"RefreshPolicy.{name}={value!r}; expected an integer >= {lo} ({hint}).")
    return value


@dataclass(frozen=True)
class RefreshPolicy:
    """When the sharer runs (see the module docstring for the modes, signals and guards).

    every: k for mode "every" (1 = every model evaluation). threshold: adaptive, the signal's change since
    the sharer last ran that triggers the next run (0 = every evaluation, as every=1). max_reuse: most schedule
    steps in a row that reuse (adaptive; budget: where the forwards left can pay for it). budget: sharer runs
    per sampling run. signal: what adaptive and budget measure, one of :data:`SIGNALS`.
    """

    mode: str = "every"
    every: int = 1
    threshold: float = 0.11     # defaults from the refresh frontier: docs/refresh.md, "Defaults"
    max_reuse: int = 8
    budget: int = 4
    signal: str = "sigma"

    def __post_init__(self) -> None:
        if self.mode not in REFRESH_MODES:
            raise ScheduleError(f"RefreshPolicy.mode={self.mode!r}; expected one of {REFRESH_MODES}.")
        _int("every", self.every, 1, "1 = run the sharer every step, k = reuse its K/V for k-1 steps")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ScheduleError(f"RefreshPolicy.threshold={t!r}; expected a number >= 0 (relative change since the "
                                f"sharer last ran, 0.1 = 10 %; 0 runs it every step).")
        object.__setattr__(self, "threshold", float(t))
        _int("max_reuse", self.max_reuse, 0, "most steps in a row that reuse the sharer's K/V")
        _int("budget", self.budget, 1, "sharer runs per sampling run; the first step always runs")
        if self.signal not in SIGNALS:
            raise ScheduleError(f"RefreshPolicy.signal={self.signal!r}; expected one of {SIGNALS}.")

    @property
    def always(self) -> bool:
        """True when every model evaluation runs the sharer (every=1, or adaptive at threshold 0)."""
        return (self.mode == "every" and self.every == 1) or (self.mode == "adaptive" and self.threshold == 0.0)

    @property
    def measures(self) -> bool:
        """True when decisions read a signal the host measures on tensors (adaptive/budget on input, magnitude)."""
        return self.mode != "every" and self.signal != "sigma" and not self.always

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "RefreshPolicy":
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise ScheduleError(f"RefreshPolicy.from_dict: unknown keys {unknown}; expected some of {list(_FIELDS)}.")
        return cls(**d)

    def describe(self) -> str:
        """One line for logs and the inspector."""
        if self.mode == "every":
            return "every step" if self.every == 1 else f"every {self.every} steps"
        if self.mode == "adaptive":
            return f"adaptive ({self.signal} change >= {self.threshold:g}, at most {self.max_reuse} reused in a row)"
        return f"budget ({self.budget} sharer runs, placed by {self.signal} change)"


@dataclass(frozen=True)
class Refresh:
    """One decision. run_sharer: fresh sharer K/V for this call. window: the K/V generation this call uses (calls
    with one window share the sharer's K/V; it changes exactly when the sharer runs). step: the schedule step
    (sigma index, counted across a continued run)."""

    run_sharer: bool
    window: Hashable
    step: int


@dataclass
class RefreshReport:
    """What the tracker decided in the current sampling run."""

    policy: dict = field(default_factory=dict)
    sharer_steps: list = field(default_factory=list)    # schedule steps at which the sharer ran
    reused_steps: list = field(default_factory=list)    # schedule steps that reused K/V (each once)
    evaluations: int = 0                                # model evaluations decided
    forwards_saved: int = 0                             # evaluations that reused instead of running the sharer
    continued: bool = False                             # this run continued the previous one (split sampler)

    def to_json(self) -> dict:
        return asdict(self)


Signal = Union[None, float, Callable[[], Optional[float]]]


class RefreshTracker:
    """Decides, per model evaluation, whether the sharer runs; kept by the host across sampling runs."""

    def __init__(self, policy: RefreshPolicy):
        if not isinstance(policy, RefreshPolicy):
            raise ScheduleError(f"RefreshTracker(policy={policy!r}); expected a RefreshPolicy.")
        self.policy = policy
        self._sigmas: list = []
        self._offset = 0               # schedule steps of the runs this one continues
        self._scale = 1.0              # the cycle's first sigma ("sigma" signal unit)
        self._windows = 0              # sharer runs in this cycle: the window counter
        self._last_run_step: Optional[int] = None
        self._accumulated = 0.0        # signal since the sharer last ran
        self._measured = 0.0           # signal measured in the cycle, and the sigma travelled at the same decisions
        self._travelled = 0.0
        self._cycle_steps = 0          # steps of the run that started the cycle (the calibration's key)
        self._previous: Optional[tuple] = None     # (steps, calibration) of the previous cycle
        self._calibration: Optional[float] = None  # from the previous cycle, when it had as many steps
        self._spent = 0
        self._previous_sigma: Optional[float] = None
        self._last_key: Any = None
        self._last: Optional[Refresh] = None
        self._report = RefreshReport(policy=policy.to_dict())

    # -- per sampling run ---------------------------------------------------------------------------
    def begin_run(self, sigmas: Sequence[float], *, continues: bool = True) -> bool:
        """Start a sampling run over ``sigmas``; returns True when it continues the previous run's schedule (its first
        sigma is the previous run's last, non-zero one). ``continues=False``: the host knows it does not (another
        latent), so it restarts whatever the sigmas say."""
        sigmas = [float(s) for s in sigmas]
        if len(sigmas) < 2:
            raise ScheduleError(f"RefreshTracker.begin_run: {len(sigmas)} sigmas; expected at least 2 (n + 1 for n steps).")
        continued = (bool(continues) and bool(self._sigmas) and self._sigmas[-1] != 0.0
                     and same_sigma(sigmas[0], self._sigmas[-1]))
        if continued:
            self._offset += len(self._sigmas) - 1
        else:
            if self._travelled > 0:
                self._previous = (self._cycle_steps, self._measured / self._travelled)
            self._cycle_steps = len(sigmas) - 1
            same = self._previous is not None and self._previous[0] == self._cycle_steps
            self._calibration = self._previous[1] if same else None
            self._offset = 0
            self._scale = max(abs(sigmas[0]), 1e-12)
            self._last_run_step = None
            self._accumulated = self._measured = self._travelled = 0.0
            self._spent = 0
            self._previous_sigma = None
        self._sigmas = sigmas
        self._last_key, self._last = None, None
        self._report = RefreshReport(policy=self.policy.to_dict(), continued=continued)
        return continued

    # -- per model call -----------------------------------------------------------------------------
    def decide(self, sigma: float, signal: Signal = None, *, evaluation: Hashable = None) -> Refresh:
        """The decision for a model call at ``sigma``.

        signal: the policy's measured change since the previous decision, a Python float, or a callable
        returning one (called only when a new decision needs it, so a host pays its device read only then),
        or None (unknown: adaptive runs the sharer, budget runs it while forwards are left). evaluation: the
        host's model-evaluation index; calls of one evaluation (separate CFG chunks) get one decision. Without
        it, calls at one sigma share one.
        """
        if not self._sigmas:
            raise ScheduleError("RefreshTracker.decide before begin_run; call begin_run(sigmas) at the run's start.")
        sigma = float(sigma)
        key = (evaluation, sigma) if evaluation is not None else (None, sigma)
        if self._last is not None and key == self._last_key:
            return self._last
        step = self._offset + step_index(self._sigmas, sigma)
        run = self._should_run(step, sigma, signal)
        if run:
            self._windows += 1
            self._last_run_step = step
            self._accumulated = 0.0
            self._spent += 1
        self._previous_sigma = sigma
        refresh = Refresh(run, ("refresh", self._windows), step)
        self._last_key, self._last = key, refresh
        r = self._report
        r.evaluations += 1
        if run:
            r.sharer_steps.append(step)
        else:
            r.forwards_saved += 1
            if step not in r.reused_steps:
                r.reused_steps.append(step)
        return refresh

    def _should_run(self, step: int, sigma: float, signal: Signal) -> bool:
        p = self.policy
        if p.always:
            return True
        if p.mode == "every":
            return self._last_run_step is None or step // p.every != self._last_run_step // p.every
        travelled = self._travel(sigma)
        change = travelled if p.signal == "sigma" else self._read(signal)   # read at every new decision: the
        if self._last_run_step is None:                                      # next one compares with it
            return True
        if change is None or not math.isfinite(change):
            return p.mode == "adaptive" or self._spent < p.budget
        self._accumulated += change
        self._measured += change
        self._travelled += travelled
        reused = step - self._last_run_step - 1          # steps in a row that reused before this one
        if p.mode == "adaptive":
            return reused >= p.max_reuse or self._accumulated >= p.threshold
        return self._budget_runs(step, reused)

    def _budget_runs(self, step: int, reused: int) -> bool:
        """Budget mode, with a known change: the threshold the budget implies, and its guards (module docstring)."""
        p = self.policy
        left = p.budget - self._spent
        if left <= 0:
            return False
        if self._sigmas[-1] == 0.0:                  # the run's end is known: steps from this one to it
            steps_left = self._offset + len(self._sigmas) - 1 - step
            if steps_left <= left or (reused >= p.max_reuse and left >= math.ceil(steps_left / (p.max_reuse + 1))):
                return True
        # an exact share of the travel counts (sums of sigma decrements round either way)
        return self._accumulated > 0 and self._accumulated >= self.budget_threshold() * (1 - 1e-9)

    def budget_threshold(self) -> float:
        """Budget mode: the change since the sharer last ran that spends the next forward, the expected change of the
        whole run (its noise travel, 1 in sigma units, times the calibration) / budget."""
        if self.policy.signal == "sigma":
            calibration = 1.0
        elif self._calibration is not None:
            calibration = self._calibration
        else:
            calibration = self._measured / self._travelled if self._travelled > 0 else 1.0
        return calibration / self.policy.budget

    def _travel(self, sigma: float) -> float:
        """Noise level travelled since the previous decision, as a fraction of the cycle's first sigma."""
        previous = self._previous_sigma
        return 0.0 if previous is None else abs(previous - sigma) / self._scale

    @staticmethod
    def _read(signal: Signal) -> Optional[float]:
        if callable(signal):
            signal = signal()
        return None if signal is None else float(signal)

    def report(self) -> RefreshReport:
        """What was decided in the current sampling run."""
        return self._report


# -- signals: host-neutral, one device read per call -------------------------------------------------

def input_change(x: Tensor, previous: Tensor) -> float:
    """Relative L1 change ``mean|x - previous| / mean|previous|`` (one device read)."""
    with torch.no_grad():
        a, b = x.float(), previous.to(device=x.device).float()
        return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


def magnitude_change(norm: float, previous_norm: float) -> float:
    """MagCache-style magnitude ratio as a change: ``|1 - norm / previous_norm|`` (Python floats)."""
    return abs(1.0 - norm / previous_norm) if previous_norm > 0 else math.inf


def kv_change(k: Tensor, previous: Tensor) -> float:
    """Relative L2 change of a K (or V) tensor, e.g. the sharer's first captured layer between two runs
    (FirstBlockCache style; for experiments that calibrate a policy, one device read)."""
    with torch.no_grad():
        a, b = k.float(), previous.to(device=k.device).float()
        return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-12))


class SignalMeter:
    """Measures a policy's signal on the receiver's input, per decision: what a host hands ``decide``.

    ``meter.signal(x)`` returns a callable for :meth:`RefreshTracker.decide` (so the device read happens only
    when the tracker needs a new decision). Kept next to the tracker, across runs: a continued run compares
    its first input with the previous run's last.
    """

    def __init__(self, policy: RefreshPolicy):
        self.policy = policy
        self._previous = None

    def signal(self, x: Tensor) -> Signal:
        if not self.policy.measures:
            return None
        return lambda: self._measure(x)

    def _measure(self, x: Tensor) -> Optional[float]:
        previous = self._previous
        with torch.no_grad():
            if self.policy.signal == "magnitude":
                current = float(torch.linalg.vector_norm(x.float()))
                self._previous = current
                return None if previous is None else magnitude_change(current, previous)
            self._previous = x.detach().clone()
        if previous is None or previous.shape != x.shape:
            return None
        return input_change(x, previous)
