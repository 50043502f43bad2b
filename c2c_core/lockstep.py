"""Lockstep: the sharer's forward advances block by block with the receiver's (both hosts use this driver).

The sharer's stock forward runs as a coroutine (a greenlet in the sampling thread). It is queued per
receiver call and started lazily: when the receiver's self-attention hook of a fused layer asks for
sharer layer m (:meth:`Lockstep.kv`), the sharer is resumed until its block m has produced K/V, which
are handed over by reference (:meth:`Lockstep.capture`); then it waits. With a layer map that reads
sharer layers in order, K/V of layers the receiver is done with are dropped before the sharer moves
on, so at most ~1–2 sharer layers are alive however many layers are fused.

Bidirectional fusion (:class:`BackwardFusion`) is only possible this way: when the sharer's block m
runs, the receiver waits inside its block l with its own K/V computed, so a second FusionRun
(receiver -> sharer) fuses them into the sharer's block m. The receiver reads the sharer's K/V of
block m *before* that fusion; the sharer's later blocks, and so what the receiver reads from them,
carry what the sharer received.

What stays in each host (c2c_comfy/lockstep.py, c2c_diffusers/lockstep.py): how a sharer forward is
queued, and what must hold while the sharer runs (``resuming``: ComfyUI's current patcher, diffusers'
grad mode and its "the sharer is running" flag).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
from torch import Tensor

from .capture import CapturedKV
from .contract import SharerDone

try:
    from greenlet import getcurrent, greenlet
except ImportError:     # a dependency; without it live mode stays buffered and bidirectional fusion is off
    greenlet = getcurrent = None

__all__ = ["available", "is_monotone", "Lockstep", "BackwardFusion"]


def available() -> bool:
    """True when greenlet is installed: lockstep streaming and bidirectional fusion need it."""
    return greenlet is not None


def is_monotone(pairs: dict) -> bool:
    """True when the receiver's fused layers, in block order, read non-decreasing sharer layers."""
    sharer = [pairs[layer] for layer in sorted(pairs)]
    return all(a <= b for a, b in zip(sharer, sharer[1:]))


@dataclass(eq=False)
class _Forward:
    """One queued sharer forward: the branches its batch covers and the coroutine that runs it."""
    branches: tuple
    coroutine: object


