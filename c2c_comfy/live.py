"""Live K/V source: the sharer runs in lockstep inside each receiver model call.

``LiveSharer`` is what Capture KV Cache (mode live) and Bridged KSampler hand to the bridge. When a
bridge is attached it clones the sharer, hooks the self-attention of the layers the projector reads,
and registers the clone as an additional model of the receiver, so ComfyUI loads and offloads both
together. Per run, ``LiveSharerRun`` prepares the sharer's own conditioning and, per model call,
runs it on the same latent and sigma for the call's CFG branches; its forward stops after the last
layer the projector reads. Streaming (the default where greenlet is installed) and bidirectional
fusion step the same run block by block with the receiver's (``lockstep.py``).

Chunks are keyed by branch (``c2c_core.contract.POSITIVE``/``NEGATIVE``, and ``MIDDLE`` when the sharer
has its own middle conditioning for DualCFGGuider: which of the sharer's conditionings feeds them), and the sharer's batch is built in the receiver call's chunk order, so a
batched cond+uncond call gets the sharer's K/V as one tensor, handed over without a copy.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import torch

import comfy.patcher_extension

from c2c_core import ModelSignature, RefreshPolicy
from c2c_core.capture import CapturedKV
from c2c_core.contract import BRANCH_NAMES, DIRECTIONS, Call, SharerDone, SourceReport
from c2c_core.runtime import BankCache

from . import compat, lockstep, memory
from .errors import BridgeInputError

log = logging.getLogger("dit_cache_bridge")

class Shared:
    """Mixin: survive ModelPatcher.clone()'s deepcopy of model_options by reference."""

    def __deepcopy__(self, memo):
        return self


@dataclass(eq=False)
class LiveSharer(Shared):
    """A sharer model evaluated in lockstep inside each receiver model call (Capture KV Cache, live).

    backward: a projector bundle from the receiver (its sharer side) to this sharer (its receiver side),
    for bidirectional fusion (``with_direction``): the sharer then steps block by block with the
    receiver and its self-attention also reads the receiver's K/V, at ``backward_strength`` in every
    model call in which the forward fusion of that receiver layer is on.
    """
    model: object
    positive: list
    negative: list
    signature: ModelSignature
    layers: tuple | None = None          # sharer layers the user allows; None = what the map needs
    refresh: RefreshPolicy = RefreshPolicy()   # when the sharer runs (the bridge's RefreshTracker decides)
    rope_alignment: str = "auto"         # "auto": re-rotate keys when the two models' RoPE positions differ
    grid_alignment: str = "refuse"       # or "nearest"/"trilinear": run the sharer on its own latent grid
    node: str = "Capture KV Cache"
    cond_inputs: tuple = ("positive", "negative", "middle")   # input names by branch, for error messages
    middle: list | None = None           # DualCFGGuider's middle for the sharer; None: its negative feeds it
    warnings: tuple = ()                 # what the user should know about this sharer (missing_image_warnings)
    streaming: bool = True               # lockstep: stream sharer K/V block by block (c2c_comfy/lockstep.py)
    backward: object = None
    backward_strength: float = 1.0
    backward_banks: dict = dataclasses.field(default_factory=dict, init=False, repr=False)  # bridge key -> BankCache

    @property
    def has_middle(self) -> bool:
        return self.middle is not None

    @property
    def conditionings(self) -> dict:
        """{branch name: the sharer's conditioning} (the middle only when given)."""
        conds = {"positive": self.positive, "negative": self.negative}
        return conds | {"middle": self.middle} if self.has_middle else conds

    def attach(self, bridge, patched, receiver):
        """Clone the sharer with capture hooks; ComfyUI loads it with the receiver (additional model), and the
        backward bank too (like the forward bank) when the sharer also receives."""
        if self.model.model is receiver.model and not compat.same_weights(self.model, receiver):
            raise BridgeInputError(
                self.node, "sharer", "a sharer that shares the receiver's loaded model but has other weight patches "
                "(e.g. a LoRA on one branch of the same loader)", "a sharer with its own weights, or exactly the "
                "receiver's", "record the sharer with Record KV Cache instead (it is sampled alone, with its own "
                "patches), or load it from its own model file: in live mode ComfyUI holds one set of weights per "
                "loaded model")
        sharer = self.model.clone()
        compat.hook_self_attention(sharer, bridge.sharer_layers, bridge.capture)
        sharer.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, bridge.key, _sharer_apply_model)
        if sharer.model is not receiver.model:
            patched.set_additional_models(bridge.key, [sharer])
        bridge.sharer_patcher = sharer
        memory.reserve(patched, f"{bridge.key}.memory", memory.live_reservation(bridge, self))
        if self.backward is not None:
            bank = copy.deepcopy(self.backward.bank).to(dtype=compat.compute_dtype(sharer)).eval()
            patched.set_additional_models(f"{bridge.key}.backward_projector",
                                          [compat.module_patcher(bank, receiver.load_device, receiver.offload_device)])
            self.backward_banks[bridge.key] = BankCache(bank)

    def open_run(self, run, guider, noise, latent_image, denoise_mask, seed):
        """Lockstep where it can stream (greenlet, the sharer runs in every call) or must (bidirectional), else
        buffered."""
        if self.backward is not None and not self.refresh.always:
            raise BridgeInputError(self.node, "refresh", f"{self.refresh.describe()} with bidirectional fusion",
                                   "every step (refresh 'every', refresh_every 1)", "bidirectional fusion runs the two "
                                   "models block by block in every call; set refresh to 'every' with refresh_every 1, "
                                   "or fuse one way")
        live = LiveSharerRun(self, run.bridge.sharer_patcher, run.bridge.sharer_layers, noise.to(run.device),
                             latent_image.to(run.device), denoise_mask, seed, run.device)
        if self.backward is not None or (self.streaming and self.refresh.always and lockstep.available()):
            return lockstep.LockstepRun(live, run)
        return live


