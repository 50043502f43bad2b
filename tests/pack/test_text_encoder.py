"""The Qwen text-encoder bridge (issue 21): Bridged Qwen Text Encode on ComfyUI's own Qwen encoders.

Tiny encoders and DiT from tools/make_tiny_qwen.py (ComfyUI's classes at tiny sizes). Every test runs on every
host; the Qwen3-VL sharer exists only on hosts with comfy/text_encoders/qwen3vl.py (0.33.0), so the pair tests skip
elsewhere and the refusal test runs there instead. Images go through mode 'edit_plus' (ComfyUI resizes them to
384×384 for the encoder) where a test does not need 'edit' (1024×1024: seconds more on the CPU).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bridge_helpers import load_model, pack_nodes

pytestmark = pytest.mark.slow

PROMPT = "turn the red cube blue and write 'C2C' on it"


@pytest.fixture(scope="module")
def qwen(tiny_models, comfy):
    """The tiny Qwen models: receiver (Qwen2.5-VL), sharer (Qwen3-VL, where the host has it), the DiT."""
    import host

    tiny = host._load_tool("make_tiny_qwen")
    root = Path(os.environ.get("DCB_TINY_QWEN_ROOT") or tiny_models.root)
    tiny.ensure_models(root)     # idempotent; writes the Qwen3-VL file on a host that has it
    paths = {name: root / spec["folder"] / name for name, spec in tiny.SPECS.items()}
    out = {"tiny": tiny, "receiver": tiny.load_tiny_clip(paths[tiny.RECEIVER]),
           "paths": {"receiver": paths[tiny.RECEIVER], "sharer": paths[tiny.SHARER], "dit": paths[tiny.DIT]},
           "dit": tiny.load_tiny_qwen_image(paths[tiny.DIT]), "sharer": None,
           "has_qwen3vl": tiny.has_qwen3vl(), "wan": load_model(tiny_models.path(host.T2V_A))}
    if out["has_qwen3vl"]:
        out["sharer"] = tiny.load_tiny_clip(paths[tiny.SHARER])
    return out


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(21))


@pytest.fixture(scope="module")
def reference(qwen, image):
    """The stock nodes' conditioning on the receiver, per mode (computed once)."""
    r = qwen["receiver"]
    return {"text": stock(r, "text"), "edit_plus": stock(r, "edit_plus", image1=image)}


def sharer(qwen):
    if qwen["sharer"] is None:
        pytest.skip("this ComfyUI has no Qwen3-VL text encoder (comfy/text_encoders/qwen3vl.py)")
    return qwen["sharer"]


def projector(sharer_clip, receiver_clip, kind="identity", mapping="identity", layers="all"):
    return pack_nodes().CreateC2CProjector.execute(sharer_clip, receiver_clip, kind, mapping, layers, 0.5, 0, 0).args[0]


def bridged(clip, sharer_clip, proj, mode="text", strength=1.0, layers="all", layer_strengths="", **images):
    from dit_cache_bridge.nodes.text_encode import BridgedQwenTextEncode
    return BridgedQwenTextEncode.execute(clip, sharer_clip, proj, PROMPT, mode, strength, layers, layer_strengths,
                                         **images).args[0]


def stock(clip, mode="text", **images):
    """The stock node each mode reproduces (text: TextEncodeQwenImageEdit without an image = CLIPTextEncode)."""
    from comfy_extras.nodes_qwen import TextEncodeQwenImageEdit, TextEncodeQwenImageEditPlus
    if mode == "edit_plus":
        return TextEncodeQwenImageEditPlus.execute(clip=clip, prompt=PROMPT, **images).args[0]
    return TextEncodeQwenImageEdit.execute(clip=clip, prompt=PROMPT, image=images.get("image1")).args[0]


def same_conditioning(a, b) -> bool:
    (ta, da), (tb, db) = a[0], b[0]
    return torch.equal(ta, tb) and sorted(da) == sorted(db) and all(
        torch.equal(da[k], db[k]) if torch.is_tensor(da[k]) else da[k] == db[k] for k in da)


