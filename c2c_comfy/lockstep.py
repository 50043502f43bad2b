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

Bidirectional fusion (``BidirectionalSharer``) is only possible in lockstep: when the sharer's block m
runs, the receiver waits inside its block l with its own K/V computed, so a second projector bank
(receiver -> sharer) can fuse them into the sharer's self-attention
(through a second ``FusionRun``, as the forward direction fuses). The receiver is handed the
sharer's own K/V of block m (before that fusion); the sharer's *later* blocks, and so the K/V the
receiver reads from them, carry what the sharer received. The sharer's prediction is discarded, so
bidirectional fusion changes the output only through those later sharer layers.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import torch
try:
    from greenlet import greenlet, getcurrent
except ImportError:     # requirements.txt installs it; without it live mode stays buffered (see available())
    greenlet = getcurrent = None
    logging.getLogger("dit_cache_bridge").warning(
        "DiT Cache Bridge: the Python package greenlet is missing, so live mode keeps every fused layer's sharer "
        "K/V per model call (more memory) and bidirectional fusion is off; install the pack's requirements.txt")

import comfy.patcher_extension

from ..c2c_core import FusionSchedule
from ..c2c_core.runtime import BankCache, FusionRun
from . import compat
from .errors import BridgeInputError
from .live import LiveSharer, LiveSharerRun, _SharerDone

_DEFER_KEY = "dit_cache_bridge.lockstep"


@dataclass(eq=False)
class _Forward:
    """One deferred sharer model call: the chunk kinds it covers and the coroutine that runs it."""
    kinds: tuple
    coroutine: greenlet


def available() -> bool:
    """True when greenlet is installed: lockstep streaming and bidirectional fusion need it."""
    return greenlet is not None


def is_monotone(pairs: dict) -> bool:
    """True when the receiver's fused layers, in block order, read non-decreasing sharer layers."""
    sharer = [pairs[layer] for layer in sorted(pairs)]
    return all(a <= b for a, b in zip(sharer, sharer[1:]))


class LockstepSharerRun(LiveSharerRun):
    """A ``LiveSharerRun`` whose sharer forwards are streamed layer by layer into the receiver's."""

    def __init__(self, source, sharer_patcher, capture_layers, noise, latent_image, denoise_mask, seed, device,
                 layer_pairs: dict, backward=None):
        super().__init__(source, sharer_patcher, capture_layers, noise, latent_image, denoise_mask, seed, device)
        self.streams = is_monotone(layer_pairs)
        self.backward: _BackwardRun | None = backward
        self.receives = backward is not None      # the bridge offers the receiver's K/V before asking for the sharer's
        self._pending: list[_Forward] = []
        self._running: _Forward | None = None
        self._receiver_kinds = ()
        wrappers = self.model_options["transformer_options"].setdefault("wrappers", {})
        wrappers.setdefault(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {})[_DEFER_KEY] = [self._defer]

    # -- per receiver model call ------------------------------------------------------------------
    def ensure(self, x, t, kinds, step, window):
        """Queue the sharer's model calls for this receiver call; none of them runs yet."""
        self._stop_pending()
        self._receiver_kinds = tuple(kinds)
        if self.backward is not None:
            self.backward.begin_call()
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

    def receive(self, layer, k, v):
        """Bidirectional: the receiver's K/V (B, N, H*D) of ``layer`` for the sharer's blocks that read it."""
        self.backward.offer(layer, k, v, self._receiver_kinds)

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
        if self.backward is not None:
            return self.backward.fuse(layer, k, v, forward.kinds)
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
        if self.backward is not None:
            self.backward.close()
        super().close()


def open_lockstep_run(source, bridge_run, sharer_patcher, capture_layers, noise, latent_image, denoise_mask, seed,
                      device, backward=None):
    return LockstepSharerRun(source, sharer_patcher, capture_layers, noise, latent_image, denoise_mask, seed, device,
                             dict(bridge_run.bridge.bundle.layer_map.pairs), backward)


