"""Recorded (low-VRAM) mode: sample the sharer alone while recording K/V, then replay them.

``record`` runs the stock KSampler code path on a clone of the sharer whose self-attention hooks
copy the chosen layers' K/V into a ``KVRecording`` (per step and CFG chunk kind), then asks
ComfyUI to unload the sharer. ``RecordedSource`` replays that recording into a bridged receiver;
a recording that does not fit the run (sigmas, grid, CFG) fails before the first step.
"""
from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass

import comfy.patcher_extension

from ..c2c_core.recording import DiskStore, KVRecording, RamStore
from . import compat, memory
from .bridge import step_of
from .errors import BridgeInputError

COND = 0
_ids = itertools.count()


class _Recorder:
    """Hooks of the sharer clone during recording: which step and chunk kinds each call is."""

    def __init__(self, recording: KVRecording):
        self.recording = recording
        self.sigmas = None
        self.step = 0
        self.kinds = None
        self.seen = set()
        self.forwards = 0

    def __deepcopy__(self, memo):
        return self

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        self.sigmas = [float(s) for s in sigmas]
        self.recording.sigmas = list(self.sigmas)
        self.recording.seed = args[3] if len(args) > 3 else kwargs.get("seed")
        guider = executor.class_obj
        self.recording.kinds = (0,) if guider.cfg == 1.0 else (0, 1)
        return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)

    def apply_model(self, executor, x, t, *args, **kwargs):
        transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        self.step = step_of(self.sigmas, float(t.flatten()[0]))
        self.kinds = list(transformer_options.get("cond_or_uncond", [COND]))
        self.forwards += 1
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            self.kinds = None

    def capture(self, layer, q, k, v, heads, transformer_options):
        if self.kinds is None:
            return k, v
        rows = k.shape[0] // len(self.kinds)
        for i, kind in enumerate(self.kinds):
            key = (self.step, kind, layer)
            if key not in self.seen:        # samplers with several evaluations per step keep the first
                self.seen.add(key)
                self.recording.put(self.step, kind, layer, k[i * rows:(i + 1) * rows], v[i * rows:(i + 1) * rows])
        return k, v


def record(node, sharer, positive, negative, layers, latent_image, seed, steps, cfg, sampler_name, scheduler,
           denoise, storage_dtype, storage, signature) -> KVRecording:
    """Sample the sharer with the given settings, recording ``layers``; the sharer is unloaded after."""
    if latent_image is None:
        raise BridgeInputError(node, "latent_image", "nothing connected", "the latent the receiver will sample",
                               "connect the same empty latent (size and length) you give the receiver's KSampler")
    store = RamStore() if storage == "ram" else DiskStore(tempfile.mkdtemp(prefix="c2c_kv_", dir=_temp_dir()))
    recording = KVRecording(signature=signature, grid=compat.token_grid(latent_image["samples"].shape),
                            rope=compat.rope_spec(sharer), sigmas=[], layers=tuple(layers),
                            storage_dtype=storage_dtype, store=store)
    recorder = _Recorder(recording)
    key = f"dit_cache_bridge.record.{next(_ids)}"
    clone = sharer.clone()
    compat.hook_self_attention(clone, layers, recorder.capture)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, recorder.outer_sample)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, recorder.apply_model)
    try:
        compat.common_ksampler(clone, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                    latent_image, denoise=denoise)
    finally:
        memory.release(clone)
    recording.forwards = recorder.forwards
    return recording


def _temp_dir():
    import folder_paths
    return folder_paths.get_temp_directory()


@dataclass(eq=False)
class RecordedSource:
    """A K/V source that replays a recording (Capture KV Cache in recorded mode, or Load KV Cache)."""
    recording: KVRecording
    signature: object
    layers: tuple
    refresh_every: int = 1
    rope_alignment: str = "auto"
    grid_alignment: str = "refuse"
    node: str = "Capture KV Cache"

    def __deepcopy__(self, memo):
        return self

    def attach(self, bridge, patched, receiver):
        """Nothing to load: the recording replaces the sharer."""

    def open_run(self, run, guider, noise, latent_image, denoise_mask, seed):
        return RecordedRun(self, run, guider)


class RecordedRun:
    """Per-run replay: checks the recording fits, then serves K/V of the current step."""

    def __init__(self, source: RecordedSource, run, guider):
        rec = source.recording
        self.source = source
        node = run.bridge.node
        self.recording = rec
        self.rope = rec.rope
        self.grid = rec.grid
        self.grid_mode = source.grid_alignment if source.grid_alignment != "refuse" else "nearest"
        self.forwards = 0
        self._current = {}
        self._step = None
        if len(rec.sigmas) != len(run.sigmas) or any(abs(a - b) > 1e-4 * max(1.0, abs(a))
                                                     for a, b in zip(rec.sigmas, run.sigmas)):
            raise BridgeInputError(
                node, "kv_source", f"a recording over {len(rec.sigmas) - 1} steps with sigmas "
                f"{_short(rec.sigmas)}", f"the receiver's {len(run.sigmas) - 1} steps with sigmas {_short(run.sigmas)}",
                "record with the same steps, scheduler and denoise as the receiver's sampler, and give both models "
                "the same ModelSamplingSD3 shift")
        if rec.grid != run.grid and source.grid_alignment == "refuse":
            raise BridgeInputError(
                node, "kv_source", f"a recording on a {rec.grid.frames}×{rec.grid.height}×{rec.grid.width} "
                f"token grid", f"the receiver's {run.grid.frames}×{run.grid.height}×{run.grid.width}",
                "record with the receiver's latent size and length, or set grid_alignment to 'nearest'/'trilinear'")
        if rec.seed is not None and run.seed is not None and int(rec.seed) != int(run.seed):
            raise BridgeInputError(
                node, "kv_source", f"a recording sampled with seed {rec.seed}", f"the receiver's seed {run.seed}",
                "give the receiver's sampler and the recording the same seed (set both to 'fixed'), or record again")
        if guider.cfg != 1.0 and 1 not in rec.kinds:
            raise BridgeInputError(node, "kv_source", "a recording made with cfg 1 (no negative pass)",
                                   "a recording with the negative pass the receiver's CFG needs",
                                   "record with cfg > 1, like the receiver's sampler")

    def ensure(self, x, t, kinds, step, window):
        refresh = self.source.refresh_every
        step = (step // refresh) * refresh if refresh > 1 else step
        if self._step != step:
            self._step, self._current = step, {}
            self.forwards += 1

    def capture(self, *args):
        raise RuntimeError("a recorded source does not capture")

    def kv(self, layer, kinds):
        key = (layer, tuple(kinds))
        if key not in self._current:
            import torch
            parts = [self.recording.get(self._step, kind, layer) for kind in kinds]
            k = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
            v = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
            self._current[key] = (k, v)
        return self._current[key]

    def close(self):
        self._current = {}


def _short(sigmas):
    return "[" + ", ".join(f"{s:.4g}" for s in sigmas[:4]) + (", …]" if len(sigmas) > 4 else "]")
