"""A trained bundle names the architectures of the pair it was trained on (c2c_core.arch), even when
training started from a bundle saved before the tag existed."""
from __future__ import annotations

import dataclasses

import pytest

pytestmark = pytest.mark.usefixtures("comfy")


def test_training_an_untagged_projector_saves_a_tagged_bundle(train, training, pack, helpers, models, tmp_path):
    from dit_cache_bridge.c2c_comfy import compat
    from c2c_core import load_bundle
    a, b = models["a"], models["b"]
    projector = helpers.make_projector(pack, b, a, "gating", hidden_dim=8)
    bank = projector.bank
    bank.sharer, bank.receiver = (dataclasses.replace(bank.sharer, arch=None),
                                  dataclasses.replace(bank.receiver, arch=None))
    old = dataclasses.replace(projector, sharer=bank.sharer, receiver=bank.receiver)
    assert not old.tagged
    data = training.open_training_set(helpers.t2v_samples(training, tmp_path / "samples", count=2))
    settings = train.TrainSettings(loss="kv", steps=1, batch_size=1, lr=1e-3, checkpoint_every=0)
    outcome = training.train_projector(b, a, old, data, settings, output_path=tmp_path / "trained.safetensors")
    saved = load_bundle(outcome.output_path)
    assert saved.sharer.arch == compat.wan_signature(b).arch and saved.receiver.arch == compat.wan_signature(a).arch
    assert outcome.bundle.tagged
