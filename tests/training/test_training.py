"""Projector training on tiny Wan pairs, in-process: it learns, it resumes bit-exactly, it leaves the models alone.

Models are loaded under ``torch.inference_mode`` as ComfyUI's UNETLoader loads them inside a prompt,
so every test here also covers training on inference-tensor weights.
"""
from __future__ import annotations

import json
import struct

import pytest
import torch

pytestmark = [pytest.mark.usefixtures("comfy"), pytest.mark.slow]


@pytest.fixture(scope="module")
def t2v_set(training, helpers, tmp_path_factory):
    return training.open_training_set(helpers.t2v_samples(training, tmp_path_factory.mktemp("t2v_samples")))


@pytest.fixture(scope="module")
def i2v_folder(training, helpers, tmp_path_factory):
    return helpers.i2v_samples(training, tmp_path_factory.mktemp("i2v_samples"))


def mean(values):
    return sum(values) / len(values)


def test_distillation_toward_the_sharer_lowers_held_out_loss(train, training, pack, helpers, models, t2v_set):
    """Receiver tiny_wan_t2v_a learns to predict like sharer tiny_wan_t2v_b through a c2c bank."""
    a, b = models["a"], models["b"]
    projector = helpers.make_projector(pack, b, a, "c2c")
    alone = mean(training.evaluate_projector(b, a, projector, t2v_set, "distill", batches=8, strength=0.0))
    before = mean(training.evaluate_projector(b, a, projector, t2v_set, "distill", batches=8))
    settings = train.TrainSettings(loss="distill", steps=60, batch_size=2, lr=1e-3, checkpoint_every=0, seed=3)
    outcome = training.train_projector(b, a, projector, t2v_set, settings)
    after = mean(training.evaluate_projector(b, a, outcome.bundle, t2v_set, "distill", batches=8))
    # measured: alone 3.91, untrained 3.91, trained 1.86 (held-out draws: other noise, sigmas and order)
    assert after < 0.6 * before and after < 0.6 * alone, (alone, before, after)
    assert len(outcome.losses) == 60 and all(map(torch.isfinite, torch.tensor(outcome.losses)))


def test_velocity_loss_trains_an_i2v_sharer_into_a_t2v_receiver(train, training, pack, helpers, models, i2v_folder):
    a, i2v = models["a"], models["i2v"]
    data = training.open_training_set(i2v_folder)
    projector = helpers.make_projector(pack, i2v, a, "full")
    settings = train.TrainSettings(loss="velocity", steps=30, batch_size=2, lr=1e-3, checkpoint_every=0)
    outcome = training.train_projector(i2v, a, projector, data, settings)
    before = mean(training.evaluate_projector(i2v, a, projector, data, "velocity", batches=6))
    after = mean(training.evaluate_projector(i2v, a, outcome.bundle, data, "velocity", batches=6))
    assert after < before, (before, after)
    trained = outcome.bundle.bank.state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in projector.bank.state_dict().items())


def test_kv_loss_trains_toward_the_sharer_cache(train, training, pack, helpers, models, t2v_set):
    a, b = models["a"], models["b"]
    projector = helpers.make_projector(pack, b, a, "gating")
    settings = train.TrainSettings(loss="kv", steps=30, batch_size=2, lr=3e-2, checkpoint_every=0)
    outcome = training.train_projector(b, a, projector, t2v_set, settings)
    before = mean(training.evaluate_projector(b, a, projector, t2v_set, "kv", batches=4))
    after = mean(training.evaluate_projector(b, a, outcome.bundle, t2v_set, "kv", batches=4))
    assert after < 0.7 * before, (before, after)


