"""Memory ComfyUI can see (c2c_comfy/memory.py): the arithmetic, the reservation during model loading,
and the refusal of a recording that cannot fit — checked with numbers, the last two on the real host."""
from __future__ import annotations

import pytest
import torch

from bridge_helpers import ksample, load_model, pack_nodes

pytestmark = pytest.mark.usefixtures("comfy")

GB = 1024 ** 3
TOKENS_480P_81F = 21 * 30 * 52      # Wan2.1 480p (832x480), 81 frames: 21 latent frames, 60x104 latent, 2x2 patches


def memory():
    pack_nodes()
    from dit_cache_bridge.c2c_comfy import memory as m
    return m


def test_one_layer_of_14b_kv_at_480p_81_frames_with_batched_cfg_is_1_25_gb():
    per_layer = memory().kv_layer_bytes(TOKENS_480P_81F, heads=40, head_dim=128, chunks=2, itemsize=2)
    assert per_layer == 2 * 2 * 32760 * 5120 * 2 == 1_341_849_600


def test_lockstep_holds_one_layer_where_buffered_holds_every_fused_layer():
    """Both live modes run the sharer inside a receiver call (lockstep: suspended in its block; buffered: nested in
    the receiver's first fused block, where the refresh decision is made), so the sharer's whole activations count
    in both, not only their excess over the receiver's."""
    m = memory()
    common = dict(tokens=TOKENS_480P_81F, chunks=2, sharer_heads=40, sharer_head_dim=128, sharer_layers=40,
                  itemsize=2, bank=0, sharer_activations=10 * GB)
    lockstep, buffered = m.live_estimate(streaming=True, **common), m.live_estimate(streaming=False, **common)
    assert lockstep.captured_kv == 1_341_849_600 and lockstep.sharer_activations == 10 * GB
    assert buffered.captured_kv == 40 * 1_341_849_600 and buffered.sharer_activations == 10 * GB
    assert round(buffered.captured_kv / GB, 1) == 50.0 and buffered.projected_kv == 0
    reused = m.live_estimate(streaming=False, projected=5 * GB, **common)
    assert reused.total == 10 * GB + 40 * 1_341_849_600 + 5 * GB
    assert "projected kv 5.00 GB" in reused.describe()


def test_kept_projections_of_a_14b_c2c_bank_at_480p_are_5_gb():
    """Reused K/V keep each fused layer's projected sharer side: K and V x 2 chunks x 32,760 tokens x the c2c
    projector's hidden width (512 here) x bf16, over 40 layers. Probed on a bank built on "meta" (no memory)."""
    import torch
    from c2c_core import ModelSignature, ProjectorBank
    sig = ModelSignature(num_layers=40, num_heads=40, head_dim=128, name="wan14b")
    with torch.device("meta"):
        bank = ProjectorBank.build("c2c", sig, sig, list(range(40)), hidden_dim=512)
    kept = memory().projected_bytes(bank, range(40), tokens=TOKENS_480P_81F, chunks=2, itemsize=2)
    assert kept == 40 * 2 * 2 * TOKENS_480P_81F * 512 * 2 == 5_367_398_400
    assert round(kept / GB, 2) == 5.0


@pytest.mark.parametrize("kind, hparams, width", [("identity", {}, 24), ("weighted", {"alpha": 0.5}, 24),
                                                  ("full", {"hidden_dim": 8}, 36), ("c2c", {"hidden_dim": 16}, 16),
                                                  ("gating", {"hidden_dim": 8}, 24)])
def test_kept_projections_are_as_wide_as_each_projectors_sharer_side(kind, hparams, width):
    """Per token and K or V: the aligned sharer (2 x 12) unless the projector computes a sharer side: full's MLP
    output in the receiver's width (3 x 12), c2c's in_sharer branch (its hidden width)."""
    from c2c_core import ModelSignature, ProjectorBank
    sharer = ModelSignature(num_layers=3, num_heads=2, head_dim=12)
    receiver = ModelSignature(num_layers=3, num_heads=3 if kind in ("full", "c2c") else 2, head_dim=12)
    bank = ProjectorBank.build(kind, sharer, receiver, [1, 2], **hparams).eval()
    if kind == "c2c":
        for layer in (1, 2):
            for which in ("k", "v"):
                bank.projector(layer, which).set_gate_logit(1.0)       # an open gate computes its sharer side
    assert memory().projected_bytes(bank, [1, 2], tokens=10, chunks=2, itemsize=4) == 2 * 2 * width * 2 * 10 * 4


def test_recording_every_14b_layer_over_20_steps_is_a_terabyte_and_is_refused():
    m = memory()
    size = m.recording_bytes(steps=20, chunks=2, layers=40, tokens=TOKENS_480P_81F, heads=40, head_dim=128,
                             storage_dtype="bf16")
    assert size == 20 * 40 * 1_341_849_600
    assert 999 < size / GB < 1000
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    with pytest.raises(BridgeInputError) as e:
        m.check_recording_fits("Record KV Cache", size, "ram", available=64 * GB)
    text = str(e.value)
    assert "Record KV Cache" in text and "layers" in text and "999.76 GB" in text and "64.00 GB free" in text
    m.check_recording_fits("Record KV Cache", 10 * GB, "ram", available=64 * GB)


def test_fp8_recording_is_a_quarter_of_fp32_plus_scales():
    m = memory()
    args = dict(steps=2, chunks=2, layers=3, tokens=48, heads=2, head_dim=128)
    fp32 = m.recording_bytes(storage_dtype="fp32", **args)
    assert m.recording_bytes(storage_dtype="fp8_e4m3fn", **args) == fp32 // 4 + 2 * 2 * 3 * 2 * 4


