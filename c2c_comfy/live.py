"""Live K/V source: the sharer runs in lockstep inside each receiver model call.

``LiveSharer`` is what Capture KV Cache (mode live) and Bridged KSampler hand to the bridge. When a
bridge is attached it clones the sharer, hooks the self-attention of the layers the projector reads,
and registers the clone as an additional model of the receiver, so ComfyUI loads and offloads both
together. Per run, ``LiveSharerRun`` prepares the sharer's own conditioning and, per model call,
runs it on the same latent and sigma for the call's CFG chunks; its forward stops after the last
layer the projector reads.

CFG chunks are keyed by role (``branches.POSITIVE``/``NEGATIVE``: which of the sharer's conditionings
feeds them), and the sharer's batch is built in the receiver call's chunk order, so a batched
cond+uncond call gets the sharer's K/V as one tensor, handed over without a copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import comfy.patcher_extension

from ..c2c_core import ModelSignature
from . import compat, memory
from .branches import NEGATIVE, POSITIVE, ROLE_NAMES
from .errors import BridgeInputError

COND, UNCOND = POSITIVE, NEGATIVE       # chunk "kinds" are roles: which sharer conditioning feeds a chunk


class Shared:
    """Mixin: survive ModelPatcher.clone()'s deepcopy of model_options by reference."""

    def __deepcopy__(self, memo):
        return self


@dataclass(eq=False)
class LiveSharer(Shared):
    """A sharer model evaluated in lockstep inside each receiver model call (Capture KV Cache, live)."""
    model: object
    positive: list
    negative: list
    signature: ModelSignature
    layers: tuple | None = None          # sharer layers the user allows; None = what the map needs
    refresh_every: int = 1
    rope_alignment: str = "auto"         # "auto": re-rotate keys when the two models' RoPE positions differ
    grid_alignment: str = "refuse"       # or "nearest"/"trilinear": run the sharer on its own latent grid
    node: str = "Capture KV Cache"
    cond_inputs: tuple = ("positive", "negative")   # input names, for error messages
    streaming: bool = True               # lockstep: stream sharer K/V block by block (c2c_comfy/lockstep.py)

    def attach(self, bridge, patched, receiver):
        """Clone the sharer with capture hooks; ComfyUI loads it with the receiver (additional model)."""
        if self.model.model is receiver.model and not _same_weights(self.model, receiver):
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

    def open_run(self, run, guider, noise, latent_image, denoise_mask, seed):
        from . import lockstep
        if self.streaming and self.refresh_every == 1 and lockstep.available():
            return lockstep.open_lockstep_run(self, run, run.bridge.sharer_patcher, run.bridge.sharer_layers,
                                     noise.to(run.device), latent_image.to(run.device), denoise_mask, seed, run.device)
        return LiveSharerRun(self, run.bridge.sharer_patcher, run.bridge.sharer_layers, noise.to(run.device),
                             latent_image.to(run.device), denoise_mask, seed, run.device)


def _same_weights(a, b) -> bool:
    """True when two patchers of one loaded model apply the same weight patches (none, or the same set)."""
    if not a.patches and not b.patches:
        return True
    return a.patches_uuid == b.patches_uuid or a.clone_has_same_weights(b)


