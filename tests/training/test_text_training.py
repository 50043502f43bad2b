"""Projector training for a Qwen text-encoder pair in ComfyUI (c2c_comfy/text_training.py, nodes/text_train.py,
tools/train_projector.py --pair text).

Tiny models from tools/make_tiny_qwen.py, loaded under inference_mode as loaders inside a prompt load them: the
receiver Qwen2.5-VL, the sharer Qwen3-VL on a host that has it (0.33.0; elsewhere the receiver's own encoder stands
in as the sharer, so training runs on every host), the tiny Qwen-Image DiT.
"""
from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from bridge_helpers import load_model, pack_nodes

pytestmark = pytest.mark.slow

PROMPTS = ["a red cube on a blue floor", "write 'C2C' on the sign", "two cats, one black", "a green door"]


@pytest.fixture(scope="module")
def qwen(tiny_models, comfy):
    import host
    tiny = host._load_tool("make_tiny_qwen")
    root = Path(os.environ.get("DCB_TINY_QWEN_ROOT") or tiny_models.root)
    tiny.ensure_models(root)
    paths = {name: root / spec["folder"] / name for name, spec in tiny.SPECS.items()}
    with torch.inference_mode():
        receiver = tiny.load_tiny_clip(paths[tiny.RECEIVER])
        sharer = tiny.load_tiny_clip(paths[tiny.SHARER]) if tiny.has_qwen3vl() else receiver
        dit = tiny.load_tiny_qwen_image(paths[tiny.DIT])
        wan = load_model(tiny_models.path(host.T2V_A))
    return {"receiver": receiver, "sharer": sharer, "dit": dit, "wan": wan, "tiny": tiny,
            "paths": {"receiver": paths[tiny.RECEIVER], "dit": paths[tiny.DIT],
                      "sharer": paths[tiny.SHARER] if tiny.has_qwen3vl() else paths[tiny.RECEIVER]}}


@pytest.fixture(scope="module")
def tt(qwen):
    pack_nodes()
    return importlib.import_module("dit_cache_bridge.c2c_comfy.text_training")


def make_projector(qwen, kind="c2c", seed=0):
    with torch.inference_mode():
        return pack_nodes().CreateC2CProjector.execute(qwen["sharer"], qwen["receiver"], kind, "terminal", "all", 0.5,
                                                       16, seed).args[0]


def image(seed=0):
    return torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dataset(tt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_samples")
    for i, prompt in enumerate(PROMPTS):
        latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(i))
        edit = i == 1
        tt.save_prompt_sample(folder, latent, prompt, "edit_plus" if edit else "text", image(i) if edit else None)
    return tt.open_prompt_set(folder)


def trainable(tt, qwen, projector):
    from c2c_core.train import trainable_copy
    from c2c_core import ProjectorBundle
    bank = trainable_copy(projector).eval()      # eval: the c2c gate's Gumbel noise only in train_bank
    bundle = ProjectorBundle(bank=bank, layer_map=projector.layer_map, sharer=bank.sharer, receiver=bank.receiver)
    return tt.BridgedClip("test", qwen["receiver"], qwen["sharer"], bundle, 1.0)


def test_training_forward_fuses_exactly_as_inference(tt, qwen, dataset):
    """The conditioning a training step computes (with grad, the bank in place) is Bridged Qwen Text Encode's bit for
    bit, text-only and with an edit image."""
    from dit_cache_bridge.nodes.text_encode import BridgedQwenTextEncode
    projector = make_projector(qwen)
    bridge = trainable(tt, qwen, projector)
    for mode, images in (("text", {}), ("edit_plus", {"image1": image(3)})):
        batch = tt.PromptBatch(x0=None, noise=None, sigma=None, prompt=PROMPTS[0], mode=mode,
                               image=images.get("image1"))
        with bridge.training():
            trained = tt.encode_prompt(bridge, batch)
        assert trained[0][0].requires_grad
        node = BridgedQwenTextEncode.execute(qwen["receiver"], qwen["sharer"], projector, PROMPTS[0], mode, 1.0, "all",
                                             "", **images).args[0]
        assert torch.equal(trained[0][0].detach(), node[0][0])