def test_gradients_reach_only_the_projector_bank(train, training, pack, helpers, models, t2v_set):
    a, b = models["a"], models["b"]
    projector = helpers.make_projector(pack, b, a, "c2c")
    flags = [p.requires_grad for p in a.model.parameters()]
    with torch.inference_mode(False), torch.enable_grad():
        bank = train.trainable_copy(projector).train()
        pair = training.TrainingPair(b, a, bank, projector.layer_map)
        feed = training.SampleBatches(t2v_set, pair, batch_size=2, seed=0)
        with pair.session():
            assert not any(p.requires_grad for p in a.model.parameters())
            prediction, target, _ = pair.velocity(feed(0)[0])
            torch.nn.functional.mse_loss(prediction, target).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bank.parameters())
    assert sum(float(p.grad.abs().sum()) for p in bank.parameters()) > 0
    assert all(p.grad is None for p in a.model.parameters()) and all(p.grad is None for p in b.model.parameters())
    assert [p.requires_grad for p in a.model.parameters()] == flags


def test_training_leaves_both_models_unchanged(train, training, pack, helpers, models, t2v_set):
    from bridge_helpers import ksample, model_options_snapshot
    from comfy_test_nodes import wan_conditioning
    a, b = models["a"], models["b"]
    pos, neg = wan_conditioning(1), wan_conditioning(2, length=5)
    stock = ksample(a, pos, neg)
    weights = helpers.weights_of(a), helpers.weights_of(b)
    options = model_options_snapshot(a), model_options_snapshot(b)
    settings = train.TrainSettings(loss="velocity", steps=3, batch_size=1, lr=1e-3, checkpoint_every=0)
    training.train_projector(b, a, helpers.make_projector(pack, b, a, "c2c"), t2v_set, settings)
    assert (model_options_snapshot(a), model_options_snapshot(b)) == options
    for before, model in zip(weights, (a, b)):
        after = helpers.weights_of(model)
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(ksample(a, pos, neg), stock)


class Killed(Exception):
    pass


def test_kill_and_resume_gives_bit_identical_weights(train, training, pack, helpers, models, t2v_set, tmp_path):
    a, b = models["a"], models["b"]
    projector = helpers.make_projector(pack, b, a, "c2c")
    settings = train.TrainSettings(loss="velocity", steps=7, batch_size=2, lr=1e-3, warmup_steps=2,
                                      checkpoint_every=2, checkpoint_dir=tmp_path / "whole", seed=5,
                                      negative_share=0.5)
    whole = training.train_projector(b, a, projector, t2v_set, settings, checkpoint_dir=tmp_path / "whole")

    def kill_at_step_5(done, total, loss):
        if done == 5:
            raise Killed()

    with pytest.raises(Killed):
        training.train_projector(b, a, projector, t2v_set, settings, checkpoint_dir=tmp_path / "killed",
                                 progress=kill_at_step_5)
    assert sorted(p.name for p in (tmp_path / "killed").iterdir())[-1] == "step_000004.state.safetensors"
    resumed = training.train_projector(b, a, projector, t2v_set, settings, checkpoint_dir=tmp_path / "killed")
    assert resumed.resumed_at == 4
    assert resumed.losses == whole.losses
    expected, got = whole.bundle.bank.state_dict(), resumed.bundle.bank.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_off_starts_over_and_other_settings_are_refused(train, training, pack, helpers, models, t2v_set, tmp_path):
    from c2c_core import ResumeError
    a, b = models["a"], models["b"]
    projector = helpers.make_projector(pack, b, a, "c2c")
    settings = train.TrainSettings(loss="velocity", steps=2, batch_size=1, checkpoint_every=1, checkpoint_dir=tmp_path)
    training.train_projector(b, a, projector, t2v_set, settings, checkpoint_dir=tmp_path)
    longer = train.TrainSettings(loss="velocity", steps=3, batch_size=1, checkpoint_every=1, checkpoint_dir=tmp_path)
    with pytest.raises(ResumeError, match="different training config"):
        training.train_projector(b, a, projector, t2v_set, longer, checkpoint_dir=tmp_path)
    fresh = training.train_projector(b, a, projector, t2v_set, longer, checkpoint_dir=tmp_path, resume=False)
    assert fresh.resumed_at == 0 and len(fresh.losses) == 3


