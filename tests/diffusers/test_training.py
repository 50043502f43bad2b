"""Projector training with diffusers models through c2c_core's trainer: the bundle learns and runs."""
import pytest
import torch

import tiny
from c2c_core import LayerMap, ModelSignature, ProjectorBank, TrainConfig, load_bundle, save_bundle, train_bank, velocity_loss
from c2c_core.bundle import ProjectorBundle
from c2c_diffusers import Bridge, BridgeSetupError, KVRecorder, LiveSharer, RecordedSharer, SharerInputs
from c2c_diffusers.training import TrainingBatch, bridged_velocity

pytestmark = pytest.mark.slow      # the training CLI in a subprocess


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return TrainingBatch(x0=torch.randn(1, 16, 2, 4, 4, generator=g), noise=torch.randn(1, 16, 2, 4, 4, generator=g),
                         sigma=0.3 + 0.4 * (seed % 2), prompt_embeds=tiny.embeds(10),
                         sharer=SharerInputs(tiny.embeds(20)))


def test_a_full_projector_learns_through_the_diffusers_bridge_and_its_bundle_runs(tmp_path):
    receiver, sharer = tiny.wan(1).requires_grad_(False), tiny.wan(2).requires_grad_(False)
    sig = ModelSignature(2, 2, 128)
    layer_map = LayerMap.build("identity", 2, 2)
    bank = ProjectorBank.build("full", sig, sig, layer_map.layers, hidden_dim=32)
    bundle = ProjectorBundle(bank=bank, layer_map=layer_map, sharer=sig, receiver=sig)
    bridge = Bridge(LiveSharer(sharer, SharerInputs(tiny.embeds(20))), bundle).attach(receiver)
    result = train_bank(bank, layer_map, lambda step: batch(step % 2), velocity_loss(bridged_velocity(bridge, receiver)),
                        TrainConfig(steps=30, lr=3e-3, seed=0))
    bridge.detach()
    assert result.losses[-1] < 0.9 * result.losses[0], result.losses
    assert all(p.grad is not None for p in bank.parameters()), "every projector parameter got a gradient"
    assert not any(p.requires_grad for p in receiver.parameters()), "the models stay frozen"

    save_bundle(tmp_path / "trained.safetensors", bank, layer_map)
    loaded = load_bundle(tmp_path / "trained.safetensors")
    inputs = dict(hidden_states=tiny.latent(), timestep=torch.tensor([500.0]), encoder_hidden_states=tiny.embeds(10),
                  return_dict=False)
    outs = []
    for b in (bundle, loaded):
        bridge = Bridge(LiveSharer(sharer, SharerInputs(tiny.embeds(20))), b).attach(receiver)
        with torch.no_grad():
            outs.append(receiver(**inputs)[0])
        bridge.detach()
    assert torch.equal(outs[0], outs[1])


def test_a_training_step_is_the_inference_forward_and_only_the_bank_gets_gradients():
    """One fusion path: the velocity a training step computes (with grad) equals, bit for bit, the bridged
    receiver's inference forward on the same x_t, timestep and strength."""
    receiver, sharer = tiny.wan(1).requires_grad_(False), tiny.wan(2).requires_grad_(False)
    bundle = tiny.bundle("full", hidden_dim=32, seed=4)
    bank = bundle.bank.train()
    bridge = Bridge(LiveSharer(sharer, SharerInputs(tiny.embeds(20))), bundle, strength=0.6).attach(receiver)
    b = batch(0)
    velocity, _ = bridged_velocity(bridge, receiver)(bank, b)
    velocity.square().mean().backward()
    x_t = (1.0 - b.sigma) * b.x0 + b.sigma * b.noise
    with torch.no_grad(), bridge.session(), receiver.cache_context("cond", sigma=float(b.sigma)):
        stock = receiver(hidden_states=x_t, timestep=torch.full((1,), b.sigma * 1000.0),
                         encoder_hidden_states=b.prompt_embeds, return_dict=False)[0]
    assert bridge.last_report.k_change[1] > 0, "the inference run fused"
    bridge.detach()
    assert torch.equal(velocity.detach(), stock)
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in bank.parameters())
    assert all(p.grad is None for m in (receiver, sharer) for p in m.parameters())


