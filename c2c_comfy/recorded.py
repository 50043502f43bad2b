"""Recorded (low-VRAM) mode: sample the sharer alone while recording K/V, then replay them.

``record`` runs the stock KSampler code path on a clone of the sharer whose self-attention hooks
copy the chosen layers' K/V into a ``KVRecording``, per model *evaluation* (a sampler such as heun
evaluates the model twice per step; each evaluation's sigma is recorded too) and per branch
(``c2c_core.contract.POSITIVE``/``NEGATIVE``, the recording's on-disk kinds 0/1), then asks ComfyUI to
unload the sharer. ``RecordedSharer`` (named as c2c_diffusers' replay source) replays that recording into
a bridged receiver, evaluation by evaluation: a recording that does not fit the run (sigmas, grid, seed,
CFG, batch size) fails before the first step, and a sampler that evaluates at other sigmas than the
recording's fails at the first evaluation that fuses and differs.
"""
from __future__ import annotations

import gc
import itertools
from dataclasses import dataclass

import comfy.patcher_extension

import torch

from c2c_core import RefreshPolicy
from c2c_core.contract import BRANCH_NAMES, NEGATIVE, Call, SourceReport, same_sigma
from c2c_core.recording import DiskStore, KVRecording, RamStore, RecordingWriteError, ReplayReader
from . import compat, files, memory
from .branches import branch_map, call_branches
from .errors import BridgeInputError

_ids = itertools.count()
# Model evaluations per step of ComfyUI's samplers that evaluate more than once (the recording keeps each
# one); only sizes the memory check before recording. Adaptive samplers (dpm_adaptive) are not bounded.
EVALUATIONS_PER_STEP = {"heun": 2, "heunpp2": 3, "dpm_2": 2, "dpm_2_ancestral": 2, "dpmpp_2s_ancestral": 2,
                        "dpmpp_2s_ancestral_cfg_pp": 2, "dpmpp_sde": 2, "dpmpp_sde_gpu": 2, "seeds_2": 2,
                        "seeds_3": 3, "sa_solver_pece": 2}

class _Recorder:
    """Hooks of the sharer clone during recording: which evaluation and branches each call is."""

    def __init__(self, recording: KVRecording, node: str):
        self.recording = recording
        self.node = node
        self.branches = {}
        self.evaluation = -1
        self.call_branches = None
        self.seen = set()
        self.forwards = 0

    def __deepcopy__(self, memo):
        return self

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        self.recording.sigmas = [float(s) for s in sigmas]
        self.recording.evaluations = []
        self.recording.seed = args[3] if len(args) > 3 else kwargs.get("seed")
        self.branches = branch_map(executor.class_obj, self.node, "sharer")
        return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        self.evaluation += 1
        self.recording.evaluations.append(float(timestep.flatten()[0]))
        return executor(model, conds, x_in, timestep, model_options)

    def apply_model(self, executor, x, t, *args, **kwargs):
        transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        self.call_branches = call_branches(transformer_options, self.branches, self.node, "sharer")
        self.forwards += 1
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            self.call_branches = None

    @torch.compiler.disable
    def capture(self, layer, q, k, v, heads, transformer_options):
        """The sharer's attention hook: copy the layer into the recording (a compiled sharer breaks its graph here,
        once per recorded layer: the store's copies and writes are not traceable)."""
        if self.call_branches is None:
            return k, v
        rows = k.shape[0] // len(self.call_branches)
        for i, branch in enumerate(self.call_branches):
            key = (self.evaluation, branch, layer)
            if key not in self.seen:
                self.seen.add(key)
                self.recording.put(self.evaluation, branch, layer, k[i * rows:(i + 1) * rows],
                                   v[i * rows:(i + 1) * rows])
        return k, v


