"""Bidirectional fusion's backward direction (c2c_comfy/lockstep.py) on the real ComfyUI host: it fuses
through c2c_core.runtime.FusionRun like the forward, with its bank a model ComfyUI loads with the run."""
from __future__ import annotations

import pytest
import torch

from bridge_helpers import ksample, load_model, pack_nodes

pytestmark = pytest.mark.usefixtures("comfy")


@pytest.fixture(scope="module")
def models(tiny_models):
    import host
    return {"a": load_model(tiny_models.path(host.T2V_A)), "b": load_model(tiny_models.path(host.T2V_B))}


@pytest.fixture(scope="module")
def conds():
    from comfy_test_nodes import wan_conditioning
    return {"pos": wan_conditioning(1), "neg": wan_conditioning(2, length=5),
            "sharer_pos": wan_conditioning(3), "sharer_neg": wan_conditioning(4, length=5)}


def projector(sharer, receiver):
    return pack_nodes().CreateC2CProjector.execute(sharer, receiver, "weighted", "identity", "all", alpha=0.5,
                                                   hidden_dim=0, seed=0).args[0]


def test_backward_fuses_through_a_fusion_run_on_the_bank_comfyui_loaded(models, conds, monkeypatch):
    import comfy.model_management as mm
    pack_nodes()
    from dit_cache_bridge.c2c_comfy import compat, live, lockstep
    a, b = models["a"], models["b"]
    backward = projector(a, b)
    src = live.LiveSharer(model=b, positive=conds["sharer_pos"], negative=conds["sharer_neg"],
                          signature=compat.wan_signature(b), backward=backward, backward_strength=0.7)
    patched = pack_nodes().FuseCaches.execute(a, src, projector(b, a), 1.0, 0.0, 1.0, "constant", "").args[0]
    (key, banks), = src.backward_banks.items()
    bank_module = banks.bank
    assert bank_module is not backward.bank                         # the user's bundle is never moved

    runs, loaded = [], []

    class Recorded(lockstep.FusionRun):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runs.append(self)
    monkeypatch.setattr(lockstep, "FusionRun", Recorded)
    real = mm.load_models_gpu

    def spy(models_to_load, *args, **kwargs):
        loaded.extend(m.model for m in models_to_load)
        return real(models_to_load, *args, **kwargs)
    monkeypatch.setattr(mm, "load_models_gpu", spy)
    ksample(patched, conds["pos"], conds["neg"])

    assert any(m is bank_module for m in loaded)                     # loaded, counted and offloaded by ComfyUI
    (run,) = runs                                                    # one backward FusionRun per sampling run
    assert run.bank is bank_module                                   # used in place, not copied
    assert run.bundle is backward and run.calls > 0
    assert set(run.layers) == set(backward.layer_map.pairs)
    assert all(run.strength(layer) == pytest.approx(0.7 * backward.layer_map.strength(layer)) for layer in run.layers)
    assert run.stats is False and not run.close().nonfinite_layers
