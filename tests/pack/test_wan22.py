"""Wan2.2 (issue 14): TI2V-5B (48-channel latent) bridges with its own kind, and is refused, by the node
that owns the input, when paired with a Wan2.1-latent model (16 channels).

The tiny TI2V stand-in has the TI2V-5B layout (in/out_dim 48), so ComfyUI loads it as WAN22 with the
Wan22 latent format. A14B high/low-noise experts load as plain Wan2.1 (16 channels) and are covered by
the Wan2.1 tests.
"""
from __future__ import annotations

import pytest
import torch

from bridge_helpers import ksample, load_model, pack_nodes

pytestmark = pytest.mark.usefixtures("comfy")

LATENT_48 = (1, 48, 2, 8, 8)
LATENT_16 = (1, 16, 2, 8, 8)
SAMPLING = dict(seed=3, steps=3, cfg=4.0, sampler_name="euler", scheduler="simple")


@pytest.fixture(scope="module")
def models(tiny_models):
    import host
    return {"ti2v": load_model(tiny_models.path(host.TI2V)), "ti2v_again": load_model(tiny_models.path(host.TI2V)),
            "wan21": load_model(tiny_models.path(host.T2V_A))}


@pytest.fixture(scope="module")
def conds():
    from comfy_test_nodes import wan_conditioning
    return {"pos": wan_conditioning(1), "neg": wan_conditioning(2, length=5),
            "sharer_pos": wan_conditioning(3), "sharer_neg": wan_conditioning(4, length=5)}


def latent(shape):
    return {"samples": torch.zeros(shape)}


def projector(sharer, receiver):
    return pack_nodes().CreateC2CProjector.execute(sharer, receiver, "identity", "identity", "all", 0.5, 0, 0).args[0]


def bridged_ksampler(receiver, sharer, c, lat, strength=1.0, sharer_pos=None, sharer_neg=None):
    s = SAMPLING
    return pack_nodes().BridgedKSampler.execute(
        receiver, c["pos"], c["neg"], sharer, sharer_pos or c["pos"], sharer_neg or c["neg"],
        projector(sharer, receiver), strength, 0.0, 1.0, s["seed"], s["steps"], s["cfg"], s["sampler_name"],
        s["scheduler"], lat).args[0]["samples"]


def test_tiny_ti2v_loads_as_wan22_with_a_48_channel_latent(models):
    import comfy.model_base
    assert type(models["ti2v"].model) is comfy.model_base.WAN22
    assert models["ti2v"].model.latent_format.latent_channels == 48
    assert models["wan21"].model.latent_format.latent_channels == 16


def test_ti2v_identity_twin_at_strength_1_is_stock_bit_for_bit(models, conds):
    stock = ksample(models["ti2v"], conds["pos"], conds["neg"], cfg=4.0, seed=3, steps=3, latent=latent(LATENT_48))
    out = bridged_ksampler(models["ti2v"], models["ti2v_again"], conds, latent(LATENT_48))
    assert torch.equal(out, stock)


def test_ti2v_sharer_prompt_changes_the_output(models, conds):
    stock = ksample(models["ti2v"], conds["pos"], conds["neg"], cfg=4.0, seed=3, steps=3, latent=latent(LATENT_48))
    out = bridged_ksampler(models["ti2v"], models["ti2v_again"], conds, latent(LATENT_48),
                           sharer_pos=conds["sharer_pos"], sharer_neg=conds["sharer_neg"])
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, stock, atol=1e-3)


# --- a Wan2.2 (48-channel) model paired with a Wan2.1-latent (16-channel) model -------------------
def capture_and_fuse(receiver, sharer, c):
    nodes = pack_nodes()
    source = nodes.CaptureKVCache.execute(sharer, c["sharer_pos"], c["sharer_neg"]).args[0]
    return nodes.FuseCaches.execute(receiver, source, projector(sharer, receiver), 1.0, 0.0, 1.0).args[0]


@pytest.mark.parametrize("receiver, sharer, lat", [("ti2v", "wan21", LATENT_48), ("wan21", "ti2v", LATENT_16)])
def test_bridged_ksampler_refuses_a_sharer_of_another_latent_format(models, conds, receiver, sharer, lat):
    pack_nodes()
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    with pytest.raises(BridgeInputError) as e:
        bridged_ksampler(models[receiver], models[sharer], conds, latent(lat))
    message = str(e.value)
    assert (e.value.node, e.value.input_name) == ("Bridged KSampler", "sharer")
    assert "48" in message and "16" in message and "latent" in message


@pytest.mark.parametrize("receiver, sharer", [("ti2v", "wan21"), ("wan21", "ti2v")])
def test_fuse_caches_refuses_a_live_capture_of_another_latent_format(models, conds, receiver, sharer):
    pack_nodes()
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    with pytest.raises(BridgeInputError) as e:
        capture_and_fuse(models[receiver], models[sharer], conds)
    message = str(e.value)
    assert (e.value.node, e.value.input_name) == ("Fuse Caches", "model")
    assert "48" in message and "16" in message and "latent" in message


def test_the_refusal_says_what_was_found_and_the_fix(models, conds):
    with pytest.raises(ValueError) as e:
        bridged_ksampler(models["ti2v"], models["wan21"], conds, latent(LATENT_48))
    assert str(e.value).startswith("Bridged KSampler › sharer: a sharer that samples the Wan21 latent (16 channels), "
                                   "but the receiver samples the Wan22 latent (48 channels); expected a sharer and a "
                                   "receiver of one latent format")
    assert "Fix: pair Wan2.2-TI2V-5B only with Wan2.2-TI2V-5B" in str(e.value)


@pytest.mark.parametrize("sharer, lat", [("wan21", LATENT_48), ("ti2v", LATENT_16)])
def test_record_kv_cache_refuses_a_latent_of_another_format(models, conds, sharer, lat):
    pack_nodes()
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    with pytest.raises(BridgeInputError, match=r"Record KV Cache › latent_image: a latent of shape \(1, "
                       f"{lat[1]}, 2, 8, 8\\); expected the sharer's Wan2\\d latent") as e:
        pack_nodes().RecordKVCache.execute(models[sharer], conds["sharer_pos"], conds["sharer_neg"], latent(lat),
                                           layers="all", storage_dtype="fp32", storage="ram", denoise=1.0, **SAMPLING)
    assert e.value.input_name == "latent_image"


def test_record_kv_cache_records_a_ti2v_sharer(models, conds):
    source = pack_nodes().RecordKVCache.execute(models["ti2v"], conds["sharer_pos"], conds["sharer_neg"],
                                                latent(LATENT_48), layers="all", storage_dtype="fp32", storage="ram",
                                                denoise=1.0, **SAMPLING).args[0]
    fused = pack_nodes().FuseCaches.execute(models["ti2v_again"], source, projector(models["ti2v"], models["ti2v"]),
                                            1.0, 0.0, 1.0).args[0]
    stock = ksample(models["ti2v"], conds["pos"], conds["neg"], cfg=4.0, seed=3, steps=3, latent=latent(LATENT_48))
    out = ksample(fused, conds["pos"], conds["neg"], cfg=4.0, seed=3, steps=3, latent=latent(LATENT_48))
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, stock, atol=1e-3)