def record(node, sharer, positive, negative, layers, latent_image, seed, steps, cfg, sampler_name, scheduler,
           denoise, storage_dtype, storage, signature) -> KVRecording:
    """Sample the sharer with the given settings, recording ``layers``; the sharer is unloaded after."""
    if latent_image is None:
        raise BridgeInputError(node, "latent_image", "nothing connected", "the latent the receiver will sample",
                               "connect the same empty latent (size and length) you give the receiver's KSampler")
    evaluations = steps * EVALUATIONS_PER_STEP.get(sampler_name, 1)
    size = memory.recording_bytes(steps=evaluations, chunks=1 if cfg == 1.0 else 2, layers=len(layers),
                                  tokens=compat.token_grid(latent_image["samples"].shape).numel,
                                  heads=signature.num_heads, head_dim=signature.head_dim, storage_dtype=storage_dtype)
    temp = files.temp_folder(node) if storage == "disk" else None      # created when missing
    if temp is not None and DiskStore.temporaries():
        # a dropped recording that a reference cycle still holds (ComfyUI keeps a failed node's inputs in its
        # traceback) is deleted now, before another is made: only recordings an output still uses remain
        gc.collect()
    memory.check_recording_fits(node, size, storage, temp)
    store = RamStore() if storage == "ram" else DiskStore.temporary(temp)   # deleted when dropped
    recording = KVRecording(signature=signature, grid=compat.token_grid(latent_image["samples"].shape),
                            rope=compat.rope_spec(sharer), sigmas=[], layers=tuple(layers),
                            storage_dtype=storage_dtype, store=store)
    recorder = _Recorder(recording, node)
    key = f"dit_cache_bridge.record.{next(_ids)}"
    clone = sharer.clone()
    compat.hook_self_attention(clone, layers, recorder.capture)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, recorder.outer_sample)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, key, recorder.calc_cond_batch)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, recorder.apply_model)
    try:
        try:
            compat.common_ksampler(clone, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                   latent_image, denoise=denoise)
            recording.finish()      # the background writer's last files, or its failure
        finally:
            memory.release(clone)
    except RecordingWriteError as exc:
        recording.close()
        raise BridgeInputError(node, "storage", str(exc),
                               f"room for the recording's {memory.gb(size)} in ComfyUI's temp folder",
                               "free disk space there, or set storage to 'ram'") from exc
    except BaseException:
        recording.close()           # an interrupted or failed recording leaves no temp folder behind
        raise
    recording.kinds = tuple(sorted({branch for _, branch, _ in recorder.seen})) or (0,)
    recording.forwards = recorder.forwards
    return recording


@dataclass(eq=False)
class RecordedSharer:
    """A K/V source that replays a recording (Record KV Cache, or Load KV Cache)."""
    recording: KVRecording
    signature: object
    layers: tuple
    refresh: RefreshPolicy = RefreshPolicy()   # when a new evaluation is replayed (the bridge's tracker decides)
    rope_alignment: str = "auto"
    grid_alignment: str = "refuse"
    node: str = "Record KV Cache"
    has_middle = False      # a recording holds positive/negative only: DualCFG's middle replays the negative
    warnings: tuple = ()    # what the user should know about the recorded sharer (live.missing_image_warnings)

    def __deepcopy__(self, memo):
        return self

    def attach(self, bridge, patched, receiver):
        """Nothing to load: the recording replaces the sharer; ComfyUI reserves room for the replay."""
        memory.reserve(patched, f"{bridge.key}.memory", memory.replay_reservation(bridge, self))

    def open_run(self, run, guider, noise, latent_image, denoise_mask, seed):
        return RecordedRun(self, run, guider)


