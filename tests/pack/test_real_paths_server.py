"""Issue 9's paths through a running ComfyUI server: batched CFG under DualCFGGuider, a sharer from the
receiver's own loader, and a LoRA'd branch of that loader refused with the node's message."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def dual_cfg_prompt(strength: float | None, lora: str | None = None) -> dict:
    """Receiver and sharer from one UNETLoader, equal-length texts (batched CFG), DualCFGGuider, identity
    projector. ``strength`` None samples the loader's model without the bridge."""
    import host
    graph = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": host.T2V_A, "weight_dtype": "default"}},
        "3": {"class_type": "DCBTestWanConditioning", "inputs": {"seed": 1, "length": 8, "batch_size": 1}},
        "4": {"class_type": "DCBTestWanConditioning", "inputs": {"seed": 2, "length": 8, "batch_size": 1}},
        "6": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9,
                                                                  "batch_size": 1}},
        "10": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "11": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "12": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": 3,
                                                          "denoise": 1.0}},
        "13": {"class_type": "DualCFGGuider", "inputs": {"model": ["1", 0], "cond1": ["3", 0], "cond2": ["4", 0],
                                                         "negative": ["4", 0], "cfg_conds": 4.0,
                                                         "cfg_cond2_negative": 2.0, "style": "regular"}},
        "8": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["10", 0], "guider": ["13", 0],
                                                                "sampler": ["11", 0], "sigmas": ["12", 0],
                                                                "latent_image": ["6", 0]}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "real_paths/out"}},
    }
    if strength is None:
        return graph
    sharer = ["1", 0]
    if lora is not None:
        graph["2"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora,
                                                                      "strength_model": 1.0}}
        sharer = ["2", 0]
    graph["5"] = {"class_type": "DiTCacheBridge_CreateC2CProjector", "inputs": {
        "sharer": sharer, "receiver": ["1", 0], "kind": "identity", "mapping": "identity", "layers": "all",
        "alpha": 0.5, "hidden_dim": 0, "seed": 0}}
    graph["7a"] = {"class_type": "DiTCacheBridge_CaptureKVCache", "inputs": {
        "sharer": sharer, "positive": ["3", 0], "negative": ["4", 0], "layers": "auto", "refresh_every": 1,
        "grid_alignment": "refuse", "rope_alignment": "auto"}}
    graph["7"] = {"class_type": "DiTCacheBridge_FuseCaches", "inputs": {
        "model": ["1", 0], "kv_source": ["7a", 0], "projector": ["5", 0], "strength": strength,
        "start_percent": 0.0, "end_percent": 1.0}}
    graph["13"]["inputs"]["model"] = ["7", 0]
    return graph


def saved_latent(server, entry) -> torch.Tensor:
    import safetensors.torch
    (path,) = server.output_files(entry, "9")
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def test_dual_cfg_with_the_receivers_own_loader_as_sharer_is_stock(comfy_server):
    stock = saved_latent(comfy_server, comfy_server.run(dual_cfg_prompt(None), timeout=180))
    bridged = saved_latent(comfy_server, comfy_server.run(dual_cfg_prompt(1.0), timeout=180))
    assert torch.equal(bridged, stock)


def test_lora_branch_of_the_receivers_loader_fails_the_prompt_with_the_fix(comfy_server, tiny_models):
    import host
    from safetensors.torch import save_file
    folder = tiny_models.root / "loras"
    folder.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    save_file({f"diffusion_model.blocks.{i}.self_attn.k.diff": 0.05 * torch.randn(256, 256, generator=gen)
               for i in range(2)}, str(folder / "dcb_server_lora.safetensors"))
    with pytest.raises(host.PromptFailed, match=r"Capture KV Cache › sharer: a sharer that shares the receiver's "
                                                r"loaded model but has other weight patches"):
        comfy_server.run(dual_cfg_prompt(1.0, lora="dcb_server_lora.safetensors"), timeout=180)