class _CapturedKV:
    """Sharer K/V of the current refresh window, by sharer layer and CFG chunk kind.

    One sharer call yields (rows, N, H*D) tensors covering several chunk kinds; they are kept whole
    and handed back whole when the receiver asks for the same kinds in the same order (no copy).
    Any other request is assembled from slices; ``copied_bytes`` counts what that copied.
    """

    def __init__(self):
        self.batches: dict[int, list] = {}     # layer -> [(k, v, kinds)]
        self.window: dict[int, int] = {}       # kind -> refresh window of its K/V
        self.peak_bytes = 0
        self.copied_bytes = 0

    def put(self, layer, k, v, kinds):
        entries = [e for e in self.batches.get(layer, []) if not set(e[2]) & set(kinds)]
        entries.append((k, v, tuple(kinds)))
        self.batches[layer] = entries
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def clear(self):
        self.batches, self.window = {}, {}

    @property
    def nbytes(self) -> int:
        """Bytes of K/V held (tensor sizes; they are the model's own tensors, referenced, not copied)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for entries in self.batches.values() for k, v, _ in entries)

    def get(self, layer, kinds):
        kinds = tuple(kinds)
        entries = self.batches.get(layer, [])
        for k, v, have in entries:
            if have == kinds:
                return k, v
        parts_k, parts_v = [], []
        for kind in kinds:
            for k, v, have in entries:
                if kind in have:
                    rows = k.shape[0] // len(have)
                    i = have.index(kind)
                    parts_k.append(k[i * rows:(i + 1) * rows])
                    parts_v.append(v[i * rows:(i + 1) * rows])
                    break
            else:
                raise KeyError((layer, kind))
        if len(parts_k) == 1:
            return parts_k[0], parts_v[0]
        k, v = torch.cat(parts_k), torch.cat(parts_v)
        self.copied_bytes += k.numel() * k.element_size() + v.numel() * v.element_size()
        return k, v


class _SharerDone(Exception):
    """Raised inside the sharer once its last needed layer is captured: later blocks are skipped."""


class LiveSharerRun:
    """Per-run side of a LiveSharer: conditioning, options and captured K/V."""

    def __init__(self, source: LiveSharer, sharer_patcher, capture_layers, noise, latent_image, denoise_mask, seed,
                 device):
        self.source = source
        self.patcher = sharer_patcher
        self.capture_layers = sorted(capture_layers)
        self.last_layer = self.capture_layers[-1] if self.capture_layers else -1
        self.captured = _CapturedKV()
        self.forwards = 0
        self._call_kinds = None
        self._started = False
        self.grid_mode = source.grid_alignment if source.grid_alignment != "refuse" else "nearest"
        sharer_shape = _sharer_latent_shape(source, latent_image)
        if sharer_shape != tuple(latent_image.shape[-3:]):
            noise = torch.zeros(*noise.shape[:-3], *sharer_shape, dtype=noise.dtype, device=noise.device)
            latent_image = resample_latent(latent_image, sharer_shape, self.grid_mode)
        self.latent_shape = sharer_shape
        conds = {"positive": compat.convert_cond(source.positive),
                 "negative": compat.convert_cond(source.negative)}
        if latent_image is not None and torch.count_nonzero(latent_image) > 0:
            latent_image = sharer_patcher.model.process_latent_in(latent_image)
        self.conds = compat.process_conds(sharer_patcher.model, noise, conds, device, latent_image, denoise_mask,
                                          seed)
        for kind, name in enumerate(ROLE_NAMES):
            if len(self.conds[name]) != 1:
                raise BridgeInputError(
                    source.node, source.cond_inputs[kind], f"{len(self.conds[name])} conditionings combined",
                    "one conditioning (one prompt) per input",
                    "give the sharer a single prompt per input, without Conditioning Combine or area conditioning")
        self.model_options = compat.model_options_clone(sharer_patcher.model_options)
        compat.prepare_model_patcher(sharer_patcher, self.conds, self.model_options)
        self.grid = compat.token_grid(self.latent_shape)
        self.rope = compat.rope_spec(sharer_patcher)

    def ensure(self, x, t, kinds, step, window):
        """Run the sharer for the chunk roles whose K/V are missing or from an older refresh window.

        ``x``/``t`` are the receiver call's batch, ``kinds`` its chunks' roles in order. When every
        role is due, the sharer runs on one batch in exactly that order (a role twice, as DualCFG's
        negative and middle, runs twice), so ``kv`` hands the receiver one tensor without a copy.
        """
        missing = [kind for kind in dict.fromkeys(kinds) if self.captured.window.get(kind) != window]
        if not missing:
            return
        if self.source.refresh_every == 1:
            self.captured.clear()           # lockstep: only this call's K/V are ever needed
        order = list(kinds) if len(missing) == len(set(kinds)) else missing
        rows = x.shape[0] // len(kinds)
        # the noisy latent is resampled with nearest: interpolation would lower its variance below sigma²
        x = resample_latent(x[:rows], self.latent_shape, "nearest")
        t = t[:rows]
        model = self.patcher.model
        receiver_patcher = compat.current_patcher(model)
        if not self._started:
            self._started = True
            self.patcher.pre_run()
        compat.set_current_patcher(model, self.patcher)
        try:
            compat.prepare_state(self.patcher, t, self.model_options)
            for group in self._batches(order, x, t):
                self._call_kinds = [kind for kind, _ in group]
                self._apply(model, [part for _, part in group], t)
        finally:
            self._call_kinds = None
            compat.set_current_patcher(model, receiver_patcher)
        for kind in missing:
            self.captured.window[kind] = window

    def _batches(self, order, x, t):
        """[(role, cond part)] groups to run: one batch in ``order``, or one per role when they cannot batch."""
        parts = []
        for kind in order:
            part = compat.get_area_and_mult(self.conds[ROLE_NAMES[kind]][0], x, t)
            if part is None:
                raise BridgeInputError(
                    self.source.node, self.source.cond_inputs[kind], "a conditioning switched off at this sigma "
                    "(a timestep range)", "a conditioning active over the whole run",
                    "remove ConditioningSetTimestepRange from the sharer's conditioning")
            if part.hooks is not None:
                self.patcher.prepare_hook_patches_current_keyframe(t, part.hooks, self.model_options)
            parts.append((kind, part))
        first = parts[0][1]
        if all(part.hooks == first.hooks and compat.can_concat_cond(part, first) for _, part in parts[1:]):
            return [parts]
        # e.g. sharer prompts of different lengths (real umT5 pads every prompt to 512 tokens, so never there)
        return [[entry] for entry in dict((kind, (kind, part)) for kind, part in parts).values()]

    def _apply(self, model, parts, t):
        """One sharer model call on ``parts`` batched in order, as ComfyUI's calc_cond_batch makes it."""
        n = len(parts)
        input_x = torch.cat([part.input_x for part in parts])
        c = compat.cond_cat([part.conditioning for part in parts])
        timestep = torch.cat([t] * n)
        options = comfy.patcher_extension.merge_nested_dicts(self.patcher.apply_hooks(hooks=parts[0].hooks),
                                                             self.model_options["transformer_options"],
                                                             copy_dict1=False)
        if parts[0].patches is not None:
            options["patches"] = comfy.patcher_extension.merge_nested_dicts(options.get("patches", {}),
                                                                            parts[0].patches)
        options["cond_or_uncond"] = list(range(n))
        options["uuids"] = [part.uuid for part in parts]
        options["sigmas"] = t
        c["transformer_options"] = options
        control = parts[-1].control
        if control is not None:
            c["control"] = control.get_control(input_x, timestep, c, n, options)
        if "model_function_wrapper" in self.model_options:
            self.model_options["model_function_wrapper"](model.apply_model, {"input": input_x, "timestep": timestep,
                                                                             "c": c, "cond_or_uncond": list(range(n))})
        else:
            model.apply_model(input_x, timestep, **c)

    def capture(self, layer, q, k, v, heads, transformer_options):
        if self._call_kinds is None:
            return k, v
        if layer in self.capture_layers:
            kinds = [self._call_kinds[i] for i in transformer_options["cond_or_uncond"]]
            self.captured.put(layer, k, v, kinds)
            if layer == self.last_layer:
                self.forwards += 1
                raise _SharerDone()
        return k, v

    def kv(self, layer, kinds):
        return self.captured.get(layer, kinds)

    def close(self):
        """Release captured K/V and end the sharer's run (ON_CLEANUP callbacks, hooks)."""
        self.peak_bytes = self.captured.peak_bytes
        self.copied_bytes = self.captured.copied_bytes
        self.captured = _CapturedKV()
        if self._started:
            model = self.patcher.model
            receiver_patcher = compat.current_patcher(model)
            self.patcher.cleanup()
            if receiver_patcher is not None and receiver_patcher is not self.patcher:
                compat.set_current_patcher(model, receiver_patcher)


def _sharer_latent_shape(source: LiveSharer, latent_image) -> tuple:
    """(frames, height, width) the sharer runs on: its image latent's, where its conditioning has one.

    With grid_alignment "refuse" a different size is an error; otherwise the sharer runs on the
    receiver's latent resampled to that size and its K/V are resampled back to the receiver's grid.
    """
    target = tuple(latent_image.shape[-3:])
    for input_name, conditioning in zip(source.cond_inputs, (source.positive, source.negative)):
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
    except _SharerDone:
        return torch.zeros_like(x)