@dataclass(eq=False)
class BidirectionalSharer(LiveSharer):
    """A lockstep sharer that also receives: ``backward`` projects the receiver's K/V into the sharer's.

    ``backward`` is a projector bundle from the receiver (its sharer side) to this sharer (its receiver
    side), e.g. Create C2C Projector with the two models swapped; its layer map pairs each sharer layer
    with the receiver layer it reads. It fuses at ``backward_strength`` in every model call in which the
    forward fusion of that receiver layer is on (the forward window and per-layer strengths gate it).
    """
    backward: object = None
    backward_strength: float = 1.0
    backward_banks: dict = dataclasses.field(default_factory=dict, repr=False)   # bridge key -> BankCache

    def attach(self, bridge, patched, receiver):
        """As one way, plus the backward bank as a model ComfyUI loads with the run (like the forward bank)."""
        super().attach(bridge, patched, receiver)
        model = bridge.sharer_patcher.model
        bank = copy.deepcopy(self.backward.bank).to(dtype=model.manual_cast_dtype or model.get_dtype()).eval()
        patched.set_additional_models(f"{bridge.key}.backward_projector",
                                      [compat.module_patcher(bank, receiver.load_device, receiver.offload_device)])
        self.backward_banks[bridge.key] = BankCache(bank)

    def open_run(self, run, guider, noise, latent_image, denoise_mask, seed):
        if self.refresh_every != 1:
            raise BridgeInputError(self.node, "refresh_every", f"{self.refresh_every} with bidirectional fusion",
                                   "1", "bidirectional fusion runs the two models block by block in every call; "
                                   "set refresh_every to 1 or fuse one way")
        backward = _BackwardRun(self, run)
        sharer_run = open_lockstep_run(self, run, run.bridge.sharer_patcher, run.bridge.sharer_layers,
                                       noise.to(run.device), latent_image.to(run.device), denoise_mask, seed,
                                       run.device, backward)
        backward.attach(sharer_run)
        return sharer_run


class _BackwardRun:
    """Per-run receiver -> sharer fusion: the offered receiver K/V, fused into the sharer's by a ``FusionRun``.

    The run is the forward's mirror (receiver RoPE/grid as its sharer side, the sharer's as its receiver
    side, the source's rope alignment), on the run's device in the sharer's compute dtype with the bank
    ComfyUI loaded; its schedule is the full window, so the forward fusion gates it through ``offer``.
    """

    def __init__(self, source: BidirectionalSharer, bridge_run):
        self.source = source
        self.node = source.node
        self.bridge_run = bridge_run
        self.bundle = source.backward
        self.last_reader = {}                             # receiver layer -> the last sharer layer reading it
        for sharer_layer, receiver_layer in sorted(self.bundle.layer_map.pairs.items()):
            self.last_reader[receiver_layer] = sharer_layer
        self.offered: dict = {}
        self.sharer_run: LockstepSharerRun | None = None
        self.run: FusionRun | None = None                # built at the first call, after ComfyUI loaded the models
        self.report = None

    def attach(self, sharer_run: LockstepSharerRun):
        receiver_grid = self.bridge_run.grid
        if sharer_run.grid != receiver_grid:
            raise BridgeInputError(
                self.node, "backward", f"a sharer on a {sharer_run.grid.shape} token grid",
                f"the receiver's {receiver_grid.shape}", "bidirectional fusion needs both models on the same "
                "latent grid: give the sharer's conditioning the receiver's latent size, or fuse one way")
        self.sharer_run = sharer_run

    def begin_call(self):
        """A receiver call whose forward fusion is on: nothing offered yet, this call's strengths set."""
        self.offered = {}
        if self.run is None:
            run, sharer = self.bridge_run, self.sharer_run
            model = run.bridge.sharer_patcher.model
            self.run = FusionRun(self.bundle, FusionSchedule(), self.source.backward_strength,
                                 sharer_rope=run.receiver_rope, receiver_rope=sharer.rope, sharer_grid=run.grid,
                                 receiver_grid=sharer.grid, rope_alignment=self.source.rope_alignment,
                                 grid_mode=sharer.grid_mode, device=run.device,
                                 dtype=model.manual_cast_dtype or model.get_dtype(),
                                 banks=self.source.backward_banks.get(run.bridge.key), stats=False)
        self.run.begin_call(self.bridge_run.fusion.percent)

    def offer(self, layer, k, v, kinds):
        """Keep the receiver's K/V of ``layer`` until the last sharer block that reads it has used them."""
        if layer in self.last_reader:
            self.offered[layer] = (k, v, tuple(kinds))

    def fuse(self, layer, k, v, kinds):
        """Sharer block ``layer``'s k, v (B, N, H*D) for chunk ``kinds`` -> with the receiver's fused in."""
        run = self.run
        if run is None or layer not in run.layer_map.pairs or run.strength(layer) == 0.0:
            return k, v
        source = run.sharer_layer(layer)
        if source not in self.offered:                    # the forward fusion of that receiver layer is off
            return k, v
        rk, rv, have = self.offered[source]
        if self.last_reader[source] == layer:
            del self.offered[source]
        rows = rk.shape[0] // len(have)
        index = [have.index(kind) for kind in kinds]
        if index != list(range(len(have))):
            rk = torch.cat([rk[i * rows:(i + 1) * rows] for i in index])
            rv = torch.cat([rv[i * rows:(i + 1) * rows] for i in index])
        src, dst = self.bundle.sharer, self.bundle.receiver
        k2, v2 = run.fuse(layer, k.reshape(*k.shape[:2], dst.num_heads, dst.head_dim),
                          v.reshape(*v.shape[:2], dst.num_heads, dst.head_dim),
                          rk.reshape(*rk.shape[:2], src.num_heads, src.head_dim),
                          rv.reshape(*rv.shape[:2], src.num_heads, src.head_dim))
        return k2.reshape(k.shape), v2.reshape(v.shape)

    def close(self):
        """The backward run's report (non-finite fused layers; no K/V statistics), kept for tests."""
        self.offered = {}
        if self.run is not None:
            self.report = self.run.close()


