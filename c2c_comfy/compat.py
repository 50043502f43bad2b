"""The one module that touches ComfyUI internals.

Everything else in the pack reaches ComfyUI's Wan modules, model management, sampler and cond helpers
and ComfyUI's own ``nodes.py`` through the functions here; only the public API (``comfy_api.latest``,
``folder_paths``, ``ModelPatcher.clone``/``add_wrapper_with_key``, ``comfy.patcher_extension``,
``server.PromptServer``) is used directly elsewhere. Hosts differ, so what a host offers is detected
by trying it (a tiny call, a signature, an attribute), never by its version number; the version is
read only to name the host in messages. When ComfyUI changes an internal, this is the file to update.

Hook points (documented patch points, read, never written onto the shared model):
``patches_replace["dit"][("double_block", i)]``, ``transformer_options["optimized_attention_override"]``
and ``transformer_options["rope_options"]``.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

import comfy.ldm.wan.model as wan_model
import comfy.model_management as model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers

from c2c_core import ModelSignature, RopeSpec, TokenGrid, wan_rope_axes
from c2c_core.arch import ArchTag

log = logging.getLogger("dit_cache_bridge")

# Wan patchifies latents with (t, h, w) = (1, 2, 2); ComfyUI rounds odd sizes up.
PATCH_SIZE = (1, 2, 2)

# (layer, q, k, v, heads, transformer_options) -> (k, v); tensors are (B, N, H*D), k RoPE-rotated.
SelfAttentionHook = Callable[..., tuple]


class NotAWanModel(TypeError):
    """Raised when a MODEL input is not a Wan2.1-architecture diffusion model."""


class HostFeatureMissing(RuntimeError):
    """The running ComfyUI lacks something the pack needs; the message names the host and the fix."""


# ------------------------------------------------------------------------------------------------
# The host and what it offers (feature detection)
# ------------------------------------------------------------------------------------------------
def host_version() -> str:
    """ComfyUI's version string, for messages only ('unknown' when the tree does not say)."""
    module = sys.modules.get("comfyui_version")
    if module is None:
        try:
            import comfyui_version as module
        except ImportError:
            return "unknown"
    return str(getattr(module, "__version__", "unknown"))


def _attention_override_works() -> bool:
    """Call Wan's attention function once on tiny tensors with a probe override: is the override used?"""
    called = []

    def probe(func, *args, **kwargs):
        called.append(True)
        return args[0]

    q = torch.zeros(1, 2, 4)
    try:
        wan_model.optimized_attention(q, q, q, 1, transformer_options={"optimized_attention_override": probe})
    except Exception:  # noqa: BLE001  (a host without the hook may fail in any way on the probe's tiny call)
        return False
    return bool(called)


ATTENTION_OVERRIDE = _attention_override_works()
MISSING_HOOK = (
    f"ComfyUI {host_version()} does not honour transformer_options['optimized_attention_override'] in Wan's "
    "attention, the hook DiT Cache Bridge reads and fuses self-attention K/V through; its nodes cannot run on "
    "this host. Fix: update ComfyUI (the hook is in every release the pack supports, see the README)."
)
if not ATTENTION_OVERRIDE:
    log.warning("DiT Cache Bridge: %s", MISSING_HOOK)


def require_attention_hook() -> None:
    if not ATTENTION_OVERRIDE:
        raise HostFeatureMissing(MISSING_HOOK)


def _accepts(function, parameter: str) -> bool:
    try:
        return parameter in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


# Wan places RoPE positions from transformer_options["rope_options"] (ComfyUI's ScaleROPE node) only
# where its rope_encode takes transformer_options; elsewhere the options are ignored by the host.
WAN_HONOURS_ROPE_OPTIONS = _accepts(wan_model.WanModel.rope_encode, "transformer_options")


# ------------------------------------------------------------------------------------------------
# Wan models
# ------------------------------------------------------------------------------------------------
def diffusion_model(patcher):
    return patcher.model.diffusion_model


def is_wan(patcher) -> bool:
    return isinstance(getattr(getattr(patcher, "model", None), "diffusion_model", None), wan_model.WanModel)


def wan_signature(patcher, name: str = "") -> ModelSignature:
    """Layers, heads and head_dim of a Wan model, read from its modules (weights stay untouched)."""
    if not is_wan(patcher):
        found = type(getattr(getattr(patcher, "model", None), "diffusion_model", patcher)).__name__
        raise NotAWanModel(f"expected a Wan2.1-architecture model (WanModel), found {found}")
    dm = diffusion_model(patcher)
    return ModelSignature(num_layers=len(dm.blocks), num_heads=dm.num_heads, head_dim=dm.dim // dm.num_heads,
                          name=name or type(patcher.model).__name__, arch=wan_arch(dm))