def missing_image_warnings(node: str, model, conditionings: dict) -> tuple:
    """An image-to-video sharer whose conditioning carries no image still runs: ComfyUI zero-fills the image
    channels, so its K/V describe a blank start frame. Logged now, naming the node, the inputs and the fix,
    and returned for the run report (the fusion inspector)."""
    warning = _missing_image_warning(node, model, conditionings)
    if warning is None:
        return ()
    log.warning("%s", warning)
    return (warning,)


def _missing_image_warning(node: str, model, conditionings: dict) -> str | None:
    if not compat.is_image_to_video(model):
        return None
    missing = [name for name, conditioning in conditionings.items() if conditioning is not None
               and not any(extras.get("concat_latent_image") is not None for _, extras in conditioning)]
    if not missing:
        return None
    return (f"{node} › {', '.join(missing)}: the sharer is an image-to-video model but this conditioning carries no "
            "image, so ComfyUI fills the sharer's image input with zeros and its K/V describe a blank start frame. "
            "Fix: give the sharer its image: feed its positive and negative through WanImageToVideo (start_image, "
            "and clip_vision_output from CLIP Vision Encode for Wan2.1 I2V) or its ChronoEdit node, or use a "
            "text-to-video sharer.")


def with_direction(node: str, source, direction: str, backward, backward_strength: float, receiver_signature):
    """The K/V source for a fusion ``direction``: unchanged one way, a receiving ``LiveSharer`` both ways."""
    if direction == DIRECTIONS[0]:
        return source
    if direction not in DIRECTIONS:
        raise BridgeInputError(node, "direction", repr(direction), f"one of {list(DIRECTIONS)}", "pick one from the list")
    if not lockstep.available():
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
    if not source.refresh.always:
        raise BridgeInputError(node, "direction", f"bidirectional with the sharer run {source.refresh.describe()}",
                               "the sharer run every step", "bidirectional fusion runs both models block by block in "
                               "every model call: set refresh to 'every' and refresh_every to 1 in Capture KV Cache, "
                               "or fuse one way")
    return dataclasses.replace(source, backward=backward, backward_strength=float(backward_strength))


