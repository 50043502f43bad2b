"""Lockstep in ComfyUI: the sharer's model calls are deferred and stepped by c2c_core's lockstep driver.

Buffered live mode (``LiveSharerRun``) runs the whole sharer forward first and keeps the K/V of every
layer the projector reads until the receiver has used them: at real scale that is tens of GB. Here
each sharer model call of the step is recorded as a coroutine instead of run (an APPLY_MODEL wrapper,
the outermost, on the sharer's run options) and ``c2c_core.lockstep.Lockstep`` resumes it block by
block as the receiver's fused layers ask for sharer layers, so at most ~1–2 sharer layers are alive.

Both forwards stay ComfyUI's own (no copied ``forward_orig``): the receiver's runs as usual, and the
sharer's runs through ``calc_cond_batch``'s batching and all its wrappers (the deferral is the outermost
APPLY_MODEL wrapper, so a compiled sharer runs compiled inside the coroutine); only the *time* at
which each sharer model call executes changes, so the sharer sees the same inputs and produces the
same K/V as in buffered mode, and the bridged output is bit-identical. While the sharer runs, its
model runs under the sharer's patcher. Bidirectional fusion (``c2c_core.lockstep.BackwardFusion``)
fuses the receiver's K/V into the sharer's blocks through a second ``FusionRun`` built here, on the
backward bank ComfyUI loaded with the run, in the sharer's compute dtype.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from c2c_core import FusionSchedule
from c2c_core.contract import Call, SourceReport
from c2c_core.lockstep import BackwardFusion, Lockstep, available, is_monotone
from c2c_core.runtime import FusionRun

from . import compat
from .errors import BridgeInputError

__all__ = ["LockstepRun", "available"]

_DEFER_KEY = "dit_cache_bridge.lockstep"

if not available():
    logging.getLogger("dit_cache_bridge").warning(
        "DiT Cache Bridge: the Python package greenlet is missing, so live mode keeps every fused layer's sharer "
        "K/V per model call (more memory) and bidirectional fusion is off; install the pack's requirements.txt")


class LockstepRun:
    """A ``LiveSharerRun`` (``live``) whose sharer model calls are streamed layer by layer into the receiver's.

    ``bridge_run`` is the receiver's run (its grid, RoPE, fusion percent); the source's ``backward`` bundle,
    when set, makes the sharer receive the receiver's K/V.
    """

    def __init__(self, live, bridge_run):
        self.live = live
        self.bridge_run = bridge_run
        self.rope, self.grid, self.grid_mode = live.rope, live.grid, live.grid_mode
        source = live.source
        self.backward = BackwardFusion(source.backward) if source.backward is not None else None
        if self.backward is not None and live.grid != bridge_run.grid:
            raise BridgeInputError(
                source.node, "backward", f"a sharer on a {live.grid.shape} token grid",
                f"the receiver's {bridge_run.grid.shape}", "bidirectional fusion needs both models on the same "
                "latent grid: give the sharer's conditioning the receiver's latent size, or fuse one way")
        self.steps = Lockstep(live.captured, live.capture_layers, is_monotone(dict(bridge_run.bridge.bundle.layer_map.pairs)),
                              self._resuming, self.backward)
        self._branches = ()
        compat.wrap_sharer_calls(live.model_options, _DEFER_KEY, self._defer)

    # -- per receiver model call ------------------------------------------------------------------
    def ensure(self, call: Call) -> None:
        """Queue the sharer's model calls for this receiver call; none of them runs yet."""
        self.steps.stop()
        self._branches = call.branches
        if self.backward is not None:
            self._begin_backward()
        self.live.ensure(call)

    def _defer(self, executor, x, t, *args, **kwargs):
        """Sharer APPLY_MODEL wrapper (outermost): queue the call as a coroutine, return a dummy output.

        The sharer's prediction is never used (only its K/V), so ``calc_cond_batch`` may go on with zeros. Being
        outermost, the queued call runs the sharer's own wrappers too (a TorchCompileModel sharer runs compiled).
        """
        transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        branches = tuple(self.live._call_branches[i] for i in transformer_options["cond_or_uncond"])
        self.steps.queue(branches, lambda: executor(x, t, *args, **kwargs))
        return torch.zeros_like(x)

    def _begin_backward(self):
        """The backward FusionRun is built at the first call, once ComfyUI loaded the models and the bank."""
        backward, run, live = self.backward, self.bridge_run, self.live
        if backward.run is None:
            source = live.source
            backward.run = FusionRun(backward.bundle, FusionSchedule(), source.backward_strength,
                                     sharer_rope=run.receiver_rope, receiver_rope=live.rope, sharer_grid=run.grid,
                                     receiver_grid=live.grid, rope_alignment=source.rope_alignment,
                                     grid_mode=live.grid_mode, device=run.device,
                                     dtype=compat.compute_dtype(live.patcher),
                                     banks=source.backward_banks.get(run.bridge.key), stats=False)
        backward.begin_call(run.fusion.percent)

    def _resuming(self):
        return compat.running_under(self.live.patcher.model, self.live.patcher)

    def offer(self, layer, k, v) -> None:
        """Bidirectional: the receiver's K/V (B, N, H*D) of ``layer`` for the sharer's blocks that read it."""
        if self.backward is not None:
            self.backward.offer(layer, k, v, self._branches)

    def kv(self, layer, call: Call):
        """Sharer K/V of ``layer`` for the call's branches: resume the sharer's forwards until they produced it."""
        return self.steps.kv(layer, call.branches)

    def capture(self, layer, k, v):
        """Inside the sharer's coroutine: hand the layer over, wait, and take in the receiver's K/V (bidirectional)."""
        return self.steps.capture(layer, k, v)

    def handover(self):
        """Lockstep runs the sharer in every call: nothing is reused by a run that continues this one."""
        return None

    def resume(self, captured) -> None:
        """Nothing to continue from (see handover)."""

    def close(self) -> SourceReport:
        self.steps.stop()
        if self.backward is not None:
            self.backward.close()
        return dataclasses.replace(self.live.close(), sharer_forwards=self.steps.forwards)