def wan_arch(dm) -> ArchTag:
    """The host-neutral architecture tag of a ComfyUI WanModel, from its configuration attributes."""
    head_dim = dm.dim // dm.num_heads
    axes = getattr(getattr(dm, "rope_embedder", None), "axes_dim", None) or wan_rope_axes(head_dim)
    return ArchTag.from_config(dim=dm.dim, ffn_dim=dm.ffn_dim, num_heads=dm.num_heads, num_layers=len(dm.blocks),
                               in_channels=dm.in_dim, out_channels=dm.out_dim, text_dim=dm.text_dim,
                               image_embedding=getattr(dm, "img_emb", None) is not None,
                               patch_size=dm.patch_size, rope_axes=axes)


def is_image_to_video(patcher) -> bool:
    """True for I2V/ChronoEdit-style models, which take 20 extra concat channels."""
    return diffusion_model(patcher).patch_embedding.weight.shape[1] != patcher.model.latent_format.latent_channels


def latent_format(patcher) -> tuple[str, int]:
    """Name and channel count of the latent a model samples: Wan21 16 (Wan2.1, Wan2.2 A14B), Wan22 48 (TI2V-5B)."""
    fmt = patcher.model.latent_format
    return type(fmt).__name__, fmt.latent_channels


def token_grid(latent_shape) -> TokenGrid:
    """Token grid Wan builds from a latent (B, C, T, H, W)."""
    t, h, w = latent_shape[-3:]
    return TokenGrid(frames=math.ceil(t / PATCH_SIZE[0]), height=math.ceil(h / PATCH_SIZE[1]),
                     width=math.ceil(w / PATCH_SIZE[2]))


def rope_spec(patcher) -> RopeSpec:
    """How the model places RoPE positions: theta plus ComfyUI's ScaleROPE options where Wan honours them."""
    options = None
    if WAN_HONOURS_ROPE_OPTIONS:
        options = patcher.model_options.get("transformer_options", {}).get("rope_options")
    return RopeSpec.from_rope_options(options, theta=float(diffusion_model(patcher).rope_embedder.theta))


def hook_self_attention(patcher, layers, hook: SelfAttentionHook) -> None:
    """Route the K/V of ``layers``' self-attention through ``hook`` on this (cloned) patcher.

    A per-block ``double_block`` patch gives the block's attention calls a private copy of
    transformer_options holding an attention override. The first attention call of a Wan block
    whose q and k have the same token count is its self-attention (cross-attention follows and
    attends to text/image tokens). An override or block patch installed earlier (another pack, or
    a second bridge) is chained, not replaced. Raises HostFeatureMissing on a host without the hook.
    """
    require_attention_hook()
    existing = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for layer in layers:
        previous_patch = existing.get(("double_block", layer))
        patcher.set_model_patch_replace(_block_patch(layer, hook, previous_patch), "dit", "double_block", layer)


def _block_patch(layer: int, hook: SelfAttentionHook, previous_patch):
    def block_patch(args, extra):
        options = dict(args["transformer_options"])
        options["optimized_attention_override"] = _self_attention_override(
            layer, hook, options.get("optimized_attention_override"))
        args = {**args, "transformer_options": options}
        if previous_patch is not None:
            return previous_patch(args, extra)
        return extra["original_block"](args)
    return block_patch


def _self_attention_override(layer: int, hook: SelfAttentionHook, chained):
    pending = [True]

    def override(func, q, k, v, *args, heads, transformer_options=None, **kwargs):
        if pending[0] and q.shape[1] == k.shape[1]:
            pending[0] = False
            k, v = hook(layer, q, k, v, heads, transformer_options)
        if chained is not None:
            return chained(func, q, k, v, *args, heads=heads, transformer_options=transformer_options, **kwargs)
        return func(q, k, v, *args, heads=heads, transformer_options=transformer_options, **kwargs)
    return override


# ------------------------------------------------------------------------------------------------
# Model management and the patcher a model runs under
# ------------------------------------------------------------------------------------------------
def load_models_gpu(patchers) -> None:
    model_management.load_models_gpu(list(patchers))


def unload(patcher) -> int:
    """Unload every loaded copy of ``patcher``'s model from ComfyUI's loaded list; returns how many."""
    loaded_list = model_management.current_loaded_models
    released = 0
    for i in range(len(loaded_list) - 1, -1, -1):
        loaded = loaded_list[i]
        if loaded.model is not None and loaded.model.model is patcher.model:
            loaded.model_unload()
            loaded_list.pop(i)
            released += 1
    return released