class LiveSharerRun:
    """Per-run side of a LiveSharer (a ``c2c_core.contract.KVSourceRun``): conditioning, options, captured K/V."""

    def __init__(self, source: LiveSharer, sharer_patcher, capture_layers, noise, latent_image, denoise_mask, seed,
                 device):
        self.source = source
        self.patcher = sharer_patcher
        self.device = device
        self.capture_layers = sorted(capture_layers)
        self.last_layer = self.capture_layers[-1] if self.capture_layers else -1
        self.captured = CapturedKV()
        self.forwards = 0
        self._call_branches = None
        self._started = False
        self.grid_mode = source.grid_alignment if source.grid_alignment != "refuse" else "nearest"
        sharer_shape = _sharer_latent_shape(source, latent_image)
        if sharer_shape != tuple(latent_image.shape[-3:]):
            noise = torch.zeros(*noise.shape[:-3], *sharer_shape, dtype=noise.dtype, device=noise.device)
            latent_image = resample_latent(latent_image, sharer_shape, self.grid_mode)
        self.latent_shape = sharer_shape
        conds = {name: compat.convert_cond(conditioning) for name, conditioning in source.conditionings.items()}
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            latent_image = compat.process_latent_in(sharer_patcher, latent_image)
        self.conds = compat.process_conds(sharer_patcher.model, noise, conds, device, latent_image, denoise_mask,
                                          seed)
        for branch, name in enumerate(BRANCH_NAMES[:len(conds)]):
            if len(self.conds[name]) != 1:
                raise BridgeInputError(
                    source.node, source.cond_inputs[branch], f"{len(self.conds[name])} conditionings combined",
                    "one conditioning (one prompt) per input",
                    "give the sharer a single prompt per input, without Conditioning Combine or area conditioning")
        self.model_options = compat.model_options_clone(sharer_patcher.model_options)
        compat.prepare_model_patcher(sharer_patcher, self.conds, self.model_options)
        self.grid = compat.token_grid(self.latent_shape)
        self.rope = compat.rope_spec(sharer_patcher)

    def ensure(self, call: Call) -> None:
        """Run the sharer for the call's branches whose K/V are missing or from an older refresh window.

        When every branch is due, the sharer runs on one batch in exactly the call's chunk order (a branch
        twice, as DualCFG's negative and middle, runs twice), so ``kv`` hands the receiver one tensor
        without a copy.
        """
        branches = call.branches
        missing = [branch for branch in dict.fromkeys(branches) if self.captured.window.get(branch) != call.window]
        if not missing:
            return
        if self.source.refresh.always:
            self.captured.clear()           # lockstep: only this call's K/V are ever needed
        order = list(branches) if len(missing) == len(set(branches)) else missing
        rows = call.latent.shape[0] // len(branches)
        # the noisy latent is resampled with nearest: interpolation would lower its variance below sigma²
        x = resample_latent(call.latent[:rows], self.latent_shape, "nearest")
        t = call.timestep[:rows]
        model = self.patcher.model
        receiver_patcher = compat.current_patcher(model)      # before pre_run, which sets the sharer's
        if not self._started:
            self._started = True
            compat.start_patcher_run(self.patcher)
        compat.set_current_patcher(model, self.patcher)
        try:
            compat.prepare_state(self.patcher, t, self.model_options)
            for group in self._batches(order, x, t):
                self._call_branches = [branch for branch, _ in group]
                compat.run_cond_batch(self.patcher, [part for _, part in group], t, self.model_options)
        finally:
            self._call_branches = None
            compat.set_current_patcher(model, receiver_patcher)
        for branch in missing:
            self.captured.window[branch] = call.window

    def _batches(self, order, x, t):
        """[(branch, cond part)] groups to run: one batch in ``order``, or one per branch when they cannot batch."""
        parts = []
        for branch in order:
            part = compat.cond_part(self.patcher, self.conds[BRANCH_NAMES[branch]][0], x, t, self.model_options)
            if part is None:
                raise BridgeInputError(
                    self.source.node, self.source.cond_inputs[branch], "a conditioning switched off at this sigma "
                    "(a timestep range)", "a conditioning active over the whole run",
                    "remove ConditioningSetTimestepRange from the sharer's conditioning")
            parts.append((branch, part))
        if compat.can_batch([part for _, part in parts]):
            return [parts]
        # e.g. sharer prompts of different lengths (real umT5 pads every prompt to 512 tokens, so never there)
        return [[entry] for entry in dict((branch, (branch, part)) for branch, part in parts).values()]

    def offer(self, layer, k, v) -> None:
        """One way: the receiver's K/V are not read."""

    def capture(self, layer, k, v):
        """The sharer's attention hook: keep the K/V of the layers the projector reads; stop after the last."""
        if self._call_branches is None:
            return k, v
        if layer in self.capture_layers:
            self.captured.put(layer, k, v, self._call_branches)
            if layer == self.last_layer:
                self.forwards += 1
                raise SharerDone()
        return k, v

    def kv(self, layer, call: Call):
        return self.captured.get(layer, call.branches)

    def handover(self):
        """The captured K/V, for a run that continues this one (a KSamplerAdvanced split): its first steps may reuse
        them, as one KSampler would. They wait on the sharer's offload device (nothing stays on the GPU between
        two sampler nodes); this run keeps none."""
        captured, self.captured = self.captured, CapturedKV()
        return _moved(captured, self.patcher.offload_device)

    def resume(self, captured) -> None:
        """Continue from the K/V a previous run handed over, back on this run's device."""
        if captured is not None:
            self.captured = _moved(captured, self.device)

    def close(self) -> SourceReport:
        """Release captured K/V and end the sharer's run (ON_CLEANUP callbacks, hooks)."""
        report = SourceReport(self.forwards, self.captured.peak_bytes, self.captured.copied_bytes)
        self.captured = CapturedKV()
        if self._started:
            compat.end_patcher_run(self.patcher)
        return report