@pytest.fixture(scope="module")
def models(tiny_models):
    import host
    return {"a": load_model(tiny_models.path(host.T2V_A)), "b": load_model(tiny_models.path(host.T2V_B))}


@pytest.fixture(scope="module")
def conds():
    from comfy_test_nodes import wan_conditioning
    return {"pos": wan_conditioning(1), "neg": wan_conditioning(2, length=5)}


def bridged(models, conds, streaming, refresh=None):
    nodes = pack_nodes()
    a, b = models["a"], models["b"]
    proj = nodes.CreateC2CProjector.execute(b, a, "weighted", "identity", "all", alpha=0.5, hidden_dim=0,
                                            seed=0).args[0]
    from dit_cache_bridge.c2c_comfy import compat
    from dit_cache_bridge.c2c_comfy.live import LiveSharer
    from c2c_core import RefreshPolicy
    src = LiveSharer(model=b, positive=conds["pos"], negative=conds["neg"], signature=compat.wan_signature(b),
                     streaming=streaming, refresh=refresh or RefreshPolicy())
    return nodes.FuseCaches.execute(a, src, proj, 1.0, 0.0, 1.0, "constant", "").args[0], proj


@pytest.mark.parametrize("streaming, every", [(True, 1), (False, 1), (False, 2)],
                         ids=["lockstep", "buffered", "buffered_reusing"])
def test_models_are_loaded_with_the_bridged_runs_extra_memory_reserved(models, conds, monkeypatch, streaming, every):
    import comfy.model_management as mm
    from c2c_core import RefreshPolicy
    patched, proj = bridged(models, conds, streaming, RefreshPolicy(every=every))
    seen = []
    real = mm.load_models_gpu

    def spy(*args, **kwargs):
        seen.append(mm.extra_reserved_memory())
        return real(*args, **kwargs)
    monkeypatch.setattr(mm, "load_models_gpu", spy)
    before = mm.extra_reserved_memory()
    ksample(patched, conds["pos"], conds["neg"])
    assert mm.extra_reserved_memory() == before

    layer = 2 * 2 * 48 * 256 * 4                                    # K + V, 2 chunks, 48 tokens, 2 x 128, fp32
    activations = int(models["b"].model.memory_required([2, 16, 3, 8, 8]))
    # the sharer's whole forward runs inside a receiver call in both modes (buffered: nested in the first fused block)
    expected = activations + (layer if streaming else 2 * layer)
    if every > 1:
        expected += 2 * layer               # the weighted projector keeps the aligned K/V of both fused layers
    assert seen == [before + expected]                              # the bank is a model ComfyUI counts itself
    wrappers = patched.wrappers["outer_sample"]
    report = wrappers[next(k for k in wrappers if k.startswith("dit_cache_bridge"))][0].__self__.last_report
    # what the run really held stays within the reservation (here below it: prompts of different lengths make
    # ComfyUI call the two CFG chunks separately, and the estimate counts them batched)
    assert 0 < report.peak_kv_bytes <= (layer if streaming else 2 * layer)
    assert (0 < report.cached_kv_bytes <= 2 * layer) if every > 1 else report.cached_kv_bytes == 0


def test_the_projector_bank_is_a_model_comfyui_loads_with_the_run(models, conds, monkeypatch):
    import comfy.model_management as mm
    patched, proj = bridged(models, conds, streaming=True)
    wrappers = patched.wrappers["outer_sample"]
    bridge = wrappers[next(k for k in wrappers if k.startswith("dit_cache_bridge"))][0].__self__
    bank_module = bridge.banks.bank
    assert bank_module is not proj.bank
    loaded = []
    real = mm.load_models_gpu

    def spy(models_to_load, *args, **kwargs):
        loaded.extend(m.model for m in models_to_load)
        return real(models_to_load, *args, **kwargs)
    monkeypatch.setattr(mm, "load_models_gpu", spy)
    out = ksample(patched, conds["pos"], conds["neg"])
    assert any(m is bank_module for m in loaded)
    assert bridge.banks.on(torch.device("cpu"), torch.float32) is bank_module     # used in place, not copied
    stock = ksample(models["a"], conds["pos"], conds["neg"])
    assert not torch.equal(out, stock)


def test_recording_too_large_for_free_ram_is_refused_before_the_sharer_runs(models, conds, monkeypatch):
    pack_nodes()
    from dit_cache_bridge.c2c_comfy import memory as m
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    monkeypatch.setattr(m, "free_ram", lambda: 100_000)             # this machine, pretending to be nearly full
    b = models["b"]
    calls = []
    real = b.model.apply_model
    monkeypatch.setattr(b.model, "apply_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    latent = {"samples": torch.zeros(1, 16, 3, 8, 8)}
    from dit_cache_bridge.c2c_comfy import compat, recorded
    with pytest.raises(BridgeInputError) as e:
        recorded.record("Record KV Cache", b, conds["pos"], conds["neg"], (0, 1), latent, 0, 4, 4.0, "euler", "simple",
                        1.0, "bf16", "ram", compat.wan_signature(b))
    size = 4 * 2 * 2 * (2 * 48 * 256 * 2)                            # steps, chunks, layers, K+V bf16: 768 KB
    assert "a recording of 768.00 KB" in str(e.value) and size == 768 * 1024
    assert "Record KV Cache" in str(e.value) and "97.66 KB free" in str(e.value)
    assert calls == []