def hooks_left(clip) -> list:
    return [name for name, m in clip.cond_stage_model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


# --- bit-identity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["text", "edit_plus"])
def test_strength_zero_gives_the_stock_conditioning(qwen, image, reference, mode):
    r = qwen["receiver"]
    twin = projector(r, r)
    images = {"image1": image} if mode != "text" else {}
    assert same_conditioning(bridged(r, r, twin, mode, strength=0.0, **images), reference[mode])


@pytest.mark.parametrize("mode", ["text", "edit_plus"])
def test_identity_twin_gives_the_stock_conditioning_bit_for_bit(qwen, image, reference, mode):
    """Sharer = the receiver's own encoder, identity projector, strength 1: every fused K/V equals the receiver's."""
    r = qwen["receiver"]
    images = {"image1": image} if mode != "text" else {}
    out = bridged(r, r, projector(r, r), mode, **images)
    assert same_conditioning(out, reference[mode])
    assert hooks_left(r) == []


# --- the Qwen3-VL sharer -----------------------------------------------------------------------------
def test_qwen3vl_sharer_changes_the_conditioning_and_reports(qwen, image, reference):
    r, s = qwen["receiver"], sharer(qwen)
    proj = projector(s, r, kind="c2c", mapping="terminal")
    before = [(repr(c.patcher.model_options), c.patcher.patches_uuid, c.patcher.model) for c in (r, s)]
    from dit_cache_bridge.c2c_comfy.text_encoder import BridgedClip
    clip = BridgedClip("test", r, s, proj, 1.0)
    from comfy_extras.nodes_qwen import TextEncodeQwenImageEditPlus
    out = TextEncodeQwenImageEditPlus.execute(clip=clip, prompt=PROMPT, image1=image).args[0]
    ref = reference["edit_plus"]
    assert out[0][0].shape == ref[0][0].shape and torch.isfinite(out[0][0]).all()
    assert not torch.equal(out[0][0], ref[0][0])
    report = clip.report
    assert report.layers == sorted(proj.layer_map.pairs) and report.sharer_forwards == 1
    assert all(report.k_change[layer] > 0 for layer in report.layers) and report.peak_kv_bytes > 0
    assert hooks_left(r) == [] and hooks_left(s) == []
    assert [(repr(c.patcher.model_options), c.patcher.patches_uuid, c.patcher.model) for c in (r, s)] == before
    assert same_conditioning(stock(r, "edit_plus", image1=image), ref)     # nothing left behind on the encoder


def test_layer_window_and_per_layer_strengths_switch_layers_off(qwen, reference):
    r, s = qwen["receiver"], sharer(qwen)
    proj = projector(s, r, kind="c2c", mapping="terminal")
    ref = reference["text"]
    full = bridged(r, s, proj)
    assert not torch.equal(full[0][0], ref[0][0])
    assert same_conditioning(bridged(r, s, proj, layer_strengths="0:0, 1:0, 2:0"), ref)
    last = bridged(r, s, proj, layers="last1")
    assert not torch.equal(last[0][0], ref[0][0]) and not torch.equal(last[0][0], full[0][0])


def test_bridged_conditioning_drives_stock_qwen_image_sampling(qwen, image, reference):
    """The CONDITIONING goes to the stock sampler on the tiny Qwen-Image DiT: a finite latent, moved by a Qwen3-VL
    sharer; on a host without Qwen3-VL the identity twin ('weighted', alpha 0.5 of two equal K/V) samples the
    stock latent bit for bit."""
    import nodes
    r, s = qwen["receiver"], qwen["sharer"]
    proj = projector(s, r, kind="c2c", mapping="terminal") if s is not None else projector(r, r, kind="weighted")
    latent = {"samples": torch.zeros(1, 16, 8, 8)}

    def sample(positive):
        negative = reference["text"]
        return nodes.common_ksampler(qwen["dit"], 5, 2, 2.5, "euler", "simple", positive, negative, latent)[0]["samples"]

    plain = sample(reference["edit_plus"])
    fused = sample(bridged(r, s or r, proj, "edit_plus", image1=image))
    assert fused.shape == plain.shape and torch.isfinite(fused).all()
    assert torch.equal(fused, plain) == (s is None)


# --- refusals ---------------------------------------------------------------------------------------
def refused(match, *args, **kwargs):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    with pytest.raises(BridgeInputError, match=match):
        bridged(*args, **kwargs)


def test_a_diffusion_model_where_a_text_encoder_is_expected_is_refused(qwen):
    r = qwen["receiver"]
    refused(r"Bridged Qwen Text Encode › clip: a ModelPatcher, not a CLIP; expected a Qwen2\.5-VL text encoder\. "
            r"Fix: load it with Load CLIP", qwen["wan"], r, projector(r, r))


def test_a_host_without_qwen3vl_says_so_when_the_sharer_is_not_a_qwen_encoder(qwen):
    r = qwen["receiver"]
    missing = "this ComfyUI .* has no Qwen3-VL text encoder" if not qwen["has_qwen3vl"] else "ModelPatcher, not a CLIP;"
    refused(f"sharer_clip: .*{missing}", r, qwen["wan"], projector(r, r))


def test_the_host_reports_qwen3vl_by_feature(qwen, comfyui_root):
    assert qwen["has_qwen3vl"] == (Path(comfyui_root) / "comfy" / "text_encoders" / "qwen3vl.py").is_file()


def test_a_qwen3vl_receiver_is_refused(qwen):
    r, s = qwen["receiver"], sharer(qwen)
    refused(r"clip: a qwen3-vl text encoder; expected a Qwen2\.5-VL text encoder", s, r, projector(r, r))


def test_a_projector_for_another_pair_is_refused(qwen):
    r, s = qwen["receiver"], sharer(qwen)
    refused(r"projector: a projector made for a sharer of 3 layers × 4 heads × 128, but the sharer model has "
            r"4 layers × 2 heads × 128", r, s, projector(r, r))


def test_a_wan_projector_is_refused_for_a_qwen_pair(qwen):
    r, wan = qwen["receiver"], qwen["wan"]
    refused(r"projector: a projector made for a receiver of 2 layers × 2 heads × 128", r, r, projector(wan, wan))


@pytest.mark.parametrize("mode,images,match", [
    ("edit", {}, r"image1: mode 'edit' without image1; expected the image to edit"),
    ("edit_plus", {}, r"image1: mode 'edit_plus' without image1"),
    ("text", {"image1"}, r"image1: mode 'text' with image1 connected"),
    ("edit", {"image1", "image2"}, r"image2: mode 'edit' with image1, image2; .* Fix: set mode to 'edit_plus'"),
])
def test_images_that_do_not_fit_the_mode_are_refused(qwen, image, mode, images, match):
    r = qwen["receiver"]
    refused(match, r, r, projector(r, r), mode, **{name: image for name in images})


def test_create_projector_refuses_a_text_encoder_beside_a_diffusion_model(qwen):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    with pytest.raises(BridgeInputError, match=r"Create C2C Projector › receiver: a ModelPatcher beside a CLIP"):
        projector(qwen["receiver"], qwen["wan"])


def test_a_bad_layer_window_is_refused(qwen):
    r = qwen["receiver"]
    refused(r"layers: 'first2' \(layers \[0, 1\]\); expected at least one of the projector's layers \[2\]", r, r,
            projector(r, r, layers="2"), layers="first2")


# --- the shipped workflow ---------------------------------------------------------------------------
WORKFLOW = "qwen_image_edit_c2c.json"


def tiny_workflow_prompt(object_info, paths) -> dict:
    """workflows/qwen_image_edit_c2c.json as an API prompt on the tiny Qwen models: the loaders swapped for the
    test loaders (the stock ones build Qwen's full widths), no VAE (the latent is saved instead of decoded, the
    edit's reference latent left out), a 64×64 latent and 2 steps."""
    import host
    from bridge_helpers import tiny_qwen_loader
    workflow_api = host._load_tool("workflow_api")
    api = workflow_api.to_api(workflow_api.load_workflow(host.REPO_ROOT / "workflows" / WORKFLOW), object_info)
    for node_id, node in list(api.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if tiny_qwen_loader(api, node_id, paths):
            continue
        if kind == "VAELoader":
            del api[node_id]
        elif kind == "VAEDecode":
            api[node_id] = {"class_type": "SaveLatent", "inputs": {"samples": inputs["samples"],
                                                                   "filename_prefix": "qwen_workflow/out"}}
        elif kind == "EmptySD3LatentImage":
            inputs.update(width=64, height=64)
        elif kind == "KSampler":
            inputs["steps"] = 2
    for node in api.values():
        node["inputs"].pop("vae", None)
    return {k: v for k, v in api.items() if v["class_type"] != "SaveImage"}


def test_shipped_workflow_runs_on_the_tiny_qwen_models(qwen, comfy_server, image):
    """The shipped Qwen-Image-Edit workflow, converted to an API prompt, samples on a real server."""
    if not qwen["has_qwen3vl"]:
        pytest.skip("the workflow's sharer is Qwen3-VL; this host refuses it (test_a_host_without_qwen3vl_…)")
    import numpy as np
    from PIL import Image
    Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).save(comfy_server.input_dir / "example.png")
    api = tiny_workflow_prompt(comfy_server.object_info(), qwen["paths"])
    assert {n["class_type"] for n in api.values()} >= {"DiTCacheBridge_BridgedQwenTextEncode",
                                                        "DiTCacheBridge_CreateC2CProjector", "KSampler", "SaveLatent"}
    entry = comfy_server.run(api, timeout=300)
    (save,) = [k for k, n in api.items() if n["class_type"] == "SaveLatent"]
    import safetensors.torch
    (path,) = comfy_server.output_files(entry, save)
    latent = safetensors.torch.load_file(str(path))["latent_tensor"]
    assert latent.shape == (1, 16, 1, 8, 8) and torch.isfinite(latent).all()     # Qwen-Image: one frame