def is_loaded(patcher) -> bool:
    # a LoadedModel whose patcher was garbage-collected reports None
    return any(m is not None and m.model is patcher.model for m in model_management.loaded_models())


def reserve_device_memory(nbytes: int) -> None:
    """Raise (or, negative, lower) the device memory ComfyUI keeps free when it loads models."""
    model_management.EXTRA_RESERVED_VRAM += int(nbytes)


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (as the samplers do)."""
    model_management.throw_exception_if_processing_interrupted()


@contextlib.contextmanager
def running_under(model, patcher):
    """``model.current_patcher`` set to ``patcher`` for the block (a sharer run inside a receiver call)."""
    previous = getattr(model, "current_patcher", None)
    model.current_patcher = patcher
    try:
        yield patcher
    finally:
        model.current_patcher = previous


def prepare_state(patcher, timestep, model_options: dict) -> None:
    """Run the patcher's ON_PREPARE_STATE callbacks for this step, as calc_cond_batch does on this host."""
    if _PREPARE_STATE_TAKES_OPTIONS:
        patcher.prepare_state(timestep, model_options)
    else:
        patcher.prepare_state(timestep)


_PREPARE_STATE_TAKES_OPTIONS = _accepts(comfy.model_patcher.ModelPatcher.prepare_state, "model_options")


def current_patcher(model):
    """The ModelPatcher a model's forward runs under now (``BaseModel.current_patcher``), or None."""
    return getattr(model, "current_patcher", None)


def set_current_patcher(model, patcher) -> None:
    model.current_patcher = patcher


def module_patcher(module, load_device, offload_device):
    """A ModelPatcher over a plain torch module, so ComfyUI loads, counts and offloads it like a model."""
    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)


def model_options_clone(model_options: dict) -> dict:
    return comfy.model_patcher.create_model_options_clone(model_options)


def compute_dtype(patcher) -> torch.dtype:
    """The dtype a model computes in (its manual cast dtype where weights are stored in another)."""
    model = patcher.model
    return model.manual_cast_dtype or model.get_dtype()


def memory_required(patcher, input_shape) -> int:
    """ComfyUI's own estimate of the activation memory of one model call on ``input_shape``."""
    return int(patcher.model.memory_required(list(input_shape)))


def percent_to_sigma(patcher) -> Callable[[float], float]:
    """The model's sigma-percent conversion (percent -> sigma), as ControlNet, hooks and EasyCache count."""
    return patcher.get_model_object("model_sampling").percent_to_sigma


def same_weights(a, b) -> bool:
    """True when two patchers of one loaded model apply the same weight patches (none, or the same set)."""
    if not a.patches and not b.patches:
        return True
    return a.patches_uuid == b.patches_uuid or a.clone_has_same_weights(b)


def process_latent_in(patcher, latent: torch.Tensor) -> torch.Tensor:
    """A start latent in the model's own scale, as sampling hands it over."""
    return patcher.model.process_latent_in(latent)


def start_patcher_run(patcher) -> None:
    """Begin a sampling run of a patcher that is not sampled itself (ON_PRE_RUN callbacks), as sampling does."""
    patcher.pre_run()


def end_patcher_run(patcher) -> None:
    """End that run (ON_CLEANUP callbacks, hooks); the model then runs under the patcher it ran under before."""
    model = patcher.model
    previous = current_patcher(model)
    patcher.cleanup()
    if previous is not None and previous is not patcher:
        set_current_patcher(model, previous)


# ------------------------------------------------------------------------------------------------
# Sampler and cond helpers
# ------------------------------------------------------------------------------------------------
def sampler_names() -> list:
    return comfy.samplers.KSampler.SAMPLERS


def scheduler_names() -> list:
    return comfy.samplers.KSampler.SCHEDULERS


def convert_cond(conditioning):
    return comfy.sampler_helpers.convert_cond(conditioning)


def process_conds(model, noise, conds, device, latent_image, denoise_mask, seed):
    return comfy.samplers.process_conds(model, noise, conds, device, latent_image, denoise_mask, seed)


def prepare_model_patcher(patcher, conds, model_options) -> None:
    comfy.sampler_helpers.prepare_model_patcher(patcher, conds, model_options)


def calc_cond_batch(model, conds, x, timestep, model_options):
    return comfy.samplers.calc_cond_batch(model, conds, x, timestep, model_options)


