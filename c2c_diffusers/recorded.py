"""Recorded (low-VRAM) K/V source: record the sharer's K/V over its own sampling run, replay them later.

:class:`KVRecorder` taps the sharer transformer while its pipeline samples alone and fills the same
``c2c_core.recording.KVRecording`` the ComfyUI nodes write (``save_recording`` / ``load_recording``
move it between hosts). :class:`RecordedSharer` replays one into a receiver: the receiver's step and
CFG branch pick the recorded K/V, so only one model has to be resident at a time.
"""
from __future__ import annotations

from c2c_core.contract import BRANCH_NAMES, Call, SourceReport, same_sigma
from c2c_core.recording import KVRecording, RamStore

from . import models
from .bridge import check_architecture, CallClock, call_inputs
from .errors import BridgeSetupError
from .hooks import add_taps, register_call_hook, remove_call_hook, remove_taps

__all__ = ["KVRecorder", "RecordedSharer", "RecordedRun"]


class KVRecorder:
    """Record ``layers`` of ``transformer`` while its pipeline samples: ``with KVRecorder(...) as rec: pipe(...)``.

    storage_dtype: fp32, fp16, bf16 or fp8_e4m3fn; store: a c2c_core.recording RamStore (default) or
    DiskStore(folder). ``rec.recording`` is the KVRecording once the block exits.
    """

    def __init__(self, transformer, layers, storage_dtype: str = "bf16", store=None, seed=None):
        self.transformer = transformer
        self.layers = tuple(sorted(set(layers)))
        self.storage_dtype = storage_dtype
        self.store = store if store is not None else RamStore()
        self.seed = seed
        self.recording: KVRecording | None = None
        self._key = f"dit_cache_bridge.recorder.{id(self)}"
        self._clock = CallClock()
        self._sigmas: list = []
        self._kinds: set = set()
        self._now = None

    def __enter__(self) -> "KVRecorder":
        add_taps(self.transformer, self.layers, self._key, self._capture)
        register_call_hook(self.transformer, self._key, self)
        return self

    def __exit__(self, *exc) -> None:
        remove_call_hook(self.transformer, self._key)
        remove_taps(self.transformer, self._key)
        if self.recording is not None:
            self.recording.sigmas = self._sigmas + [0.0]
            self.recording.kinds = tuple(sorted(self._kinds))

    def begin_call(self, module, args, kwargs, context):
        latent, _, value = call_inputs(args, kwargs, context)
        branch, step = self._clock.tick(value, context)
        if self.recording is None:
            shape = tuple(latent.shape)
            self.recording = KVRecording(signature=models.signature(module), grid=models.token_grid(module, shape),
                                         rope=models.rope_spec(module, shape), sigmas=[], layers=self.layers,
                                         storage_dtype=self.storage_dtype, store=self.store, seed=self.seed)
        if step == len(self._sigmas):
            sigma = context.sigma if context is not None and context.sigma is not None else value / 1000.0
            self._sigmas.append(float(sigma))
        self._now = (step, branch)         # recordings keep branches as their on-disk kinds 0/1
        self._kinds.add(branch)
        return args, kwargs

    def end_call(self):
        self._now = None

    def _capture(self, layer, k, v):
        if self._now is not None:
            step, kind = self._now
            self.recording.put(step, kind, layer, k.flatten(2), v.flatten(2))
        return k, v


class RecordedSharer:
    """Replays a KVRecording into a bridge; the receiver's step and branch select the recorded K/V."""

    def __init__(self, recording: KVRecording, grid_alignment: str = "refuse"):
        self.recording = recording
        self.grid_alignment = grid_alignment

    def attach(self, bridge) -> None:
        rec = self.recording
        if not rec.signature.same_shape(bridge.bundle.sharer):
            s = bridge.bundle.sharer
            raise BridgeSetupError(
                f"the K/V recording was made from a model with {rec.signature.num_layers} layers × "
                f"{rec.signature.num_heads} heads × {rec.signature.head_dim}; the projector bundle's sharer has "
                f"{s.num_layers} × {s.num_heads} × {s.head_dim}. Record the sharer the bundle was made for.")
        check_architecture(bridge.bundle, "sharer", rec.signature)
        if rec.evaluations is not None and len(rec.evaluations) != rec.steps:
            raise BridgeSetupError(
                f"the K/V recording holds {len(rec.evaluations)} model evaluations over {rec.steps} steps (a sampler "
                f"that evaluates more than once per step, e.g. ComfyUI's heun); diffusers' Wan schedulers evaluate "
                f"once per step. Record with a one-evaluation sampler (euler, uni_pc).")
        missing = sorted(set(bridge.sharer_layers) - set(rec.layers))
        if missing:
            raise BridgeSetupError(f"the K/V recording holds sharer layers {list(rec.layers)}; the projector reads "
                                   f"{missing} too. Record with layers={bridge.sharer_layers}.")

    def detach(self, bridge) -> None:
        pass

    def open_run(self, bridge, receiver_shape) -> "RecordedRun":
        return RecordedRun(self, bridge, receiver_shape)


class RecordedRun:
    """Per-run replay (a ``c2c_core.contract.KVSourceRun``): the receiver's step and branch pick the K/V."""

    def __init__(self, source: RecordedSharer, bridge, receiver_shape):
        rec = source.recording
        self.recording = rec
        self.grid, self.rope = rec.grid, rec.rope
        self.grid_mode = "nearest" if source.grid_alignment == "refuse" else source.grid_alignment
        receiver_grid = models.token_grid(bridge.receivers[0], receiver_shape)
        if self.grid != receiver_grid and source.grid_alignment == "refuse":
            raise BridgeSetupError(
                f"the K/V recording's token grid is {rec.grid.shape} (frames, height, width) but the receiver samples "
                f"{receiver_grid.shape}; expected equal. Record at the receiver's size, or use "
                f"RecordedSharer(recording, grid_alignment='nearest' or 'trilinear').")

    def ensure(self, call: Call) -> None:
        rec = self.recording
        if call.step >= rec.steps:
            raise BridgeSetupError(f"the receiver is at step {call.step + 1} but the K/V recording holds {rec.steps} "
                                   f"steps; record with the receiver's num_inference_steps.")
        recorded = rec.sigmas[call.step]
        if not same_sigma(recorded, call.sigma):
            raise BridgeSetupError(
                f"the receiver's step {call.step + 1} is at sigma {call.sigma:.6g} but the K/V recording's is at "
                f"{recorded:.6g}; expected the same noise schedule. Record with the receiver's scheduler, shift and "
                f"num_inference_steps.")
        (branch,) = call.branches
        if branch not in rec.kinds:
            raise BridgeSetupError(f"the receiver runs a {BRANCH_NAMES[branch]} branch the K/V recording does not "
                                   f"hold (it was sampled without classifier-free guidance); record with the "
                                   f"receiver's guidance_scale.")

    def offer(self, layer, k, v) -> None:
        """A recording cannot receive."""

    def capture(self, layer, k, v):
        """No sharer runs during a replay: nothing to capture."""
        return k, v

    def kv(self, layer, call: Call):
        """The recorded K/V (B, N, H*D) of sharer ``layer`` at the call's step and branch."""
        return self.recording.get(call.step, call.branches[0], layer)

    def close(self) -> SourceReport:
        return SourceReport()