class RecordedRun:
    """Per-run replay (a ``c2c_core.contract.KVSourceRun``): checks the recording fits, then serves K/V of the
    current model evaluation.

    Evaluations are counted by the bridge (one per ``calc_cond_batch``); the receiver's e-th evaluation
    replays the recording's e-th, after checking both are at the same sigma (at the first call that fuses). When the
    bridge's refresh tracker reuses K/V, the evaluation at which the current refresh window began is replayed for
    the whole window, as live mode runs the sharer there.
    """

    def __init__(self, source: RecordedSharer, run, guider):
        rec = source.recording
        self.source = source
        self.device = run.device        # not the run itself: a run <-> source cycle would keep the recording alive
        self.node = node = run.bridge.node
        self.recording = rec
        self.rope = rec.rope
        self.grid = rec.grid
        self.grid_mode = source.grid_alignment if source.grid_alignment != "refuse" else "nearest"
        self.forwards = 0
        self._reader = None             # c2c_core.recording.ReplayReader on the receiver's device, per run
        self._loaded = None
        self._window = None
        self._replayed = None
        self.evaluations = list(rec.evaluations) if rec.evaluations is not None else list(rec.sigmas[:-1])
        if len(rec.sigmas) != len(run.sigmas) or any(not same_sigma(a, b) for a, b in zip(rec.sigmas, run.sigmas)):
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
        if NEGATIVE not in rec.kinds and NEGATIVE in run.branches.values() and getattr(guider, "cfg", 1.0) != 1.0:
            raise BridgeInputError(node, "kv_source", "a recording made with cfg 1 (no negative pass)",
                                   "a recording with the negative pass the receiver's CFG needs",
                                   "record with cfg > 1, like the receiver's sampler")
        rows = self._recorded_batch()
        if rows != run.noise_shape[0]:
            raise BridgeInputError(
                node, "kv_source", f"a recording of a latent batch of {rows}",
                f"the receiver's latent batch of {run.noise_shape[0]}",
                "record with the receiver's latent (the same Empty Latent batch_size), or record again")

    def _recorded_batch(self) -> int:
        return self.recording.batch_size

    def _check_evaluation(self, index: int, sigma: float):
        """Check the receiver's ``index``-th model evaluation has a recorded counterpart at its sigma."""
        if index >= len(self.evaluations) or not same_sigma(self.evaluations[index], sigma):
            found = (f"a recording of {len(self.evaluations)} model evaluations" if index >= len(self.evaluations)
                     else f"a recording whose model evaluation {index} is at sigma {self.evaluations[index]:.4g}")
            raise BridgeInputError(
                self.node, "kv_source", found, f"the receiver's sampler evaluating the model at sigma {sigma:.4g} "
                f"(evaluation {index})", "record with the receiver's sampler_name (samplers such as heun or dpm_2 "
                "evaluate the model more than once per step), steps, scheduler and denoise")

    def ensure(self, call: Call) -> None:
        self._check_evaluation(call.evaluation, call.sigma)
        if self._window != call.window:
            self._window, self._replayed = call.window, call.evaluation
        evaluation = self._replayed
        if self._loaded != evaluation:
            self._loaded = evaluation
            self.forwards += 1

    def offer(self, layer, k, v) -> None:
        """A recording cannot receive."""

    def capture(self, layer, k, v):
        """No sharer runs during a replay: nothing to capture."""
        return k, v

    def kv(self, layer, call: Call):
        """The recorded K/V of sharer ``layer`` for this call's branches, on the receiver's device."""
        for branch in dict.fromkeys(call.branches):
            if branch not in self.recording.kinds:
                raise BridgeInputError(
                    self.node, "kv_source", f"a recording without the sharer's {BRANCH_NAMES[branch]} pass",
                    f"the {BRANCH_NAMES[branch]} pass the receiver's guider evaluates",
                    "record with cfg > 1 so both passes are recorded")
        if self._reader is None:
            self._reader = ReplayReader(self.recording, self.device)
        parts = [self._reader.get(self._loaded, branch, layer) for branch in call.branches]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def handover(self):
        """A recording replays one run's evaluations: a run that continues this one starts afresh."""
        return None

    def resume(self, captured) -> None:
        """Nothing to continue from (see handover)."""

    def close(self) -> SourceReport:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        return SourceReport(sharer_forwards=self.forwards)


def _short(sigmas):
    return "[" + ", ".join(f"{s:.4g}" for s in sigmas[:4]) + (", …]" if len(sigmas) > 4 else "]")
