"""The diffusers compatibility layer: the one module that touches diffusers' attention processors and hook
registry (as c2c_comfy/compat.py is for ComfyUI), so a diffusers release that changes them is met here alone.
Tested against the version the ``diffusers`` extra pins (pyproject.toml). Two things live here:
self-attention taps and a per-call model hook.

Self-attention tap. diffusers' Wan processors compute q/k/v, apply ``norm_q``/``norm_k``, view them as
(B, N, H, D), apply RoPE and call ``dispatch_attention_fn`` — the point ComfyUI's attention override
sees. :class:`SelfAttentionTap` wraps the block's own processor and runs that processor's own code
with one name rebound, ``dispatch_attention_fn`` -> a function that hands K/V to the bridge and then
calls diffusers' real ``dispatch_attention_fn`` with every argument unchanged. So the user's
processor, attention backend (``set_attention_backend``), fused projections and LoRA scale stay in
force, no Wan code is copied here, and nothing global is patched: the rebinding lives in a private
function object of the tap. A processor that never calls ``dispatch_attention_fn`` is refused.

Per-call hook. :class:`CallHook` is a diffusers ``ModelHook`` registered in the transformer's
``HookRegistry``; it is stateful, so ``transformer.cache_context("cond"/"uncond", step_index=…)``
hands it the pipeline's CFG branch and step, and it tells the bridge when a model call begins and
ends.
"""
from __future__ import annotations

import types
from typing import Callable

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .errors import BridgeSetupError
from .models import blocks

__all__ = ["SelfAttentionTap", "add_taps", "remove_taps", "CallHook"]

# (layer, k, v) -> (k, v); k and v are (B, N, H, D), k after norm_k and RoPE.
KVHook = Callable


class SelfAttentionTap:
    """Attention processor for one block's self-attention: K/V pass through hooks before dispatch.

    Several bridges (or a model that is both sharer and receiver) share one tap per block; their
    hooks run in attach order. Attributes diffusers sets on processors (``_attention_backend``,
    ``_parallel_config``) go to the wrapped processor.
    """

    def __init__(self, inner, layer: int):
        function = getattr(type(inner), "__call__", None)
        code = getattr(function, "__code__", None)
        if code is None or "dispatch_attention_fn" not in code.co_names:
            raise BridgeSetupError(
                f"block {layer}: self-attention processor {type(inner).__name__} does not call diffusers' "
                f"dispatch_attention_fn, so its keys cannot be reached; expected WanAttnProcessor or a processor "
                f"built like it. Set the default processor (transformer.set_default_attn_processor()) first.")
        scope = dict(function.__globals__)
        scope["dispatch_attention_fn"] = self._dispatch
        call = types.FunctionType(code, scope, function.__name__, function.__defaults__, function.__closure__)
        call.__kwdefaults__ = function.__kwdefaults__
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "hooks", {})
        object.__setattr__(self, "_call", call)
        object.__setattr__(self, "_real_scope", function.__globals__)
        object.__setattr__(self, "_pending", False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        object.__setattr__(self, "_pending", encoder_hidden_states is None)
        try:
            return self._call(self.inner, attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            object.__setattr__(self, "_pending", False)

    def _dispatch(self, query, key, value, *args, **kwargs):
        if self._pending and query.shape[1] == key.shape[1]:
            object.__setattr__(self, "_pending", False)
            for hook in list(self.hooks.values()):
                key, value = hook(self.layer, key, value)
        return self._real_scope["dispatch_attention_fn"](query, key, value, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "inner"), name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)


def add_taps(transformer, layers, key: str, hook: KVHook) -> None:
    """Route the self-attention K/V of ``layers`` through ``hook`` (registered under ``key``)."""
    found = blocks(transformer)
    bad = [layer for layer in layers if not 0 <= layer < len(found)]
    if bad:
        raise BridgeSetupError(f"layers {bad} do not exist; {type(transformer).__name__} has {len(found)} blocks "
                               f"(0..{len(found) - 1}). Use a projector bundle made for this model.")
    for layer in layers:
        attn = found[layer].attn1
        tap = attn.processor
        if not isinstance(tap, SelfAttentionTap):
            tap = SelfAttentionTap(tap, layer)
            attn.set_processor(tap)
        tap.hooks[key] = hook


def remove_taps(transformer, key: str) -> None:
    """Undo :func:`add_taps` for ``key``; a tap left without hooks gives back the original processor."""
    for block in blocks(transformer):
        tap = block.attn1.processor
        if isinstance(tap, SelfAttentionTap) and key in tap.hooks:
            del tap.hooks[key]
            if not tap.hooks:
                block.attn1.set_processor(tap.inner)


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class CallHook(ModelHook):
    """Tells a listener when a call of the transformer begins and ends, with the pipeline's cache context.

    ``listener.begin_call(module, args, kwargs, context)`` may return replacement (args, kwargs);
    ``listener.end_call()`` runs after the forward (also when it raised: see Bridge).
    """

    _is_stateful = True

    def __init__(self, listener):
        super().__init__()
        self.listener = listener          # None once detached while another wrapper sat on top (inert)
        self.installed = None             # the forward the registry installed
        self.state = StateManager(_NoState)

    def context(self):
        """The pipeline's CacheContext for this call (name, step_index, …), or None outside cache_context."""
        try:
            return self.state.context
        except ValueError:
            return None

    def pre_forward(self, module, *args, **kwargs):
        if self.listener is None:
            return args, kwargs
        return self.listener.begin_call(module, args, kwargs, self.context())

    def post_forward(self, module, output):
        if self.listener is not None:
            self.listener.end_call()
        return output

    def reset_state(self, module):
        self.state.reset()
        return module


def register_call_hook(transformer, key: str, listener) -> CallHook:
    hook = CallHook(listener)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(hook, key)
    hook.installed = transformer.forward
    return hook


def remove_call_hook(transformer, key: str) -> None:
    """Remove the hook; if a wrapper outside the HookRegistry (accelerate's) now sits on top of it, leave it inert.

    ``HookRegistry.remove_hook`` would put back the forward it wrapped and so drop that outer wrapper
    (e.g. CPU offload); an inert hook only passes calls through.
    """
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is None or key not in registry.hooks:
        return
    hook = registry.hooks[key]
    if list(registry.hooks)[-1] == key and transformer.forward is not hook.installed:
        hook.listener = None
        return
    registry.remove_hook(key, recurse=False)
    registry.invalidate_child_registries_cache()
