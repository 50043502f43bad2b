"""Small helpers shared by the bridge tests: load tiny models and sample with stock nodes in-process, and the
bridged API graph the server tests queue."""
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


def bridge_prompt(strength: float = 1.0, use_bridged_sampler: bool = False) -> dict:
    """API-format graph: two tiny Wan models, a weighted projector, live capture and fusion."""
    import host
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": host.T2V_A, "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": host.T2V_B, "weight_dtype": "default"}},
        "3": {"class_type": "DCBTestWanConditioning", "inputs": {"seed": 1, "length": 8, "batch_size": 1}},
        "4": {"class_type": "DCBTestWanConditioning", "inputs": {"seed": 2, "length": 5, "batch_size": 1}},
        "5": {"class_type": "DiTCacheBridge_CreateC2CProjector",
              "inputs": {"sharer": ["2", 0], "receiver": ["1", 0], "kind": "weighted", "mapping": "identity",
                         "layers": "all", "alpha": 0.5, "hidden_dim": 0, "seed": 0}},
        "6": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": 64, "height": 64, "length": 9, "batch_size": 1}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "bridge/out"}},
    }
    sampling = {"seed": 7, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
                "latent_image": ["6", 0], "denoise": 1.0}
    fusion = {"strength": strength, "start_percent": 0.0, "end_percent": 1.0}
    if use_bridged_sampler:
        graph["8"] = {"class_type": "DiTCacheBridge_BridgedKSampler", "inputs": {
            "receiver": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "sharer": ["2", 0],
            "sharer_positive": ["3", 0], "sharer_negative": ["4", 0], "projector": ["5", 0], **fusion, **sampling}}
    else:
        graph["7a"] = {"class_type": "DiTCacheBridge_CaptureKVCache", "inputs": {
            "sharer": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "mode": "live", "layers": "auto",
            "refresh_every": 1, "grid_alignment": "refuse",
            "rope_alignment": "auto"}}
        graph["7"] = {"class_type": "DiTCacheBridge_FuseCaches", "inputs": {
            "model": ["1", 0], "kv_source": ["7a", 0], "projector": ["5", 0], **fusion}}
        graph["8"] = {"class_type": "KSampler", "inputs": {
            "model": ["7", 0], "positive": ["3", 0], "negative": ["4", 0], **sampling}}
    return graph


def comfy_qwen_encoder(tiny, spec, seed, path):
    """A tiny encoder built with ComfyUI's own classes (tools/make_tiny_qwen.py), saved in the layout the host loads
    (Qwen3-VL: transformers' keys), loaded back as CLIPLoader would; returns (clip, the saved state dict)."""
    import comfy.ops
    import comfy.sd
    from safetensors.torch import save_file
    options = tiny.clip_model_options(spec)
    clip_class = next(v for k, v in options.items() if k.endswith("_class"))
    model_options = {k: v for k, v in options.items() if k.endswith("_model_config")}
    model_options.update(model_name=tiny.QWEN25_NAME if spec["kind"] == "qwen25_vl" else tiny.QWEN3VL_NAME,
                         custom_operations=comfy.ops.disable_weight_init)
    model = clip_class(device="cpu", dtype=torch.float32, model_options=model_options).transformer
    tiny.initialise(model, seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if spec["kind"] == "qwen3_vl":
        state = {("model.language_model." + k[len("model."):]) if k.startswith("model.") else "model." + k: v
                 for k, v in state.items()}
    save_file(state, str(path))
    clip = comfy.sd.load_clip(ckpt_paths=[str(path)], embedding_directory=None,
                              clip_type=comfy.sd.CLIPType.QWEN_IMAGE, model_options=options)
    return clip, state


def tiny_qwen_loader(api: dict, node_id: str, paths: dict) -> bool:
    """In an API prompt, a stock Qwen-Image loader swapped for the test loader of the tiny model (the stock ones build
    Qwen's full widths): the DiT, and the receiver or the Qwen3-VL sharer CLIP by its file name. True if swapped."""
    node = api[node_id]
    if node["class_type"] == "UNETLoader":
        api[node_id] = {"class_type": "DCBTestTinyQwenImage", "inputs": {"path": str(paths["dit"])}}
    elif node["class_type"] == "CLIPLoader":
        role = "sharer" if node["inputs"]["clip_name"].startswith("qwen3vl") else "receiver"
        api[node_id] = {"class_type": "DCBTestTinyQwenCLIP", "inputs": {"path": str(paths[role])}}
    else:
        return False
    return True