def cond_part(patcher, cond, x, timestep, model_options):
    """The part of one encoded cond a model call on ``x`` at ``timestep`` takes (its hook keyframes prepared),
    or None when the cond is switched off at this sigma (a timestep range)."""
    part = comfy.samplers.get_area_and_mult(cond, x, timestep)
    if part is not None and part.hooks is not None:
        patcher.prepare_hook_patches_current_keyframe(timestep, part.hooks, model_options)
    return part


def can_batch(parts) -> bool:
    """True when cond parts can run as one batch (same hooks, concatenable conds), as calc_cond_batch decides."""
    first = parts[0]
    return all(part.hooks == first.hooks and comfy.samplers.can_concat_cond(part, first) for part in parts[1:])


def run_cond_batch(patcher, parts, timestep, model_options) -> None:
    """One model call on cond ``parts`` batched in order, built as ComfyUI's calc_cond_batch builds it.

    The batch's chunks are numbered in order (``cond_or_uncond`` 0..n-1); the model's output is not used.
    """
    model = patcher.model
    n = len(parts)
    input_x = torch.cat([part.input_x for part in parts])
    c = comfy.samplers.cond_cat([part.conditioning for part in parts])
    timesteps = torch.cat([timestep] * n)
    options = comfy.patcher_extension.merge_nested_dicts(patcher.apply_hooks(hooks=parts[0].hooks),
                                                         model_options["transformer_options"], copy_dict1=False)
    if parts[0].patches is not None:
        options["patches"] = comfy.patcher_extension.merge_nested_dicts(options.get("patches", {}), parts[0].patches)
    options["cond_or_uncond"] = list(range(n))
    options["uuids"] = [part.uuid for part in parts]
    options["sigmas"] = timestep
    c["transformer_options"] = options
    control = parts[-1].control
    if control is not None:
        c["control"] = control.get_control(input_x, timesteps, c, n, options)
    if "model_function_wrapper" in model_options:
        model_options["model_function_wrapper"](model.apply_model, {"input": input_x, "timestep": timesteps, "c": c,
                                                                    "cond_or_uncond": list(range(n))})
    else:
        model.apply_model(input_x, timesteps, **c)


def wrap_sharer_calls(model_options: dict, key: str, wrapper) -> None:
    """Make ``wrapper`` the OUTERMOST APPLY_MODEL wrapper of a sharer run's options (``model_options`` of
    :func:`run_cond_batch`), so every wrapper of the sharer's own (TorchCompileModel's compile, which swaps in the
    compiled diffusion model for the call, other packs' APPLY_MODEL and DIFFUSION_MODEL wrappers) runs inside it,
    whenever it calls on: lockstep defers the call into a coroutine, and the sharer's wrappers must run there,
    around the forward that actually computes, not around the deferral."""
    wrappers = model_options["transformer_options"].setdefault("wrappers", {})
    kind = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    rest = {name: fns for name, fns in wrappers.get(kind, {}).items() if name != key}
    wrappers[kind] = {key: [wrapper], **rest}


def encode_model_conds(patcher, conditioning, x0: torch.Tensor, prompt_type: str, device) -> list:
    """CONDITIONING -> the model's encoded conds for latent x0, as sampling encodes them (empty start latent)."""
    return comfy.samplers.encode_model_conds(patcher.model.extra_conds, convert_cond(conditioning), x0, device,
                                             prompt_type, latent_image=torch.zeros_like(x0), denoise_mask=None,
                                             seed=None)


def cond_cat(conds: list) -> dict:
    return comfy.samplers.cond_cat(conds)


def clip_vision_output(penultimate_hidden_states: torch.Tensor):
    """A CLIP-vision output object holding only what Wan reads."""
    import comfy.clip_vision

    output = comfy.clip_vision.Output()
    output.penultimate_hidden_states = penultimate_hidden_states
    return output


def progress_bar(total: int, node_id=None):
    import comfy.utils

    return comfy.utils.ProgressBar(total, node_id=node_id)


def comfy_nodes():
    """ComfyUI's own ``nodes.py`` module (this pack's ``nodes/`` package has the same name).

    ComfyUI imports its ``nodes`` before it loads custom nodes, so the module in sys.modules is
    ComfyUI's; it is checked, never guessed, because a wrong sys.path order would find the pack's.
    """
    import importlib

    module = sys.modules.get("nodes") or importlib.import_module("nodes")
    if Path(getattr(module, "__file__", "") or "").name != "nodes.py" or not hasattr(module, "common_ksampler"):
        raise ImportError(f"'nodes' is {getattr(module, '__file__', module)!r}, not ComfyUI's nodes.py: ComfyUI's "
                          "folder must come first on sys.path (start ComfyUI with its main.py)")
    return module