def test_sample_files_round_trip_i2v_conditioning_without_pickle(samples, training, i2v_folder):
    from comfy_test_nodes import clip_vision_features
    data = training.open_training_set(i2v_folder)
    assert len(data) == 3
    path = data.paths[0]
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    meta = json.loads(header["__metadata__"][samples.SAMPLE_KEY])
    assert (meta["format_version"], meta["host"]) == (2, "comfyui")
    assert sorted(meta["roles"]["sharer_positive"]["tensors"]) == ["clip_vision_output", "concat_latent_image",
                                                                   "concat_mask", "cross_attn"]
    sample = data[0]
    extras = training.conditioning(sample.roles["sharer_positive"])[0][1]
    assert torch.equal(extras["clip_vision_output"].penultimate_hidden_states, clip_vision_features(300))
    assert torch.equal(extras["concat_latent_image"][:, :, :1], sample.latent[:, :, :1])
    assert extras["concat_mask"].shape == (1, 1, 3, 8, 8) and float(extras["concat_mask"][0, 0, 0].max()) == 0.0
    assert training.conditioning(sample.roles["receiver_positive"])[0][1] == {}


def test_format_1_samples_written_by_earlier_versions_still_load(samples, training, i2v_folder, tmp_path):
    """A sample as the pack wrote it before format 2 (tensors ``<role>.0.<name>``, per role a list of one
    entry) gives the same latent and CONDITIONING as the format-2 file of the same data."""
    from c2c_core import save_tensors_with_meta
    new = training.open_training_set(i2v_folder)[0]
    tensors, roles = {"latent": new.latent}, {}
    for role, cond in new.roles.items():
        names = set(cond.tensors)
        lists = {n.rsplit(".", 1)[0] for n in names if n.rsplit(".", 1)[-1].isdigit()}
        roles[role] = [{"cross_attn": "cross_attn" in names, "clip_vision_output": "clip_vision_output" in names,
                        "tensors": sorted(names - {"cross_attn", "clip_vision_output"}
                                          - {n for n in names if n.rsplit(".", 1)[0] in lists}),
                        "tensor_lists": {k: sum(n.startswith(k + ".") for n in names) for k in lists},
                        "values": cond.values}]
        tensors.update({f"{role}.0.{n}": t for n, t in cond.tensors.items()})
    save_tensors_with_meta(tmp_path / "sample_00001.safetensors", tensors,
                           {"format_version": 1, "latent_shape": list(new.latent.shape), "roles": roles, "dropped": []},
                           samples.SAMPLE_KEY)
    old = training.open_training_set(tmp_path)[0]
    assert torch.equal(old.latent, new.latent)
    for role in samples.ROLES:
        (a, ea), = training.conditioning(old.roles[role])
        (b, eb), = training.conditioning(new.roles[role])
        assert torch.equal(a, b) and ea.keys() == eb.keys()
        for key in ea:
            x, y = ea[key], eb[key]
            if key == "clip_vision_output":
                x, y = x.penultimate_hidden_states, y.penultimate_hidden_states
            assert torch.equal(x, y) if torch.is_tensor(x) else x == y, (role, key)


def test_a_batch_of_latents_becomes_one_file_each(samples, training, tmp_path):
    from comfy_test_nodes import wan_conditioning
    conds = {role: wan_conditioning(i) for i, role in enumerate(samples.ROLES)}
    training.save_training_samples(tmp_path, torch.randn(3, 16, 2, 4, 4), conds)
    training.save_training_samples(tmp_path, torch.randn(1, 16, 2, 4, 4), conds)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"sample_0000{i}.safetensors" for i in range(1, 5)]
    assert [tuple(training.open_training_set(tmp_path)[i].latent.shape) for i in range(4)] == [(1, 16, 2, 4, 4)] * 4


