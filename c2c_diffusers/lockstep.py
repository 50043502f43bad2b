"""Bidirectional fusion for diffusers: the sharer's forward advances block by block with the receiver's.

In one-way live mode the sharer runs up to its last needed block before the receiver starts (each
receiver call). Both ways, the sharer must also *receive*: when its block m computes self-attention,
the receiver's K/V of the block the backward map pairs with m must exist. So the sharer's forward runs
as a coroutine (c2c_core/lockstep.py's driver, which ComfyUI's host uses too): it is started lazily, and when the receiver's self-attention tap of a fused
block asks for sharer layer m, the sharer is resumed until its block m has produced K/V, which are
handed over by reference; then it waits. When it is resumed for a later layer, the receiver has offered
its own K/V up to the block it waits in, and a second projector bank (receiver -> sharer, a
``FusionRun`` like every other fusion) fuses them into the sharer's block m before that block goes on.

Semantics (the same as the ComfyUI host): the receiver reads the sharer's K/V of block m *before* the
sharer received; the sharer's later blocks, and so the K/V the receiver reads from them, carry what it
received. The sharer receives in the blocks the forward map reads, except the last one (nothing after
it is read), in every call in which the forward fusion of the receiver layer it reads from is on, at
``backward_strength`` times the backward map's layer factor. The sharer's prediction is never used.

Grad mode is per thread and greenlets share the thread, so each resume of the sharer runs under
``torch.no_grad()`` entered and left in the receiver's frame: the receiver's own grad mode is never
changed by a switch.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from c2c_core import FusionSchedule
from c2c_core.contract import Call, SourceReport
from c2c_core.lockstep import BackwardFusion, Lockstep, available, is_monotone
from c2c_core.runtime import FusionRun

from .errors import BridgeSetupError

__all__ = ["available", "LockstepRun"]


class LockstepRun:
    """Per-run side of a bidirectional ``LiveSharer``: a sharer forward per receiver call, resumed layer by layer.

    ``live`` is the one-way ``LiveSharerRun`` of the same source (grid, RoPE, inputs, the captured-K/V
    store); this class replaces *when* the sharer runs and adds the backward fusion.
    """

    def __init__(self, live, backward, backward_strength: float, banks):
        self.live = live
        self.bridge = live.bridge
        self.rope, self.grid, self.grid_mode = live.rope, live.grid, live.grid_mode
        self.backward = BackwardFusion(backward)
        self.backward_strength = float(backward_strength)
        self.banks = banks
        self.steps = Lockstep(live.captured, live.layers, is_monotone(dict(self.bridge.bundle.layer_map.pairs)),
                              self._resuming, self.backward)
        self._branches = ()

    @property
    def capturing(self) -> bool:
        return self.live.capturing

    # -- per receiver call ----------------------------------------------------------------------------
    def ensure(self, call: Call) -> None:
        """Queue this call's sharer forward (it runs only when the receiver asks for a layer)."""
        self._stop()
        if self.backward.run is None:
            self.backward.run = self._backward_run(call)
        self.backward.begin_call(self.bridge.run.percent)
        self._branches = call.branches
        self.live.captured.clear()
        kwargs = self.live.sharer_kwargs(call)
        self.steps.queue(call.branches, lambda: self.live.transformer(**kwargs))
        self.live.capturing = True

    def _backward_run(self, call: Call) -> FusionRun:
        forward = self.bridge.run
        if self.live.grid != forward.receiver_grid:
            raise BridgeSetupError(
                f"bidirectional fusion needs both models on one latent grid; the sharer's is "
                f"{self.live.grid.shape} tokens (frames, height, width) and the receiver's {forward.receiver_grid.shape}. "
                f"Give both the same num_frames, height and width, or fuse one way.")
        dtype = next(self.live.transformer.parameters()).dtype
        return FusionRun(self.backward.bundle, FusionSchedule(), self.backward_strength,
                         sharer_rope=forward.receiver_rope, receiver_rope=self.live.rope,
                         sharer_grid=forward.receiver_grid, receiver_grid=self.live.grid,
                         rope_alignment=self.bridge.rope_alignment, device=call.latent.device, dtype=dtype,
                         banks=self.banks)

    @contextlib.contextmanager
    def _resuming(self):
        """While the sharer runs: the bridge knows (its taps skip), and no graph is built; entered and left in
        the receiver's frame, so the receiver's own grad mode never changes."""
        self.bridge.in_sharer = True
        try:
            with torch.no_grad():
                yield
        finally:
            self.bridge.in_sharer = False

    def offer(self, layer, k, v) -> None:
        """The receiver's K/V (B, N, H, D) of ``layer``, kept until the last sharer block that reads them."""
        self.backward.offer(layer, k, v, self._branches)

    def kv(self, layer, call: Call):
        """Sharer K/V of ``layer`` for this call: resume the sharer's forward until it produced them."""
        if self.steps.advance(layer, call.branches):
            return self.live.captured.get(layer, call.branches)
        raise BridgeSetupError(f"the sharer's forward never reached self-attention of layer {layer}; expected "
                               f"a Wan-family transformer that runs every block.")

    # -- inside the sharer's coroutine ------------------------------------------------------------------
    def capture(self, layer, k, v):
        return self.steps.capture(layer, k, v)

    # -- end -------------------------------------------------------------------------------------------
    def _stop(self) -> None:
        """End a sharer forward left suspended (later layers switched off, or the receiver raised)."""
        self.live.capturing = False
        self.steps.stop()
        self.backward.offered = {}

    def close(self) -> SourceReport:
        self._stop()
        self.bridge.last_backward_report = self.backward.close()
        return dataclasses.replace(self.live.close(), sharer_forwards=self.steps.forwards)