def common_ksampler(*args, **kwargs):
    return comfy_nodes().common_ksampler(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def training_mode():
    """ComfyUI's training switch on for the block where the host has one (``model_management.in_training``:
    differentiable RoPE and linear paths instead of inference kernels); yields whether it had one."""
    if not hasattr(model_management, "in_training"):
        yield False
        return
    previous = model_management.in_training
    model_management.in_training = True
    try:
        yield True
    finally:
        model_management.in_training = previous


def check_rope_gradient(device=None) -> None:
    """One tiny backward through the RoPE function Wan calls; HostFeatureMissing when it has no gradient.

    Run it inside :func:`training_mode` (and with grad enabled): some hosts route RoPE through a
    kernel without an autograd formula unless their training switch is on.
    """
    apply_rope1 = getattr(wan_model, "apply_rope1", None)
    if apply_rope1 is None:
        return
    x = torch.randn(1, 2, 1, 4, device=device, requires_grad=True)
    freqs = torch.randn(1, 2, 1, 2, 2, 2, device=device)
    try:
        apply_rope1(x, freqs).sum().backward()
        ok = x.grad is not None
        reason = "no gradient reached its input"
    except RuntimeError as e:
        ok, reason = False, str(e).splitlines()[0]
    if not ok:
        switch = ("even with comfy.model_management.in_training on" if hasattr(model_management, "in_training")
                  else "and this host has no training switch (comfy.model_management.in_training)")
        raise HostFeatureMissing(
            f"ComfyUI {host_version()}: Wan's RoPE ({getattr(apply_rope1, '__module__', '?')}.apply_rope1) has no "
            f"gradient {switch} ({reason}); projector training backpropagates through it. Fix: run training on a "
            "ComfyUI whose RoPE is differentiable in training mode (see the README's supported hosts), or train "
            "with tools/train_projector.py against such a ComfyUI (COMFYUI_PATH).")


# ------------------------------------------------------------------------------------------------
# The training pair (c2c_comfy/training.py): everything it reaches on patchers, models and conds
# ------------------------------------------------------------------------------------------------
_RAW_OUTPUT_KEY = "dit_cache_bridge.training"


def load_device(patcher):
    return patcher.load_device


def processed_model_conds(patcher, conditioning, x0: torch.Tensor, prompt_type: str, device) -> list:
    """CONDITIONING -> per entry the model's conds ({name: COND}) for latent x0, processed for its batch."""
    return [{k: c.process_cond(batch_size=x0.shape[0], area=None) for k, c in entry["model_conds"].items()}
            for entry in encode_model_conds(patcher, conditioning, x0, prompt_type, device)]


def conds_concatenable(a: dict, b: dict) -> bool:
    """Whether two processed cond dicts of one model can run as one batch."""
    return a.keys() == b.keys() and all(a[k].can_concat(b[k]) for k in a)


def _fresh_weight(weight: torch.Tensor) -> torch.Tensor:
    """Weight wrapper: a normal copy of an inference-mode weight, so autograd may save it."""
    return weight.clone() if weight.is_inference() else weight


def fresh_weights_per_forward(patcher) -> bool:
    """On a (cloned) patcher whose model holds inference tensors (loaded inside a prompt, which ComfyUI runs
    under ``torch.inference_mode``), hand every layer a normal copy of its weight per forward through
    ComfyUI's weight wrappers, so a backward pass may go through it (ComfyUI's own LoRA trainer pays the
    same). Returns whether wrappers were added."""
    if not any(p.is_inference() for p in patcher.model.parameters()):
        return False
    for name in _cast_layer_tensors(patcher.model):
        patcher.add_weight_wrapper(name, _fresh_weight)
    return True


def _cast_layer_tensors(model) -> list:
    """The weights and biases of ComfyUI's cast layers (those with weight wrappers)."""
    return [f"{name}.{attr}" for name, module in model.named_modules() if hasattr(module, "weight_function")
            for attr in ("weight", "bias") if getattr(module, attr, None) is not None]


def fresh_tensors_outside_layers(patcher) -> int:
    """Beside :func:`fresh_weights_per_forward`: one normal copy of each inference tensor outside ComfyUI's cast
    layers (the text encoders' own RMSNorm weights, buffers), as object patches the patcher puts in place while
    it is loaded. Text encoders need them; Wan computes through its own plain parameters without saving them.
    Returns how many."""
    model = patcher.model
    wrapped = set(_cast_layer_tensors(model))
    count = 0
    with torch.inference_mode(False):
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            if tensor.is_inference() and name not in wrapped:
                copy = tensor.clone()
                patcher.add_object_patch(name, torch.nn.Parameter(copy, requires_grad=False)
                                         if isinstance(tensor, torch.nn.Parameter) else copy)
                count += 1
    return count


class _OutOfPlaceUnderGrad(torch.overrides.TorchFunctionMode):
    """ComfyUI 0.33's llama blocks add the residual into the block's input (``torch.add(residual, x, out=input)``),
    which autograd refuses. Where an input needs grad the result becomes a new tensor instead: the same values,
    and the block returns it as before (nothing else reads the overwritten input)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("out") is not None and torch.is_grad_enabled() and any(
                torch.is_tensor(a) and a.requires_grad for a in args):
            kwargs = {k: v for k, v in kwargs.items() if k != "out"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def grad_enabled():
    """THE switch that lets a ComfyUI model's forward carry gradients, text encoders' included: ComfyUI runs every
    prompt under ``torch.inference_mode`` (execution.py), where no graph is recorded, and its Qwen text encoders
    (0.33) add residuals in place. Inside the block autograd records and those adds make new tensors; pair it with
    :func:`fresh_weights_per_forward` on a clone whose weights were loaded inside a prompt (inference tensors,
    which autograd may not save)."""
    with torch.inference_mode(False), torch.enable_grad(), _OutOfPlaceUnderGrad():
        yield


def clip_patcher(clip):
    """The ModelPatcher that loads a CLIP's text encoder (what load_models_gpu and weight wrappers act on)."""
    return clip.patcher


@contextlib.contextmanager
def loaded_for_run(patchers):
    """Load ``patchers`` the ComfyUI way (one copy of a model they share) and run their ``pre_run`` and
    ``cleanup`` around the block, as a sampler does; yields their torch modules."""
    distinct = []
    for p in patchers:
        if all(p.model is not q.model for q in distinct):
            distinct.append(p)
    load_models_gpu(distinct)
    for p in distinct:
        p.pre_run()
    try:
        yield [p.model for p in distinct]
    finally:
        for p in distinct:
            p.cleanup()


def diffusion_model_output(patcher, x: torch.Tensor, sigma: torch.Tensor, conds: dict, cond_or_uncond: list):
    """One ``apply_model`` call as a sampler makes it (the patcher's wrappers and transformer_options,
    ``cond_or_uncond``, per-row sigmas), returning the diffusion model's raw output (Wan: the flow velocity)
    instead of the denoised latent, which would divide by a small sigma. Exceptions from hooks propagate."""
    import comfy.patcher_extension

    raw = {}

    def keep_raw(executor, *args, **kwargs):
        raw["out"] = executor(*args, **kwargs)
        return raw["out"]

    options = dict(patcher.model_options.get("transformer_options", {}))
    wrappers = {kind: {key: list(fns) for key, fns in table.items()}
                for kind, table in options.get("wrappers", {}).items()}
    for kind, table in patcher.wrappers.items():
        for key, fns in table.items():
            wrappers.setdefault(kind, {}).setdefault(key, []).extend(fns)
    wrappers.setdefault(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})[_RAW_OUTPUT_KEY] = [keep_raw]
    options.update(wrappers=wrappers, cond_or_uncond=list(cond_or_uncond), sigmas=sigma,
                   uuids=[None] * len(cond_or_uncond))
    patcher.model.apply_model(x, sigma, **conds, transformer_options=options)
    return raw["out"]