class Lockstep:
    """The sharer forwards of one receiver call, resumed from the receiver's hooks until they produced a layer.

    captured: the store the sharer's K/V go to. layers: the sharer layers captured (the last one ends a
    forward). streams: drop layers below the one asked for (a map that reads sharer layers in order).
    resuming: a context manager factory entered around every switch into the sharer (host state).
    backward: fuses the receiver's offered K/V into each captured sharer layer (bidirectional), or None.
    """

    def __init__(self, captured: CapturedKV, layers, streams: bool,
                 resuming: Callable[[], ContextManager] = contextlib.nullcontext,
                 backward: Optional["BackwardFusion"] = None):
        self.captured = captured
        self.layers = sorted(layers)
        self.last_layer = self.layers[-1] if self.layers else -1
        self.streams = streams
        self.resuming = resuming
        self.backward = backward
        self.forwards = 0
        self._pending: list[_Forward] = []
        self._running: Optional[_Forward] = None

    def queue(self, branches, forward: Callable[[], object]) -> None:
        """Queue one sharer forward (``forward()`` runs the sharer's model call); it starts when a layer is asked for."""
        def run():
            try:
                forward()
            except SharerDone:
                pass
        self._pending.append(_Forward(tuple(branches), greenlet(run)))

    def advance(self, layer: int, branches) -> bool:
        """Resume the sharer's forwards until they produced ``layer`` for ``branches``; False when they never will."""
        if self.streams:
            self.captured.drop_below(layer)          # the receiver is past every layer that read them
        for branch in dict.fromkeys(branches):
            forward = next((f for f in self._pending if branch in f.branches), None)
            if forward is None:
                return False
            while not self.captured.has(layer, branch) and not forward.coroutine.dead:
                self._resume(forward)
            if not self.captured.has(layer, branch):
                return False
        return True

    def kv(self, layer: int, branches) -> tuple[Tensor, Tensor]:
        """Sharer K/V of ``layer`` for ``branches`` (:meth:`advance`, then the store's); KeyError when never produced."""
        if not self.advance(layer, branches):
            raise KeyError((layer, tuple(branches)))
        return self.captured.get(layer, branches)

    def _resume(self, forward: _Forward) -> None:
        if not forward.coroutine:                    # not started yet: one more sharer forward
            self.forwards += 1
        forward.coroutine.parent = getcurrent()
        self._running = forward
        try:
            with self.resuming():
                forward.coroutine.switch()
        finally:
            self._running = None

    # -- inside the sharer's coroutine ------------------------------------------------------------
    def capture(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The sharer's attention hook: hand ``layer``'s K/V over and wait; returns what its attention uses."""
        forward = self._running
        if forward is None or layer not in self.layers:
            return k, v
        self.captured.put(layer, k, v, forward.branches)
        if layer == self.last_layer:
            raise SharerDone()                       # nothing later is read: end this sharer forward
        forward.coroutine.parent.switch()            # hand the layer over; resumed when more is needed
        if self.backward is not None:
            return self.backward.fuse(layer, k, v, forward.branches)
        return k, v

    # -- end ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        """End sharer forwards left suspended (later layers switched off, or the receiver raised)."""
        pending, self._pending = self._pending, []
        for forward in pending:
            if forward.coroutine and not forward.coroutine.dead:
                forward.coroutine.parent = getcurrent()
                forward.coroutine.throw()            # GreenletExit: unwinds the sharer's frames


class BackwardFusion:
    """Receiver -> sharer fusion of one run: the receiver's offered K/V, fused into the sharer's blocks.

    ``bundle`` is the backward projector (the receiver its sharer side, the sharer its receiver side);
    its layer map pairs each sharer layer with the receiver layer it reads. The host sets ``run`` (a
    FusionRun of that bundle, built once the models are loaded) before the first :meth:`begin_call`.
    """

    def __init__(self, bundle):
        self.bundle = bundle
        self.last_reader: dict = {}                  # receiver layer -> the last sharer layer reading it
        for sharer_layer, receiver_layer in sorted(bundle.layer_map.pairs.items()):
            self.last_reader[receiver_layer] = sharer_layer
        self.offered: dict = {}                      # receiver layer -> (k, v, branches) of this call
        self.run = None
        self.report = None

    def begin_call(self, percent: float) -> None:
        """A receiver call whose forward fusion is on: nothing offered yet, this call's strengths set."""
        self.offered = {}
        self.run.begin_call(percent)

    def offer(self, layer: int, k: Tensor, v: Tensor, branches) -> None:
        """Keep the receiver's K/V of ``layer`` until the last sharer block that reads it has used them."""
        if layer in self.last_reader:
            self.offered[layer] = (k, v, tuple(branches))

    def fuse(self, layer: int, k: Tensor, v: Tensor, branches) -> tuple[Tensor, Tensor]:
        """Sharer block ``layer``'s k, v for chunk ``branches`` -> with the receiver's offered K/V fused in."""
        run = self.run
        if run is None or layer not in run.layer_map.pairs or run.strength(layer) == 0.0:
            return k, v
        source = run.sharer_layer(layer)
        if source not in self.offered:               # the forward fusion of that receiver layer is off
            return k, v
        rk, rv, have = self.offered[source]
        if self.last_reader[source] == layer:
            del self.offered[source]
        index = [have.index(branch) for branch in branches]
        if index != list(range(len(have))):          # the sharer's batch holds the branches in another order
            rows = rk.shape[0] // len(have)
            rk = torch.cat([rk[i * rows:(i + 1) * rows] for i in index])
            rv = torch.cat([rv[i * rows:(i + 1) * rows] for i in index])
        return run.fuse_tokens(layer, k, v, rk, rv)

    def close(self):
        """The backward run's report (non-finite fused layers), or None when it never ran."""
        self.offered = {}
        if self.run is not None:
            self.report = self.run.close()
        return self.report
