"""An untrained learnable projector fuses random weights: the user is told, at fusion and in the run report."""
from __future__ import annotations

import logging

import pytest

from bridge_helpers import load_model, pack_nodes

pytestmark = pytest.mark.usefixtures("comfy")


@pytest.fixture(scope="module")
def models(tiny_models):
    import host
    return {"a": load_model(tiny_models.path(host.T2V_A)), "b": load_model(tiny_models.path(host.T2V_B))}


def create(models, kind):
    return pack_nodes().CreateC2CProjector.execute(models["b"], models["a"], kind, "identity", "all", 0.5, 0, 0).args[0]


def fuse(models, bundle):
    from comfy_test_nodes import wan_conditioning
    nodes = pack_nodes()
    src = nodes.CaptureKVCache.execute(models["b"], wan_conditioning(3), wan_conditioning(4)).args[0]
    return nodes.FuseCaches.execute(models["a"], src, bundle, 1.0, 0.0, 1.0).args[0]


@pytest.mark.parametrize("kind", ["gating", "full", "c2c", "auto"])
def test_fusing_a_fresh_learnable_projector_warns_that_it_is_untrained(models, kind, caplog):
    with caplog.at_level(logging.WARNING, logger="dit_cache_bridge"):
        fuse(models, create(models, kind))
    (record,) = [r for r in caplog.records if "untrained" in r.getMessage()]
    assert record.getMessage().startswith("Fuse Caches: untrained '")
    assert "Train C2C Projector" in record.getMessage()


@pytest.mark.parametrize("kind", ["identity", "weighted"])
def test_training_free_projectors_fuse_without_a_warning(models, kind, caplog):
    with caplog.at_level(logging.WARNING, logger="dit_cache_bridge"):
        fuse(models, create(models, kind))
    assert not [r for r in caplog.records if "untrained" in r.getMessage()]


def test_the_run_report_sent_to_the_inspector_carries_the_warning(models, monkeypatch):
    from dit_cache_bridge.nodes import fuse as fuse_module
    sent = []

    class Server:
        def send_sync(self, event, data):
            sent.append((event, data))

    import server
    monkeypatch.setattr(server.PromptServer, "instance", Server(), raising=False)
    reporter = fuse_module._reporter("7", ["untrained 'c2c' projector"])
    from dit_cache_bridge.c2c_comfy.bridge import Report
    reporter(Report(layers=[0]))
    assert sent == [("dit_cache_bridge.report", {"node": "7", "report": {**Report(layers=[0]).to_json(),
                                                                          "warnings": ["untrained 'c2c' projector"]}})]
