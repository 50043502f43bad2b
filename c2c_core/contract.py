"""The host contract: what a host's bridge hands its K/V source, and what the source hands back.

Both hosts (c2c_comfy, c2c_diffusers) fuse through :class:`c2c_core.runtime.FusionRun` and get the
sharer's K/V from a source run that implements :class:`KVSourceRun`, so a reader who knows one host's
``bridge.py`` / ``live.py`` / ``recorded.py`` knows the other's. Per sampling run::

    run = source.open_run(...)                 # host-specific arguments
    run.ensure(call)                           # per model call that fuses: make the sharer's K/V available
    run.offer(layer, k, v)                     # the receiver's own K/V of a fused layer (bidirectional reads them)
    sk, sv = run.kv(sharer_layer, call)        # the call's branches, in the call's chunk order
    k, v = run.capture(layer, k, v)            # the sharer's attention hook -> the source (live sources)
    report = run.close()                       # SourceReport, fed to FusionRun.close

CFG branches have one name in both hosts, ``branch``: :data:`POSITIVE`, :data:`NEGATIVE` or :data:`MIDDLE`
(which of the sharer's conditionings feeds a chunk; MIDDLE only for a live sharer given its own middle
conditioning, for ComfyUI's DualCFGGuider). Recordings store positive/negative as 0/1 on disk and never a middle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Protocol, runtime_checkable

from torch import Tensor

from .align import RopeSpec
from .signature import TokenGrid

__all__ = ["POSITIVE", "NEGATIVE", "MIDDLE", "BRANCHES", "BRANCH_NAMES", "DIRECTIONS", "SIGMA_RTOL", "same_sigma",
           "Call", "SourceReport", "KVSourceRun", "SharerDone"]

POSITIVE, NEGATIVE, MIDDLE = 0, 1, 2
BRANCHES = (POSITIVE, NEGATIVE, MIDDLE)
BRANCH_NAMES = ("positive", "negative", "middle")    # BRANCH_NAMES[branch], for messages and conditioning inputs
DIRECTIONS = ("sharer_to_receiver", "bidirectional")

SIGMA_RTOL = 1e-4      # recorded and replayed sigmas agree to this (float32 schedules, JSON round trip)


def same_sigma(a: float, b: float) -> bool:
    """True when two sigmas are one noise level (a recording's and a replaying run's)."""
    return abs(a - b) <= SIGMA_RTOL * max(1.0, abs(a))


@dataclass(frozen=True, eq=False)
class Call:
    """One receiver model call that fuses, as the K/V source sees it (host-neutral).

    latent, timestep: the call's input batch (all its CFG chunks) as the host's model takes them.
    branches: the branch of each chunk, in the batch's order. step: the sampling step; evaluation: the
    model evaluation (a sampler may evaluate more than once per step); sigma: its noise level.
    window: the K/V generation (``c2c_core.refresh.Refresh.window``, decided by the host's ``RefreshTracker``):
    sharer K/V made for one window serve every call with it; it changes exactly when the sharer must run.
    """

    latent: Tensor
    timestep: Tensor
    branches: tuple
    step: int
    sigma: float
    window: Hashable
    evaluation: int = 0


@dataclass(frozen=True)
class SourceReport:
    """What a K/V source did in one run: sharer forwards, most sharer K/V bytes held at once, bytes copied."""

    sharer_forwards: int = 0
    peak_kv_bytes: int = 0
    copied_kv_bytes: int = 0


class SharerDone(Exception):
    """Raised inside the sharer once its last needed layer is captured: later blocks are skipped."""


@runtime_checkable
class KVSourceRun(Protocol):
    """One sampling run of a K/V source (live sharer, lockstep sharer, replayed recording).

    ``rope``, ``grid``, ``grid_mode``: where the sharer's tokens sit and how to resample them onto the
    receiver's grid (FusionRun's sharer side). K/V are (B, N, H*D) or (B, N, H, D), as the host's
    attention hands them over; :meth:`c2c_core.runtime.FusionRun.fuse_tokens` takes either.
    """

    rope: RopeSpec
    grid: TokenGrid
    grid_mode: str

    def ensure(self, call: Call) -> None:
        """Make the sharer's K/V for ``call`` available (run the sharer, queue it, or pick a recording)."""

    def offer(self, layer: int, k: Tensor, v: Tensor) -> None:
        """The receiver's own K/V of fused ``layer``, before fusion; a source that also receives keeps them."""

    def kv(self, layer: int, call: Call) -> tuple[Tensor, Tensor]:
        """Sharer K/V of sharer ``layer`` for the call's branches, in the call's chunk order."""

    def capture(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The sharer's attention hook: keep ``k, v`` of ``layer``; returns the K/V its attention uses."""

    def close(self) -> SourceReport:
        """End the run, release what it holds, and say what it did."""