# ------------------------------------------------------------------------------------------------
# Qwen text encoders (issue 21: c2c_comfy/text_encoder.py). Section owned by the text-encoder bridge.
#
# Hook point: ComfyUI's llama.py attention takes no transformer_options and no attention override, so the
# K/V are read where the host computes them, with torch forward hooks on submodules of ComfyUI's own
# classes: ``self_attn.k_proj`` (Qwen2.5-VL; Qwen3-VL's keys are read after its ``k_norm``) and
# ``self_attn.v_proj``. These are the keys BEFORE RoPE: the receiver rotates fused keys at its own M-RoPE
# positions (docs/text_encoders_comfyui.md says why). The hooks live only for one encode (a context manager,
# removed in ``finally``), so no other branch of the graph, and no later prompt, ever runs through them.
# ------------------------------------------------------------------------------------------------
IMAGE_PAD_TOKEN = 151655     # <|image_pad|> in both Qwen tokenizers: where ComfyUI puts an image's embedding

# ComfyUI's encoder classes by the name SD1ClipModel gives them (its ``clip`` attribute): our kind names
_QWEN_ENCODERS = {"qwen25_7b": "qwen2.5-vl", "qwen3vl_8b": "qwen3-vl", "qwen3vl_4b": "qwen3-vl"}
_VISION_PATCH = {"qwen2.5-vl": 14, "qwen3-vl": 16}     # the vision towers' patch in pixels (merged 2×2 into a token)