def test_a_bf16_receiver_trains_the_float32_bank_itself():
    """Inference places a bf16 copy of an fp32 bank for a bf16 receiver; training must not (the copy's
    gradients would never reach the bank the optimizer steps)."""
    receiver = tiny.wan(1).to(torch.bfloat16).requires_grad_(False)
    sharer = tiny.wan(2).to(torch.bfloat16).requires_grad_(False)
    bundle = tiny.bundle("full", hidden_dim=32, seed=4)
    bank = bundle.bank.train()
    bridge = Bridge(LiveSharer(sharer, SharerInputs(tiny.embeds(20))), bundle).attach(receiver)
    velocity, target = bridged_velocity(bridge, receiver)(bank, batch(1))
    torch.nn.functional.mse_loss(velocity.float(), target).backward()
    bridge.detach()
    assert all(p.dtype == torch.float32 for p in bank.parameters())
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in bank.parameters())


def test_training_needs_a_live_sharer():
    receiver = tiny.wan(1)
    with KVRecorder(tiny.wan(2), layers=[0, 1]) as rec:
        with torch.no_grad():
            rec.transformer(hidden_states=tiny.latent(), timestep=torch.tensor([500.0]),
                            encoder_hidden_states=tiny.embeds(1), return_dict=False)
    bridge = Bridge(RecordedSharer(rec.recording), tiny.bundle("weighted")).attach(receiver)
    with pytest.raises(BridgeSetupError, match="training needs a LiveSharer"):
        bridged_velocity(bridge, receiver)
    bridge.detach()


def test_cli_trains_from_sample_files_and_writes_a_loadable_bundle(tiny_models, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from c2c_diffusers.training import open_training_set, save_training_sample
    for i in range(2):
        save_training_sample(tmp_path / "data", tiny.latent(30 + i), tiny.embeds(40 + i), SharerInputs(tiny.embeds(50 + i)))
    assert len(open_training_set(tmp_path / "data")) == 2
    out = subprocess.run(
        [sys.executable, "tools/train_projector_diffusers.py", "--receiver", str(tiny_models.path("tiny_wan_t2v_a")),
         "--sharer", str(tiny_models.path("tiny_wan_t2v_b")), "--dataset", str(tmp_path / "data"), "--kind", "full",
         "--hidden-dim", "16", "--steps", "4", "--lr", "1e-3", "--device", "cpu", "--out", str(tmp_path / "p.safetensors")],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "step 4/4 loss" in out.stdout and "wrote" in out.stdout
    bundle = load_bundle(tmp_path / "p.safetensors")
    assert bundle.bank.kind == "full" and bundle.provenance["steps"] == 4 and bundle.layer_map.layers == [0, 1]


def test_a_folder_without_samples_is_refused(tmp_path):
    from c2c_core.samples import TrainingDataError
    from c2c_diffusers.training import open_training_set
    with pytest.raises(TrainingDataError, match="holds no .safetensors samples"):
        open_training_set(tmp_path)


def test_samples_holding_nan_or_inf_are_refused_with_their_index(tmp_path):
    """x0 is checked when the folder is opened, before any step; embeddings when the sample is loaded."""
    from c2c_core.samples import TrainingDataError
    from c2c_diffusers.training import open_training_set, save_training_sample
    bad_latent = tiny.latent(31)
    bad_latent[0, 3, 1, 2, 2] = float("nan")
    save_training_sample(tmp_path / "a", tiny.latent(30), tiny.embeds(40), SharerInputs(tiny.embeds(50)))
    save_training_sample(tmp_path / "a", bad_latent, tiny.embeds(41), SharerInputs(tiny.embeds(51)))
    with pytest.raises(TrainingDataError, match=r"the latents of samples index 1 \(sample_00002\.safetensors\) in .* "
                                                r"hold NaN or Inf values; expected finite values .*Fix: delete "
                                                r"sample_00002\.safetensors from "):
        open_training_set(tmp_path / "a")
    embeds = tiny.embeds(42)
    embeds[0, 1, 7] = float("inf")
    save_training_sample(tmp_path / "b", tiny.latent(30), tiny.embeds(40), SharerInputs(embeds))
    data = open_training_set(tmp_path / "b")
    with pytest.raises(TrainingDataError, match=r"sample index 0 \(sample_00001\.safetensors\): tensor "
                                                r"'sharer_positive\.cross_attn' holds NaN or Inf"):
        data[0]
