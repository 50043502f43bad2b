"""Projector training with diffusers models through c2c_core's trainer: the bundle learns and runs."""
import pytest
import torch

import tiny
from c2c_core import LayerMap, ModelSignature, ProjectorBank, TrainConfig, load_bundle, save_bundle, train_bank, velocity_loss
from c2c_core.bundle import ProjectorBundle
from c2c_diffusers import Bridge, BridgeSetupError, KVRecorder, LiveSharer, RecordedSharer, SharerInputs
from c2c_diffusers.training import TrainingBatch, bridged_velocity


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
    bridge = Bridge(bundle, LiveSharer(sharer, SharerInputs(tiny.embeds(20)))).attach(receiver)
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
        bridge = Bridge(b, LiveSharer(sharer, SharerInputs(tiny.embeds(20)))).attach(receiver)
        with torch.no_grad():
            outs.append(receiver(**inputs)[0])
        bridge.detach()
    assert torch.equal(outs[0], outs[1])


def test_training_needs_a_live_sharer():
    receiver = tiny.wan(1)
    with KVRecorder(tiny.wan(2), layers=[0, 1]) as rec:
        with torch.no_grad():
            rec.transformer(hidden_states=tiny.latent(), timestep=torch.tensor([500.0]),
                            encoder_hidden_states=tiny.embeds(1), return_dict=False)
    bridge = Bridge(tiny.bundle("weighted"), RecordedSharer(rec.recording)).attach(receiver)
    with pytest.raises(BridgeSetupError, match="training needs a LiveSharer"):
        bridged_velocity(bridge, receiver)
    bridge.detach()


def test_cli_trains_from_sample_files_and_writes_a_loadable_bundle(tiny_models, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from c2c_diffusers.training import TrainingSet, save_training_sample
    for i in range(2):
        save_training_sample(tmp_path / "data" / f"s{i}.safetensors", tiny.latent(30 + i), tiny.embeds(40 + i),
                             SharerInputs(tiny.embeds(50 + i)))
    assert len(TrainingSet(tmp_path / "data")) == 2
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
    from c2c_diffusers.training import TrainingSet
    with pytest.raises(BridgeSetupError, match="no .safetensors training samples"):
        TrainingSet(tmp_path)
