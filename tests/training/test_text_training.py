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


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_module_fixtures():
    """conftest's one_thread is per test, so module fixtures (the training runs) would set up with OpenMP's
    threads: slow on the shared machine, and another summation order than the tests that compare with them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def settings(steps=4, **overrides):
    from c2c_core.train import TrainSettings
    return TrainSettings(**{"steps": steps, "lr": 3e-3, "batch_size": 2, "seed": 0, "negative_share": 0.0,
                            "loss": "velocity", **overrides})


@pytest.fixture(scope="module")
def trained(tt, qwen, dataset, tmp_path_factory):
    """One 4-step run with checkpoints every 2 steps (kept for the resume test)."""
    folder = tmp_path_factory.mktemp("text_checkpoints")
    projector = make_projector(qwen)
    outcome = tt.train_text_projector(qwen["dit"], qwen["receiver"], qwen["sharer"], projector, dataset,
                                      settings(checkpoint_every=2, checkpoint_dir=folder), checkpoint_dir=folder)
    return {"outcome": outcome, "projector": projector, "checkpoints": folder}


def test_only_the_bank_learns_and_the_loss_falls(tt, qwen, dataset):
    """Six steps on one fixed item: the velocity loss falls, the bank alone gets gradients and the models stay frozen
    and unchanged."""
    from c2c_core import train_bank, TrainConfig
    projector = make_projector(qwen)
    bridge = trainable(tt, qwen, projector)
    bank = bridge.bundle.bank
    model = qwen["dit"].clone()
    (item,) = tt.prompt_batches(dataset, model, seed=3)(0)
    models = (qwen["receiver"].cond_stage_model, qwen["sharer"].cond_stage_model, qwen["dit"].model)
    weights_before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    loss_fn = tt.prompt_loss(tt.bridged_prompt_velocity(bridge, model))

    def eval_loss():    # the bank in eval mode: no Gumbel noise in the c2c gates
        bank.eval()
        return float(loss_fn(bank, [item]))

    with tt.compat.grad_enabled():
        tt.compat.fresh_weights_per_forward(model)
        with tt.session(model, bridge):
            before = eval_loss()
            train_bank(bank, projector.layer_map, lambda step: [item], loss_fn, TrainConfig(steps=6, lr=1e-2, seed=0))
            after = eval_loss()
    assert after < 0.95 * before, (before, after)
    grads = {name: p.grad for name, p in bank.named_parameters()}
    assert all(g is not None for g in grads.values()) and sum(float(g.abs().sum()) for g in grads.values()) > 0
    assert not any(p.grad is not None for m in models for p in m.parameters())
    assert all(torch.equal(v, before[k]) for m, before in zip(models, weights_before) for k, v in m.state_dict().items())


def test_a_run_saves_a_tagged_bundle_with_its_provenance(trained):
    outcome, projector = trained["outcome"], trained["projector"]
    assert len(outcome.losses) == 4 and all(torch.isfinite(torch.tensor(outcome.losses)))
    before, after = projector.bank.state_dict(), outcome.bundle.bank.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert outcome.bundle.receiver.arch.kind == "text-encoder" and outcome.bundle.provenance["steps"] == 4


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tt, qwen, dataset, trained, tmp_path):
    """The run is stopped after step 2 (its checkpoint), then resumed: same weights as the 4-step run, bit for bit."""
    from c2c_core.checkpoint import clear_checkpoints
    folder = tmp_path / "ckpt"
    shutil.copytree(trained["checkpoints"], folder)
    for late in sorted(folder.glob("step_000004*")):
        late.unlink()
    resumed = tt.train_text_projector(qwen["dit"], qwen["receiver"], qwen["sharer"], trained["projector"], dataset,
                                      settings(checkpoint_every=2, checkpoint_dir=folder), checkpoint_dir=folder)
    assert resumed.resumed_at == 2
    want = trained["outcome"].bundle.bank.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in resumed.bundle.bank.state_dict().items())
    assert resumed.losses == trained["outcome"].losses
    clear_checkpoints(folder)