def _moved(captured: CapturedKV, device) -> CapturedKV:
    """``captured`` with its K/V on ``device`` (same windows; values unchanged, so reuse stays bit-exact)."""
    moved = CapturedKV()
    moved.window = dict(captured.window)
    moved.batches = {layer: [(k.to(device), v.to(device), branches) for k, v, branches in entries]
                     for layer, entries in captured.batches.items()}
    return moved


def _sharer_latent_shape(source: LiveSharer, latent_image) -> tuple:
    """(frames, height, width) the sharer runs on: its image latent's, where its conditioning has one.

    With grid_alignment "refuse" a different size is an error; otherwise the sharer runs on the
    receiver's latent resampled to that size and its K/V are resampled back to the receiver's grid.
    """
    target = tuple(latent_image.shape[-3:])
    for input_name, conditioning in zip(source.cond_inputs, source.conditionings.values()):
        for _, extras in conditioning:
            image = extras.get("concat_latent_image")
            if image is None or tuple(image.shape[-3:]) == target:
                continue
            if source.grid_alignment == "refuse":
                where = ("set grid_alignment to 'nearest' or 'trilinear' to resample" if source.node == "Capture KV Cache"
                         else "use Capture KV Cache with grid_alignment 'nearest' or 'trilinear' + Fuse Caches to resample")
                raise BridgeInputError(
                    source.node, input_name,
                    f"its image latent is {tuple(image.shape[-3:])} (frames, height, width)",
                    f"the sampled latent's {target}",
                    "give the sharer's WanImageToVideo/ChronoEdit node the same width, height and length as the "
                    f"receiver's latent, or {where}")
            return tuple(image.shape[-3:])
    return target


def resample_latent(x, shape, mode):
    """A video latent (B, C, T, H, W) resampled to (T, H, W) = shape; the same tensor when it fits."""
    if tuple(x.shape[-3:]) == tuple(shape):
        return x
    return torch.nn.functional.interpolate(x, size=tuple(shape), mode=mode)


def _sharer_apply_model(executor, x, *args, **kwargs):
    """APPLY_MODEL wrapper of the sharer clone: stop the forward once the last needed layer is captured."""
    try:
        return executor(x, *args, **kwargs)
    except SharerDone:
        return torch.zeros_like(x)


