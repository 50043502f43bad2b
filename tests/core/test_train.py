"""Training: the loop learns what only the sharer knows, resumes bit-exactly, and refuses bad setups."""

import math

import pytest
import torch

from c2c_core import LayerMap, ModelSignature, ProjectorBank, ResumeError, TrainConfig, TrainError, distill_loss, kv_loss, read_meta, train_bank, velocity_loss
from c2c_core.tensorfile import read_header

SHARER = ModelSignature(num_layers=2, num_heads=2, head_dim=4, name="sharer")
RECEIVER = ModelSignature(num_layers=2, num_heads=1, head_dim=8, name="receiver")
LAYER_MAP = LayerMap.build("terminal", 2, 2, layers=[1])
WIDTH = 8


def _fixed(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / math.sqrt(shape[0])


A_RECEIVER, A_SHARER, READOUT, HIDDEN_EFFECT = (_fixed(s, WIDTH, WIDTH) for s in (101, 102, 103, 104))


def synthetic_batch(step: int) -> dict:
    """A step's batch: the receiver sees x, only the sharer's V carries the signal z."""
    g = torch.Generator().manual_seed(10_000 + step)
    x, z = torch.randn(4, 8, WIDTH, generator=g), torch.randn(4, 8, WIDTH, generator=g)
    v_receiver = (x @ A_RECEIVER).view(4, 8, 1, 8)
    v_sharer = (z @ A_SHARER).view(4, 8, 2, 4)
    target = v_receiver.view(4, 8, WIDTH) @ READOUT + z @ HIDDEN_EFFECT  # the "velocity" needs z
    return {"v_sharer": v_sharer, "v_receiver": v_receiver, "target": target}


def predict(bank, batch):
    """Toy receiver: its velocity is a fixed readout of its (fused) layer-1 V."""
    fused = bank.project(1, "v", batch["v_sharer"], batch["v_receiver"])
    return fused.reshape(4, 8, WIDTH) @ READOUT, batch["target"]


def fresh_bank(kind, seed=0, **hparams):
    torch.manual_seed(seed)
    return ProjectorBank.build(kind, SHARER, RECEIVER, LAYER_MAP.layers, **hparams)


@pytest.mark.parametrize("kind", ["c2c", "full"])
def test_training_learns_what_only_the_sharer_knows(kind):
    config = TrainConfig(steps=300, lr=3e-2, warmup_steps=10, weight_decay=0.0)
    result = train_bank(fresh_bank(kind, hidden_dim=32, num_layers=1), LAYER_MAP, synthetic_batch, velocity_loss(predict), config)
    initial, final = result.losses[0], sum(result.losses[-10:]) / 10
    assert len(result.losses) == 300
    assert final < 0.5 * initial, (initial, final)


def test_receiver_alone_cannot_reach_the_target():
    """Control for the test above: the loss is not trivially low without the sharer's signal."""
    batch = synthetic_batch(0)
    alone = torch.nn.functional.mse_loss(batch["v_receiver"].reshape(4, 8, WIDTH) @ READOUT, batch["target"])
    assert alone.item() > 0.3


def test_kv_loss_trains_a_projection_onto_target_kv():
    sig = ModelSignature(2, 1, 4)
    mix = _fixed(7, 4, 4)

    def batches(step):
        g = torch.Generator().manual_seed(step)
        s, r = torch.randn(2, 6, 1, 4, generator=g), torch.randn(2, 6, 1, 4, generator=g)
        return {1: {"k": (s, r, r + s @ mix), "v": (s, r, r - s)}}

    torch.manual_seed(0)
    bank = ProjectorBank.build("full", sig, sig, [1], hidden_dim=16, num_layers=1)
    losses = train_bank(bank, LayerMap.build("identity", 2, 2, layers=[1]), batches, kv_loss, TrainConfig(steps=80, lr=2e-2, loss="kv")).losses
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


def test_distill_loss_matches_the_teacher_without_its_gradient():
    teacher_calls = []

    def teacher(batch):
        teacher_calls.append(torch.is_grad_enabled())
        return batch["target"]

    loss_fn = distill_loss(lambda bank, batch: predict(bank, batch)[0], teacher)
    loss = loss_fn(fresh_bank("full", hidden_dim=4), synthetic_batch(0))
    assert loss.requires_grad and teacher_calls == [False]


def test_progress_gets_completed_steps_and_losses_and_temperature_anneals():
    seen, temps = [], []
    bank = fresh_bank("c2c", hidden_dim=4)
    config = TrainConfig(steps=4, tau_start=1.0, tau_end=0.001)

    def progress(done, loss):
        seen.append((done, loss))
        temps.append(float(bank.projector(1, "k").temperature))

    result = train_bank(bank, LAYER_MAP, synthetic_batch, velocity_loss(predict), config, progress=progress)
    assert [d for d, _ in seen] == [1, 2, 3, 4] and [l for _, l in seen] == result.losses
    assert temps == pytest.approx([1.0, 0.1, 0.01, 0.001])
    assert not bank.training


def test_lr_schedule_warms_up_then_decays_without_reaching_zero():
    config = TrainConfig(steps=10, lr=1.0, warmup_steps=2, decay="cosine")
    lrs = [config.lr_at(s) for s in range(10)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0
    assert TrainConfig(steps=4, lr=1.0, decay="linear").lr_at(2) == pytest.approx(0.5)
    assert TrainConfig(steps=4, lr=1.0, decay="constant").lr_at(3) == 1.0


# -- checkpoints and resume ----------------------------------------------------------------------


class Interrupted(Exception):
    pass


def run(config, resume=None, stop_at=None):
    bank = fresh_bank("c2c", hidden_dim=8)  # c2c: its Gumbel gate consumes RNG every step

    def progress(done, loss):
        if done == stop_at:
            raise Interrupted

    return train_bank(bank, LAYER_MAP, synthetic_batch, velocity_loss(predict), config, resume=resume, progress=progress)


@pytest.mark.parametrize("stop_at", [5, 6])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path, stop_at):
    def config(folder):
        return TrainConfig(steps=10, lr=1e-2, warmup_steps=2, checkpoint_every=3, checkpoint_dir=str(tmp_path / folder), seed=7)

    straight = run(config("a"))
    with pytest.raises(Interrupted):
        run(config("b"), stop_at=stop_at)
    resumed = run(config("b"), resume=str(tmp_path / "b"))
    assert resumed.losses == straight.losses
    a, b = straight.bank.state_dict(), resumed.bank.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.last_checkpoint.endswith("step_000010.safetensors")


def test_checkpoints_are_bundles_plus_pickle_free_trainer_state(tmp_path):
    config = TrainConfig(steps=4, checkpoint_every=2, checkpoint_dir=str(tmp_path))
    run(config)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step_000002.safetensors", "step_000002.state.safetensors", "step_000004.safetensors", "step_000004.state.safetensors"]
    meta = read_meta(tmp_path / "step_000004.state.safetensors", "c2c_trainer_state")
    assert meta["step"] == 4 and len(meta["losses"]) == 4 and meta["bundle"] == "step_000004.safetensors"
    _, entries = read_header(tmp_path / "step_000004.state.safetensors")
    assert entries["rng.cpu"][1] == "U8" and any(n.endswith(".exp_avg") for n in entries)
    assert read_meta(tmp_path / "step_000004.safetensors", "c2c_bundle")["provenance"]["step"] == 4


def test_resume_refuses_a_different_config(tmp_path):
    run(TrainConfig(steps=4, checkpoint_every=2, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ResumeError, match=r"different training config \{'lr': \(0.0001, 0.001\)\}"):
        run(TrainConfig(steps=4, lr=1e-3, checkpoint_every=2, checkpoint_dir=str(tmp_path)), resume=str(tmp_path))


def test_resume_refuses_a_different_bank(tmp_path):
    run(TrainConfig(steps=2, checkpoint_every=2, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ResumeError, match="Build the same bank to resume"):
        train_bank(fresh_bank("full", hidden_dim=4), LAYER_MAP, synthetic_batch, velocity_loss(predict), TrainConfig(steps=2), resume=str(tmp_path))


def test_resume_from_a_folder_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(ResumeError, match="no step_NNNNNN.state.safetensors checkpoint"):
        run(TrainConfig(steps=2), resume=str(tmp_path))


def test_resume_from_a_bundle_without_state_is_refused(tmp_path):
    run(TrainConfig(steps=2, checkpoint_every=2, checkpoint_dir=str(tmp_path)))
    (tmp_path / "step_000002.state.safetensors").unlink()
    with pytest.raises(ResumeError, match="a bundle alone cannot resume training"):
        run(TrainConfig(steps=2), resume=str(tmp_path / "step_000002.safetensors"))


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps=0; expected an integer >= 1"),
        ({"steps": 5, "lr": 0.0}, "lr=0.0; expected a finite number > 0"),
        ({"steps": 5, "warmup_steps": 5}, "leaves no step after warm-up"),
        ({"steps": 5, "decay": "step"}, "decay='step'; expected one of"),
        ({"steps": 5, "checkpoint_every": 2}, "needs checkpoint_dir"),
        ({"steps": 5, "loss": "l1"}, "loss='l1'; expected one of"),
        ({"steps": 5, "tau_end": 0.0}, "tau_end=0.0; expected a finite number > 0"),
    ],
)
def test_bad_configs_are_rejected(kwargs, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig(**kwargs)


def test_bank_without_trainable_parameters_is_refused():
    torch.manual_seed(0)
    bank = ProjectorBank.build("identity", RECEIVER, RECEIVER, [1])
    with pytest.raises(TrainError, match="'identity' bank has no trainable parameters"):
        train_bank(bank, LAYER_MAP, synthetic_batch, kv_loss, TrainConfig(steps=1))


def test_loss_that_is_not_a_scalar_is_refused():
    with pytest.raises(TrainError, match=r"loss_fn returned Tensor \(4, 8, 8\); expected a scalar"):
        train_bank(fresh_bank("full", hidden_dim=4), LAYER_MAP, synthetic_batch, lambda bank, b: predict(bank, b)[0], TrainConfig(steps=1))


def test_non_finite_loss_stops_training():
    def nan_loss(bank, batch):
        return velocity_loss(predict)(bank, batch) * float("nan")

    with pytest.raises(TrainError, match="loss is nan at step 1"):
        train_bank(fresh_bank("full", hidden_dim=4), LAYER_MAP, synthetic_batch, nan_loss, TrainConfig(steps=2))


def test_map_and_bank_must_cover_the_same_layers():
    with pytest.raises(TrainError, match=r"bank layers \[1\] differ from the layer map's \[0, 1\]"):
        train_bank(fresh_bank("full", hidden_dim=4), LayerMap.build("identity", 2, 2), synthetic_batch, kv_loss, TrainConfig(steps=1))


# -- run_training: what the front ends add (checkpoint-folder policy, settings) ------------------------


def test_run_training_resumes_from_the_folder_and_says_where(tmp_path):
    from c2c_core.train import run_training

    config = TrainConfig(steps=6, lr=1e-2, checkpoint_every=2, checkpoint_dir=str(tmp_path / "run"), seed=3)
    straight = run_training(fresh_bank("c2c", hidden_dim=8), LAYER_MAP, synthetic_batch, velocity_loss(predict),
                            config, checkpoint_dir=tmp_path / "straight")
    seen = []

    def stop_at_3(done, total, loss):
        seen.append((done, total))
        if done == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_training(fresh_bank("c2c", hidden_dim=8), LAYER_MAP, synthetic_batch, velocity_loss(predict), config,
                     progress=stop_at_3)
    assert seen == [(1, 6), (2, 6), (3, 6)]
    resumed = run_training(fresh_bank("c2c", hidden_dim=8), LAYER_MAP, synthetic_batch, velocity_loss(predict), config)
    assert (straight.resumed_at, resumed.resumed_at) == (0, 2)
    assert resumed.losses == straight.losses
    assert all(torch.equal(v, resumed.bank.state_dict()[k]) for k, v in straight.bank.state_dict().items())


def test_run_training_without_resume_clears_only_the_checkpoints(tmp_path):
    from c2c_core.checkpoint import clear_checkpoints, has_checkpoint
    from c2c_core.train import run_training

    config = TrainConfig(steps=2, checkpoint_every=1, checkpoint_dir=str(tmp_path))
    run_training(fresh_bank("full", hidden_dim=8), LAYER_MAP, synthetic_batch, velocity_loss(predict), config)
    (tmp_path / "notes.txt").write_text("mine")
    assert has_checkpoint(tmp_path) and not has_checkpoint(tmp_path / "nowhere")
    again = run_training(fresh_bank("full", hidden_dim=8), LAYER_MAP, synthetic_batch, velocity_loss(predict), config,
                         resume=False)
    assert again.resumed_at == 0 and len(again.losses) == 2
    clear_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_train_settings_check_what_feeding_needs():
    from c2c_core.train import TrainSettings

    with pytest.raises(TrainError, match=r"TrainConfig.batch_size=0; expected an integer >= 1"):
        TrainSettings(steps=2, batch_size=0)
    with pytest.raises(TrainError, match=r"TrainConfig.negative_share=1.5; expected a number in \[0, 1\]"):
        TrainSettings(steps=2, negative_share=1.5)


def test_trainable_copy_is_a_fresh_float32_bank_with_the_same_weights():
    from c2c_core.bundle import ProjectorBundle
    from c2c_core.train import trainable_copy

    bank = fresh_bank("full", hidden_dim=8)
    with torch.inference_mode():
        frozen = ProjectorBank.build("full", SHARER, RECEIVER, LAYER_MAP.layers, hidden_dim=8)
        frozen.load_state_dict(bank.state_dict())
    copy = trainable_copy(ProjectorBundle(bank=frozen.half(), layer_map=LAYER_MAP, sharer=SHARER, receiver=RECEIVER))
    assert all(p.dtype == torch.float32 and not p.is_inference() for p in copy.parameters())
    assert all(torch.equal(v.half().float(), copy.state_dict()[k]) for k, v in bank.state_dict().items())
