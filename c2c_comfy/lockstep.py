"""Lockstep streaming: the sharer's forward advances block by block with the receiver's.

Buffered live mode (``LiveSharerRun``) runs the whole sharer forward first and keeps the K/V of every
layer the projector reads until the receiver has used them: at real scale that is tens of GB. Here
the sharer's stock forward runs as a coroutine (a greenlet in the sampling thread): each sharer model
call of the step is started lazily, and when the receiver's self-attention hook of a fused layer asks
for sharer layer m, the sharer's forward is resumed until its block m has produced K/V, which are
handed over by reference; then it waits. K/V of layers the receiver is done with are dropped before
the sharer moves on, so at most ~1–2 sharer layers are alive whatever the number of fused layers.

Both forwards stay ComfyUI's own (no copied ``forward_orig``): the receiver's runs as usual, and the
sharer's runs through ``calc_cond_batch`` and its APPLY_MODEL wrappers; only the *time* at which
each sharer model call executes changes, so the sharer sees the same inputs and produces the same
K/V as in buffered mode, and the bridged output is bit-identical.

A layer map that reads sharer layers out of order (a custom map) cannot stream: such runs keep the
call's captured layers until the end of the call, like buffered mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from greenlet import greenlet, getcurrent

import comfy.patcher_extension

from . import compat
from .live import LiveSharerRun, _SharerDone

_DEFER_KEY = "dit_cache_bridge.lockstep"


@dataclass(eq=False)
class _Forward:
    """One deferred sharer model call: the chunk kinds it covers and the coroutine that runs it."""
    kinds: tuple
    coroutine: greenlet


def is_monotone(pairs: dict) -> bool:
    """True when the receiver's fused layers, in block order, read non-decreasing sharer layers."""
    sharer = [pairs[layer] for layer in sorted(pairs)]
    return all(a <= b for a, b in zip(sharer, sharer[1:]))


class LockstepSharerRun(LiveSharerRun):
    """A ``LiveSharerRun`` whose sharer forwards are streamed layer by layer into the receiver's."""

    def __init__(self, source, sharer_patcher, capture_layers, noise, latent_image, denoise_mask, seed, device,
                 layer_pairs: dict):
        super().__init__(source, sharer_patcher, capture_layers, noise, latent_image, denoise_mask, seed, device)
        self.streams = is_monotone(layer_pairs)
        self._pending: list[_Forward] = []
        self._running: _Forward | None = None
        wrappers = self.model_options["transformer_options"].setdefault("wrappers", {})
        wrappers.setdefault(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {})[_DEFER_KEY] = [self._defer]

    # -- per receiver model call ------------------------------------------------------------------
    def ensure(self, x, t, kinds, step, window):
        """Queue the sharer's model calls for this receiver call; none of them runs yet."""
        self._stop_pending()
        super().ensure(x, t, kinds, step, window)

    def _defer(self, executor, x, t, *args, **kwargs):
        """Sharer APPLY_MODEL wrapper (innermost): record the call as a coroutine, return a dummy output.

        The sharer's prediction is never used (only its K/V), so ``calc_cond_batch`` may go on with zeros.
        """
        transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        kinds = tuple(self._call_kinds[i] for i in transformer_options["cond_or_uncond"])

        def run():
            try:
                executor(x, t, *args, **kwargs)
            except _SharerDone:
                pass
        self._pending.append(_Forward(kinds, greenlet(run)))
        return torch.zeros_like(x)

    def kv(self, layer, kinds):
        """Sharer K/V of ``layer`` for ``kinds``: resume the sharer's forwards until they produced it."""
        if self.streams:
            for old in [m for m in self.captured.batches if m < layer]:
                del self.captured.batches[old]          # the receiver is past every layer that read them
        for kind in dict.fromkeys(kinds):
            forward = next((f for f in self._pending if kind in f.kinds), None)
            if forward is None:
                raise KeyError((layer, kind))
            while not self._has(layer, kind) and not forward.coroutine.dead:
                self._resume(forward)
        return self.captured.get(layer, kinds)

    def _has(self, layer, kind) -> bool:
        return any(kind in have for _, _, have in self.captured.batches.get(layer, ()))

    def _resume(self, forward: _Forward) -> None:
        model = self.patcher.model
        receiver_patcher = compat.current_patcher(model)
        compat.set_current_patcher(model, self.patcher)
        if not forward.coroutine:                       # not started yet: one more sharer forward
            self.forwards += 1
        forward.coroutine.parent = getcurrent()
        self._running = forward
        try:
            forward.coroutine.switch()
        finally:
            self._running = None
            compat.set_current_patcher(model, receiver_patcher)

    # -- inside the sharer's coroutine ------------------------------------------------------------
    def capture(self, layer, q, k, v, heads, transformer_options):
        forward = self._running
        if forward is None or layer not in self.capture_layers:
            return k, v
        self.captured.put(layer, k, v, forward.kinds)
        if layer == self.last_layer:
            raise _SharerDone()                         # nothing later is read: end this sharer forward
        forward.coroutine.parent.switch()               # hand the layer over; resumed when more is needed
        return k, v

    # -- end ----------------------------------------------------------------------------------------
    def _stop_pending(self):
        """End sharer forwards left suspended (later layers switched off, or the receiver raised)."""
        pending, self._pending = self._pending, []
        for forward in pending:
            if forward.coroutine and not forward.coroutine.dead:
                forward.coroutine.parent = getcurrent()
                forward.coroutine.throw()               # GreenletExit: unwinds the sharer's frames

    def close(self):
        self._stop_pending()
        super().close()


def open_lockstep_run(source, bridge_run, sharer_patcher, capture_layers, noise, latent_image, denoise_mask, seed,
                      device):
    return LockstepSharerRun(source, sharer_patcher, capture_layers, noise, latent_image, denoise_mask, seed, device,
                             dict(bridge_run.bridge.bundle.layer_map.pairs))