DIRECTIONS = ("sharer_to_receiver", "bidirectional")


def with_direction(node: str, source, direction: str, backward, backward_strength: float, receiver_signature):
    """The K/V source for a fusion ``direction``: unchanged one way, a ``BidirectionalSharer`` both ways."""
    if direction == DIRECTIONS[0]:
        return source
    if direction not in DIRECTIONS:
        raise BridgeInputError(node, "direction", repr(direction), f"one of {list(DIRECTIONS)}", "pick one from the list")
    if not available():
        raise BridgeInputError(node, "direction", "bidirectional, but the Python package greenlet is not installed",
                               "greenlet (listed in the pack's requirements.txt)",
                               "run `python -m pip install -r requirements.txt` in the pack's folder with ComfyUI's "
                               "Python and restart ComfyUI, or set direction to sharer_to_receiver")
    if not isinstance(source, LiveSharer):
        raise BridgeInputError(node, "direction", "bidirectional with a recorded K/V source",
                               "a live sharer (Capture KV Cache)", "the sharer can only receive while it runs: use "
                               "Capture KV Cache, or set direction to sharer_to_receiver")
    if backward is None:
        raise BridgeInputError(node, "backward_projector", "nothing connected, and the projector bundle holds no "
                               "backward bank", "a projector from the receiver to the "
                               "sharer", "load a bundle holding both banks, or connect Create C2C Projector with sharer = the receiver model and receiver = "
                               "the sharer model (or a trained one from Load C2C Projector)")
    if not (backward.sharer.same_shape(receiver_signature) and backward.receiver.same_shape(source.signature)):
        raise BridgeInputError(node, "backward_projector", f"a projector from {backward.sharer} to {backward.receiver}",
                               f"one from the receiver ({receiver_signature}) to the sharer ({source.signature})",
                               "create it with the two models swapped (sharer = the receiver model)")
    if source.refresh_every != 1:
        raise BridgeInputError(node, "direction", f"bidirectional with refresh_every {source.refresh_every}",
                               "refresh_every 1", "bidirectional fusion runs both models block by block in every "
                               "model call: set refresh_every to 1 in Capture KV Cache, or fuse one way")
    fields = {f.name: getattr(source, f.name) for f in dataclasses.fields(LiveSharer)}
    return BidirectionalSharer(**fields, backward=backward, backward_strength=float(backward_strength))
