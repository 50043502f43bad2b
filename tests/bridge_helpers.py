"""Small helpers shared by the in-process bridge tests: load tiny models, sample with stock nodes."""
from __future__ import annotations

import importlib

import torch

LATENT_SHAPE = (1, 16, 3, 8, 8)   # 3 latent frames of 8x8 → 48 tokens


def pack_nodes():
    """The pack's node modules, loaded the way ComfyUI loads them (as package dit_cache_bridge)."""
    import host
    host.load_pack()
    nodes = importlib.import_module("dit_cache_bridge.nodes")
    nodes.paths.register()
    return nodes


def load_model(path):
    import comfy.sd
    return comfy.sd.load_diffusion_model(str(path))


def empty_latent(shape=LATENT_SHAPE):
    return {"samples": torch.zeros(shape)}


def ksample(model, positive, negative, cfg=4.0, seed=7, steps=4, sampler="euler", scheduler="simple", latent=None):
    """The stock KSampler node's code path."""
    import nodes
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative,
                                   latent or empty_latent())
    return out["samples"]


def model_options_snapshot(model):
    """What a patch leak would change on a ModelPatcher: its options, wrappers and extra models."""
    to = model.model_options.get("transformer_options", {})
    return (sorted(model.model_options), sorted(to), repr(to.get("patches_replace")), repr(model.wrappers),
            sorted(model.additional_models))
