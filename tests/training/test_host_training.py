"""Training on every supported host: ComfyUI's training mode is entered where the host has one, and a
host whose RoPE cannot be trained through is refused before the first step, naming host and fix."""
from __future__ import annotations

import importlib

import pytest
import torch

pytestmark = pytest.mark.usefixtures("comfy")


@pytest.fixture(scope="module")
def compat(pack):
    return importlib.import_module("dit_cache_bridge.c2c_comfy.compat")


def test_training_mode_switches_the_hosts_flag_on_and_back(compat):
    import comfy.model_management as mm

    has_switch = hasattr(mm, "in_training")
    with compat.training_mode() as switched:
        assert switched == has_switch
        assert getattr(mm, "in_training", True) is True
    assert getattr(mm, "in_training", False) is False


def test_wans_rope_has_a_gradient_in_training_mode(compat):
    with torch.inference_mode(False), torch.enable_grad(), compat.training_mode():
        compat.check_rope_gradient()


def test_rope_kernel_without_gradient_is_what_training_mode_avoids(compat):
    """Where the host's inference RoPE kernel has no gradient, the probe catches it outside training mode."""
    with torch.enable_grad():
        try:
            compat.check_rope_gradient()
        except compat.HostFeatureMissing as e:
            assert compat.host_version() in str(e) and "Fix:" in str(e)
            return
    pytest.skip("this host's RoPE has a gradient even outside training mode (no kernel to avoid)")


def test_training_on_a_host_without_a_differentiable_rope_fails_before_the_first_step(train, 
        compat, training, pack, helpers, models, tmp_path, monkeypatch):
    import comfy.ldm.wan.model as wan_model
    import comfy.model_management as mm

    monkeypatch.setattr(wan_model, "apply_rope1", lambda x, freqs: x.detach() * 1.0)   # a kernel without autograd
    monkeypatch.delattr(mm, "in_training", raising=False)                                # and no switch
    data = training.open_training_set(helpers.t2v_samples(training, tmp_path / "samples", count=1))
    projector = helpers.make_projector(pack, models["b"], models["a"], "c2c")
    steps = []
    with pytest.raises(compat.HostFeatureMissing) as refused:
        training.train_projector(models["b"], models["a"], projector, data,
                                 train.TrainSettings(loss="velocity", steps=2),
                                 progress=lambda done, total, loss: steps.append(done))
    message = str(refused.value)
    assert f"ComfyUI {compat.host_version()}" in message and "no training switch" in message and "Fix:" in message
    assert steps == []
