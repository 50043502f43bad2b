"""Bidirectional fusion for diffusers: the sharer's forward advances block by block with the receiver's.

In one-way live mode the sharer runs up to its last needed block before the receiver starts (each
receiver call). Both ways, the sharer must also *receive*: when its block m computes self-attention,
the receiver's K/V of the block the backward map pairs with m must exist. So the sharer's forward runs
as a coroutine (a greenlet in the calling thread; ComfyUI's host does the same in
``c2c_comfy/lockstep.py``): it is started lazily, and when the receiver's self-attention tap of a fused
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

import torch

from c2c_core import FusionSchedule
from c2c_core.runtime import FusionRun

from .errors import BridgeSetupError

try:
    from greenlet import getcurrent, greenlet
except ImportError:        # an optional extra: one-way fusion works without it
    greenlet = getcurrent = None

__all__ = ["available", "LockstepRun"]


def available() -> bool:
    """True when greenlet is installed (bidirectional fusion needs it)."""
    return greenlet is not None


def is_monotone(pairs: dict) -> bool:
    """True when the receiver's fused layers, in block order, read non-decreasing sharer layers."""
    sharer = [pairs[layer] for layer in sorted(pairs)]
    return all(a <= b for a, b in zip(sharer, sharer[1:]))


class LockstepRun:
    """Per-run side of a bidirectional ``LiveSharer``: a sharer forward per receiver call, resumed layer by layer.

    ``live`` is the one-way ``_LiveRun`` of the same source (grid, RoPE, inputs, capture bookkeeping);
    this class replaces *when* the sharer runs and adds the backward fusion.
    """

    receives = True         # Bridge._fuse offers the receiver's K/V before asking for the sharer's

    def __init__(self, live, backward, backward_strength: float, banks):
        self.live = live
        self.bridge = live.bridge
        self.backward = backward
        self.backward_strength = float(backward_strength)
        self.banks = banks
        self.streams = is_monotone(dict(self.bridge.bundle.layer_map.pairs))
        self.last_reader: dict = {}                   # receiver layer -> the last sharer layer reading it
        for sharer_layer, receiver_layer in sorted(backward.layer_map.pairs.items()):
            self.last_reader[receiver_layer] = sharer_layer
        self.offered: dict = {}                       # receiver layer -> (k, v) of this call
        self.run: FusionRun | None = None             # receiver -> sharer fusion, built at the first call
        self._forward = None
        self._into: dict = {}

    # grid / RoPE / bookkeeping come from the one-way run
    @property
    def grid(self):
        return self.live.grid

    @property
    def rope(self):
        return self.live.rope

    @property
    def grid_mode(self):
        return self.live.grid_mode

    @property
    def capturing(self) -> bool:
        return self.live.capturing

    # -- per receiver call ----------------------------------------------------------------------------
    def ensure(self, call) -> None:
        """Queue this call's sharer forward (it runs only when the receiver asks for a layer)."""
        self._stop()
        if self.run is None:
            self.run = self._backward_run(call)
        self.run.begin_call(self.bridge.run.percent)
        self.offered = {}
        self.live.captured = {call.branch: {}}
        self._into = self.live.captured[call.branch]
        kwargs = self.live.sharer_kwargs(call)

        def forward():
            from .live import _SharerDone
            try:
                self.live.transformer(**kwargs)
            except _SharerDone:
                pass
        self._forward = greenlet(forward)
        self.live.capturing = True

    def _backward_run(self, call) -> FusionRun:
        forward = self.bridge.run
        if self.live.grid != forward.receiver_grid:
            raise BridgeSetupError(
                f"bidirectional fusion needs both models on one latent grid; the sharer's is "
                f"{self.live.grid.shape} tokens (frames, height, width) and the receiver's {forward.receiver_grid.shape}. "
                f"Give both the same num_frames, height and width, or fuse one way.")
        dtype = next(self.live.transformer.parameters()).dtype
        return FusionRun(self.backward, FusionSchedule(), self.backward_strength,
                         sharer_rope=forward.receiver_rope, receiver_rope=self.live.rope,
                         sharer_grid=forward.receiver_grid, receiver_grid=self.live.grid,
                         rope_alignment=self.bridge.rope_alignment, device=call.latent.device, dtype=dtype,
                         banks=self.banks)

    def receive(self, layer, k, v) -> None:
        """The receiver's K/V (B, N, H, D) of ``layer``, kept until the last sharer block that reads them."""
        if layer in self.last_reader:
            self.offered[layer] = (k, v)

    def kv(self, layer, call):
        """Sharer K/V of ``layer`` for this call: resume the sharer's forward until it produced them."""
        if self.streams:
            for old in [m for m in self._into if m < layer]:
                del self._into[old]                    # the receiver is past every layer that read them
        while layer not in self._into and self._forward is not None and not self._forward.dead:
            self._resume()
        if layer not in self._into:
            raise BridgeSetupError(f"the sharer's forward never reached self-attention of layer {layer}; expected "
                                   f"a Wan-family transformer that runs every block.")
        return self._into[layer]

    def _resume(self) -> None:
        forward = self._forward
        if not forward:                                # not started yet: one more sharer forward
            self.live.forwards += 1
        forward.parent = getcurrent()
        self.bridge.in_sharer = True
        try:
            with torch.no_grad():                      # entered and left here: the receiver's grad mode stays
                forward.switch()
        finally:
            self.bridge.in_sharer = False

    # -- inside the sharer's coroutine ------------------------------------------------------------------
    def capture(self, layer, k, v):
        from .live import _SharerDone
        if layer not in self.live.layers or self._forward is None:
            return k, v
        self._into[layer] = (k, v)
        held = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self._into.values())
        self.live.peak_bytes = max(self.live.peak_bytes, held)
        if layer == self.live.layers[-1]:
            raise _SharerDone()                        # nothing later is read: end this sharer forward
        getcurrent().parent.switch()                   # hand the layer over; resumed when more is needed
        return self._receive_into(layer, k, v)

    def _receive_into(self, layer, k, v):
        """Sharer block ``layer``'s k, v with the receiver's offered K/V fused in (backward bank)."""
        run = self.run
        if layer not in run.layer_map.pairs or run.strength(layer) == 0.0:
            return k, v
        source = run.sharer_layer(layer)
        offered = self.offered.get(source)
        if offered is None:                            # the forward fusion of that receiver layer is off
            return k, v
        if self.last_reader[source] == layer:
            del self.offered[source]
        return run.fuse(layer, k, v, *offered)

    # -- end -------------------------------------------------------------------------------------------
    def _stop(self) -> None:
        """End a sharer forward left suspended (later layers switched off, or the receiver raised)."""
        forward, self._forward = self._forward, None
        self.live.capturing = False
        if forward and not forward.dead:               # started and suspended: unwind its frames
            forward.parent = getcurrent()
            forward.throw()
        self.offered = {}

    def close(self):
        self._stop()
        report = self.run.close() if self.run is not None else None
        self.bridge.last_backward_report = report
        return self.live.close()