class NotAQwenEncoder(TypeError):
    """Raised when a CLIP input is not one of ComfyUI's Qwen-VL text encoders; the message says what it is."""


def qwen3vl_available() -> bool:
    """Whether this ComfyUI has Qwen3-VL text encoders (comfy/text_encoders/qwen3vl.py, from 0.2x/0.33)."""
    import importlib.util

    return importlib.util.find_spec("comfy.text_encoders.qwen3vl") is not None


class QwenEncoder:
    """One of ComfyUI's Qwen-VL encoders inside a CLIP: its kind, its attention modules, its shape."""

    def __init__(self, clip, name: str, clip_model):
        self.clip, self.name, self.kind = clip, name, _QWEN_ENCODERS[name]
        self.transformer = clip_model.transformer                      # Qwen25_7BVLI / Qwen3VL
        self.attentions = [layer.self_attn for layer in self.transformer.model.layers]
        config = self.transformer.model.config
        self.num_layers = len(self.attentions)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(config.head_dim)
        self.hidden_size = int(config.hidden_size)
        self.mrope_sections = tuple(int(d) for d in (config.rope_dims or ()))
        self.interleaved_mrope = bool(getattr(config, "interleaved_mrope", False))
        self.rope_theta = float(config.rope_theta)
        from c2c_core.arch import TextEncoderArch

        self.arch = TextEncoderArch.from_config(
            self.kind, name.rsplit("_", 1)[-1], hidden_size=self.hidden_size,
            intermediate_size=int(config.intermediate_size), num_layers=self.num_layers,
            num_heads=int(config.num_attention_heads), num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            vocab_size=int(config.vocab_size), rope_theta=int(config.rope_theta),
            vision_patch=_VISION_PATCH[self.kind], mrope_sections=self.mrope_sections or None)


def qwen_encoder(clip) -> QwenEncoder:
    """The Qwen-VL encoder of a CLIP, or NotAQwenEncoder naming what the CLIP holds instead."""
    model = getattr(clip, "cond_stage_model", None)
    if model is None or not hasattr(clip, "tokenize"):
        raise NotAQwenEncoder(f"a {type(clip).__name__}, not a CLIP")
    name = getattr(model, "clip", None)
    clip_model = getattr(model, name, None) if isinstance(name, str) else None
    if name not in _QWEN_ENCODERS or clip_model is None or not hasattr(getattr(clip_model, "transformer", None), "model"):
        found = name if isinstance(name, str) else type(model).__name__
        raise NotAQwenEncoder(f"a '{found}' text encoder")
    return QwenEncoder(clip, name, clip_model)


def is_clip(value) -> bool:
    """Whether a node input is a CLIP (ComfyUI's comfy.sd.CLIP), not a MODEL."""
    import comfy.sd

    return isinstance(value, comfy.sd.CLIP)


def clone_clip(clip):
    """A CLIP of its own for one encode (ComfyUI's CLIP.clone: the patcher is cloned, the weights shared)."""
    return clip.clone()


def _hf_tokenizer(clip):
    """The Hugging Face tokenizer ComfyUI's SDTokenizer wraps (qwen25_tokenizer for both Qwen-VL encoders)."""
    return getattr(clip.tokenizer, clip.tokenizer.clip).tokenizer


def tokenizer_text(clip, tokens: dict) -> str:
    """The exact text (template, special tokens, <|image_pad|> per image) a Qwen CLIP's tokens spell."""
    return _hf_tokenizer(clip).decode([IMAGE_PAD_TOKEN if t is None else t for t in token_ids(tokens)],
                                      skip_special_tokens=False)


def token_ids(tokens: dict) -> list:
    """A Qwen CLIP's tokens as ids, ``None`` where an image embedding stands."""
    name = next(iter(tokens))
    return [None if isinstance(t[0], dict) else int(t[0]) for row in tokens[name] for t in row]


