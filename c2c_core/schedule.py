"""When in the denoising run fusion is on, and how strong (when the sharer runs: ``refresh.RefreshPolicy``).

Progress runs from 0.0 to 1.0 through the denoising run. The runtime (``runtime.FusionRun``) passes
the host's own convention: ComfyUI's sigma percent (``runtime.percent_of`` over
``model_sampling.percent_to_sigma``, as ControlNet counts it). Early
steps set layout and motion, late steps texture, so a user may want the sharer only early
(``end=0.4``) or fading out (``cosine_down``). Everything here is Python floats: the per-layer
path must not touch tensors to decide a strength (a GPU read would stall every layer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from .errors import ScheduleError

__all__ = ["FusionSchedule", "RAMPS", "ScheduleError"]

RAMPS = ("constant", "linear_up", "linear_down", "cosine_down")


def _unit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ScheduleError(f"FusionSchedule.{name}={value!r}; expected a number in [0, 1] (fraction of the run).")
    return float(value)


@dataclass(frozen=True)
class FusionSchedule:
    """Fusion window [start, end] (inclusive) and the strength ramp inside it.

    Ramps over the window's local time u in [0, 1]: constant = 1, linear_up = u,
    linear_down = 1 - u, cosine_down = (1 + cos(pi u)) / 2; a zero-width window uses u = 0.
    """

    start: float = 0.0
    end: float = 1.0
    ramp: str = "constant"

    def __post_init__(self) -> None:
        start, end = _unit("start", self.start), _unit("end", self.end)
        if start > end:
            raise ScheduleError(
                f"FusionSchedule window starts at {start} after it ends at {end}; expected start <= end."
            )
        if self.ramp not in RAMPS:
            raise ScheduleError(f"FusionSchedule.ramp={self.ramp!r}; expected one of {RAMPS}.")

    def active(self, progress: float) -> bool:
        return self.start <= _progress(progress) <= self.end

    def strength_at(self, progress: float, base: float) -> float:
        """``base`` shaped by the ramp inside the window, 0.0 outside it."""
        if not self.active(progress):
            return 0.0
        width = self.end - self.start
        u = (progress - self.start) / width if width > 0 else 0.0
        if self.ramp == "constant":
            factor = 1.0
        elif self.ramp == "linear_up":
            factor = u
        elif self.ramp == "linear_down":
            factor = 1.0 - u
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * u))
        return float(base) * factor

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "FusionSchedule":
        unknown = sorted(set(d) - {"start", "end", "ramp"})
        if unknown:
            hint = " (refresh_every moved to c2c_core.refresh.RefreshPolicy(every=k))" if "refresh_every" in unknown else ""
            raise ScheduleError(f"FusionSchedule.from_dict: unknown keys {unknown}{hint}.")
        return cls(**d)


def _progress(progress: Any) -> float:
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0:
        raise ScheduleError(
            f"progress={progress!r}; expected a number in [0, 1] (percent through the run; runtime.percent_of)."
        )
    return float(progress)