def test_batches_are_a_pure_function_of_seed_and_step(train, training, pack, helpers, models, t2v_set):
    a, b = models["a"], models["b"]
    projector = helpers.make_projector(pack, b, a, "c2c")
    with torch.inference_mode(False):
        pair = training.TrainingPair(b, a, train.trainable_copy(projector), projector.layer_map)
        first = training.SampleBatches(t2v_set, pair, batch_size=3, seed=9)
        torch.manual_seed(123)
        x = [bt.x_t for bt in first(4)]
        torch.manual_seed(456)
        again = [bt.x_t for bt in training.SampleBatches(t2v_set, pair, batch_size=3, seed=9)(4)]
        other_rank = [bt.x_t for bt in training.SampleBatches(t2v_set, pair, 3, 9, rank=1, world=2)(4)]
    assert all(torch.equal(p, q) for p, q in zip(x, again))
    assert not torch.equal(torch.cat(x), torch.cat(other_rank))


@pytest.mark.parametrize("scale_t", [None, 7.0])
def test_a_training_step_fuses_exactly_as_inference_and_only_the_bank_gets_gradients(train, 
        training, pack, helpers, models, t2v_set, monkeypatch, scale_t):
    """One fusion path: every fused K/V of a training forward equals what the bridge's inference
    FusionRun (built as c2c_comfy.bridge.BridgeRun builds it, from the untouched input projector)
    gives for the same receiver and sharer K/V at the same strength, bit for bit; also for a sharer
    with ScaleROPE (ChronoEdit's scale_t 7), whose keys both paths re-rotate."""
    import host
    from dit_cache_bridge.c2c_comfy import compat
    from c2c_core import FusionSchedule
    from c2c_core.runtime import BankCache, FusionRun
    a, b = models["a"], models["b"]
    if scale_t is not None:
        ScaleROPE = host.core_node("comfy_extras.nodes_rope", "ScaleROPE")
        b = host.run_node(ScaleROPE, b, 1.0, 0.0, 1.0, 0.0, scale_t, 0.0)[0]
        assert compat.rope_spec(b) != compat.rope_spec(a), "the sharer's keys need re-rotation"
    projector = helpers.make_projector(pack, b, a, "full", hidden_dim=32)
    calls = []
    real_fuse = FusionRun.fuse_tokens        # the host path: blend(sharer_part(...)), in the host's K/V layout

    def spy(run, layer, k, v, sk, sv, key=None):
        k2, v2 = real_fuse(run, layer, k, v, sk, sv, key)
        calls.append((layer, *(t.detach().clone() for t in (k, v, sk, sv, k2, v2)), k2.requires_grad))
        return k2, v2

    monkeypatch.setattr(FusionRun, "fuse_tokens", spy)
    strength = 0.7
    with torch.inference_mode(False), torch.enable_grad():
        bank = train.trainable_copy(projector).train()
        pair = training.TrainingPair(b, a, bank, projector.layer_map, strength)
        batch = training.SampleBatches(t2v_set, pair, batch_size=2, seed=0)(0)[0]
        with pair.session():
            prediction, target, _ = pair.velocity(batch)
            torch.nn.functional.mse_loss(prediction, target).backward()
    assert sorted(layer for layer, *_ in calls) == projector.layer_map.layers
    assert all(requires_grad for *_, requires_grad in calls), "the fused K/V carry the bank's graph"
    grid = compat.token_grid(batch.x0.shape)
    model = a.model
    inference = FusionRun(projector, FusionSchedule(), strength, sharer_rope=compat.rope_spec(b),
                          receiver_rope=compat.rope_spec(a), sharer_grid=grid, receiver_grid=grid,
                          rope_alignment="auto", device=a.load_device,
                          dtype=model.manual_cast_dtype or model.get_dtype(), banks=BankCache(projector.bank))
    assert inference.begin_call(0.5)
    for layer, k, v, sk, sv, k2, v2, _ in calls:
        with torch.inference_mode():        # as ComfyUI runs a prompt
            ik, iv = real_fuse(inference, layer, k, v, sk, sv)
        assert not torch.equal(k2, k), "the strength is on: the fused keys differ from the receiver's"
        assert torch.equal(ik, k2) and torch.equal(iv, v2), f"layer {layer}: training and inference fuse differently"
    grads = [p.grad for p in bank.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads), "every projector parameter gets a non-zero gradient"
    assert all(p.grad is None for p in a.model.parameters()) and all(p.grad is None for p in b.model.parameters())