def token_pieces(clip, tokens: dict) -> list:
    """Each token's UTF-8 bytes in the text, ``None`` where an image embedding stands (its ``<|image_pad|>``), for
    character-span alignment: the tokenizer is byte-level BPE, so a token split inside a character still has its
    exact bytes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hf = _hf_tokenizer(clip)
    to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
    added = {i: t.content for i, t in hf.added_tokens_decoder.items()}
    pieces = []
    for i in token_ids(tokens):
        if i is None:
            pieces.append(None)
        elif i in added:
            pieces.append(added[i].encode("utf-8"))
        else:
            pieces.append(bytes(to_byte[ch] for ch in hf.convert_ids_to_tokens(i)))
    return pieces


def encode_tokens(clip, tokens: dict):
    """The CLIP's forward on its tokens (output discarded by the caller: the sharer's K/V are what it wants)."""
    return clip.encode_from_tokens(tokens)


def vision_spans(embeds_info) -> list:
    """(start, length, (t, h, w) patch grid before the 2×2 merge) of each image the encoder placed, from its
    ``embeds_info``: Qwen2.5-VL keeps the patch grid as the entry's ``extra``, Qwen3-VL under ``extra["grid"]``."""
    spans = []
    for e in sorted((e for e in embeds_info or () if e.get("type") == "image"), key=lambda e: e["index"]):
        extra = e.get("extra")
        grid = extra["grid"] if isinstance(extra, dict) else extra
        spans.append((int(e["index"]), int(e["size"]), tuple(int(v) for v in grid.reshape(-1).tolist())))
    return spans


@contextlib.contextmanager
def text_attention_hooks(encoder: QwenEncoder, layers, on_start, on_kv):
    """Call ``on_start(embeds_info, tokens)`` when the encoder's forward starts and ``on_kv(layer, k, v)`` in each
    of ``layers`` with its pre-RoPE K and V, each (B, N, H_kv, D) views of the host's own tensors.

    ``on_kv`` returns None (read only) or ``(k', v')``: then the layer attends with them (copied into the host's
    tensors, which are still unused at that point: both hooks fire before RoPE and attention)."""
    handles = []

    def start(module, args, kwargs):
        embeds = kwargs.get("embeds")
        on_start(kwargs.get("embeds_info") or [], None if embeds is None else int(embeds.shape[1]))

    def per_layer(layer: int, attention):
        seen = {}

        def done():
            k, v = seen.pop("k"), seen.pop("v")
            fused = on_kv(layer, k, v)
            if fused is not None:
                for mine, new in zip((k, v), fused):
                    if new is not mine:
                        mine.copy_(new)

        def keys(module, args, out):
            # k_proj: (B, N, H*D); Qwen3's k_norm: (B, H, N, D) after the host's transpose
            seen["k"] = out.transpose(1, 2) if out.dim() == 4 else out.unflatten(-1, (encoder.num_kv_heads, -1))
            if "v" in seen:
                done()

        def values(module, args, out):
            seen["v"] = out.unflatten(-1, (encoder.num_kv_heads, -1))
            if "k" in seen:
                done()

        key_module = attention.k_norm if attention.k_norm is not None else attention.k_proj
        return [key_module.register_forward_hook(keys), attention.v_proj.register_forward_hook(values)]

    try:
        handles.append(encoder.transformer.register_forward_pre_hook(start, with_kwargs=True))
        for layer in sorted(set(layers)):
            handles += per_layer(layer, encoder.attentions[layer])
        yield
    finally:
        for handle in handles:
            handle.remove()


def qwen_image_text_width(patcher) -> Optional[int]:
    """The width of the text a Qwen-Image DiT reads (its ``txt_in``), or None when the value is no Qwen-Image MODEL."""
    import comfy.model_base

    if not isinstance(getattr(patcher, "model", None), comfy.model_base.QwenImage):
        return None
    return int(patcher.model.diffusion_model.txt_in.in_features)


def model_kind(value) -> str:
    """What a MODEL or CLIP input holds, in a word (for messages): the model class, or 'CLIP'."""
    if is_clip(value):
        return "CLIP"
    model = getattr(value, "model", None)
    return type(model if model is not None else value).__name__


def stock_qwen_encode_node(name: str):
    """ComfyUI's own TextEncodeQwenImageEdit / TextEncodeQwenImageEditPlus node class (their templates and image
    sizes are the reference the bridge reproduces by running them with a bridged CLIP)."""
    import comfy_extras.nodes_qwen

    return getattr(comfy_extras.nodes_qwen, name)


def run_stock_node(cls, **inputs):
    """A stock V3 node's outputs as a tuple."""
    return tuple(cls.execute(**inputs).args)
