"""Lockstep streaming (c2c_comfy/lockstep.py over c2c_core/lockstep.py) through the real ComfyUI host, in-process.

The sharer's forward is resumed block by block from inside the receiver's; the contracts: the
bridged output is bit-identical to buffered live mode (the sharer computes the same K/V, only
later), identity twins stay bit-identical to stock sampling, and the sharer K/V held at once stay
at one layer's worth however many layers are fused.
"""
from __future__ import annotations

import pytest
import torch

from bridge_helpers import ksample, load_model, model_options_snapshot, pack_nodes

pytestmark = [pytest.mark.usefixtures("comfy"), pytest.mark.slow]


@pytest.fixture(scope="module")
def models(tiny_models):
    import host
    return {"a": load_model(tiny_models.path(host.T2V_A)), "a_again": load_model(tiny_models.path(host.T2V_A)),
            "b": load_model(tiny_models.path(host.T2V_B)), "wide": load_model(tiny_models.path(host.T2V_WIDE))}


@pytest.fixture(scope="module")
def conds():
    from comfy_test_nodes import wan_conditioning
    return {"pos": wan_conditioning(1), "neg": wan_conditioning(2, length=5),
            "neg_same_length": wan_conditioning(2), "sharer_pos": wan_conditioning(3),
            "sharer_neg": wan_conditioning(4, length=5), "sharer_neg_same_length": wan_conditioning(4)}


def live_source(sharer, pos, neg, streaming, refresh_every=1):
    pack_nodes()
    from dit_cache_bridge.c2c_comfy import compat
    from dit_cache_bridge.c2c_comfy.live import LiveSharer
    from c2c_core import RefreshPolicy
    return LiveSharer(model=sharer, positive=pos, negative=neg, signature=compat.wan_signature(sharer),
                      refresh=RefreshPolicy(every=refresh_every), streaming=streaming)


def projector(sharer, receiver, kind="weighted", mapping="identity", layers="all"):
    node = pack_nodes().CreateC2CProjector
    return node.execute(sharer, receiver, kind, mapping, layers, alpha=0.5, hidden_dim=0, seed=0).args[0]


def fused(receiver, src, proj, strength=1.0, layer_strengths=""):
    return pack_nodes().FuseCaches.execute(receiver, src, proj, strength, 0.0, 1.0, "constant",
                                           layer_strengths).args[0]


def report_of(patched):
    wrappers = patched.wrappers["outer_sample"]
    key = next(k for k in wrappers if k.startswith("dit_cache_bridge"))
    return wrappers[key][0].__self__.last_report


def both_modes(receiver, sharer, conds, proj, cfg, neg="neg", sharer_neg="sharer_neg", **fuse):
    """(buffered output, lockstep output, buffered report, lockstep report) of the same bridged run."""
    out, reports = [], []
    for streaming in (False, True):
        src = live_source(sharer, conds["sharer_pos"], conds[sharer_neg], streaming)
        patched = fused(receiver, src, proj, **fuse)
        out.append(ksample(patched, conds["pos"], conds[neg], cfg=cfg))
        reports.append(report_of(patched))
    return out[0], out[1], reports[0], reports[1]


@pytest.mark.parametrize("kind", ["weighted", "c2c"])
@pytest.mark.parametrize("cfg, neg", [(1.0, "neg"), (4.0, "neg"), (4.0, "neg_same_length")])
def test_lockstep_is_bit_identical_to_buffered_live(models, conds, kind, cfg, neg):
    """CFG 1, CFG with separate cond/uncond calls (texts of 8 and 5 tokens) and batched CFG (equal lengths)."""
    a, b = models["a"], models["b"]
    sharer_neg = "sharer_neg_same_length" if neg == "neg_same_length" else "sharer_neg"
    buffered, lockstep, r_buf, r_lock = both_modes(a, b, conds, projector(b, a, kind), cfg, neg, sharer_neg)
    assert torch.equal(lockstep, buffered)
    assert not torch.equal(lockstep, ksample(a, conds["pos"], conds[neg], cfg=cfg))
    assert r_lock.sharer_forwards == r_buf.sharer_forwards > 0
    assert r_lock.k_change == r_buf.k_change


def test_lockstep_between_models_of_different_shapes_matches_buffered(models, conds):
    wide, a = models["wide"], models["a"]
    buffered, lockstep, *_ = both_modes(a, wide, conds, projector(wide, a, "full", "terminal"), 4.0)
    assert torch.equal(lockstep, buffered)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_lockstep_identity_twins_are_bit_identical_to_stock(models, conds, cfg):
    a, twin = models["a"], models["a_again"]
    stock = ksample(a, conds["pos"], conds["neg"], cfg=cfg)
    patched = fused(a, live_source(twin, conds["pos"], conds["neg"], streaming=True), projector(twin, a, "identity"))
    assert torch.equal(ksample(patched, conds["pos"], conds["neg"], cfg=cfg), stock)


@pytest.mark.parametrize("sharer, layers", [("a", "0"), ("a", "all"), ("wide", "all")])
def test_lockstep_holds_one_layer_whatever_the_number_of_fused_layers(models, conds, sharer, layers):
    """Buffered: fused layers × (K + V) × one CFG chunk. Lockstep: one layer's (K + V) × one chunk."""
    a, s = models["a"], models[sharer]
    mapping = "identity" if sharer == "a" else "terminal"
    proj = projector(s, a, "weighted" if sharer == "a" else "full", mapping, layers)
    _, _, r_buf, r_lock = both_modes(a, s, conds, proj, 4.0)
    heads_x_dim = s.model.diffusion_model.dim
    one_layer = 2 * 1 * 48 * heads_x_dim * 4          # K + V, batch 1, 48 tokens, fp32
    assert r_buf.peak_kv_bytes == len(r_buf.layers) * one_layer
    assert r_lock.peak_kv_bytes == one_layer


def test_batched_cfg_lockstep_holds_one_layer_of_both_chunks(models, conds):
    a, b = models["a"], models["b"]
    _, _, r_buf, r_lock = both_modes(a, b, conds, projector(b, a), 4.0, "neg_same_length", "sharer_neg_same_length")
    one_layer_two_chunks = 2 * 2 * 48 * 256 * 4
    assert r_lock.peak_kv_bytes == one_layer_two_chunks
    assert r_buf.peak_kv_bytes == 2 * one_layer_two_chunks


def test_sharer_left_suspended_when_the_last_layer_is_switched_off(models, conds):
    """Layer 1 at strength 0: the sharer's forward waits after layer 0 and is unwound at the next call."""
    a, b = models["a"], models["b"]
    buffered, lockstep, _, r_lock = both_modes(a, b, conds, projector(b, a), 4.0, layer_strengths="1:0")
    assert torch.equal(lockstep, buffered)
    assert r_lock.sharer_forwards == r_lock.model_calls > 0


def test_refresh_every_k_falls_back_to_buffered(models, conds):
    """Reused K/V must outlive the call, so refresh_every > 1 keeps the buffered run (same output)."""
    a, b = models["a"], models["b"]
    out = []
    for streaming in (False, True):
        src = live_source(b, conds["sharer_pos"], conds["sharer_neg"], streaming, refresh_every=2)
        out.append(ksample(fused(a, src, projector(b, a)), conds["pos"], conds["neg"]))
    assert torch.equal(out[0], out[1])


def test_error_in_the_receiver_unwinds_the_sharer_and_leaves_models_clean(models, conds):
    """The receiver fails in block 1 while the sharer's forward waits after layer 0."""
    a, b = models["a"], models["b"]
    before_a, before_b = model_options_snapshot(a), model_options_snapshot(b)
    failing = a.clone()
    calls = []

    def block_1(args, extra):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("receiver failed mid-run")
        return extra["original_block"](args)
    failing.set_model_patch_replace(block_1, "dit", "double_block", 1)
    patched = fused(failing, live_source(b, conds["sharer_pos"], conds["sharer_neg"], streaming=True),
                    projector(b, a))
    with pytest.raises(RuntimeError, match="receiver failed mid-run"):
        ksample(patched, conds["pos"], conds["neg"])
    assert report_of(patched).sharer_forwards == 2
    assert model_options_snapshot(a) == before_a and model_options_snapshot(b) == before_b
    again = fused(a, live_source(b, conds["sharer_pos"], conds["sharer_neg"], streaming=True), projector(b, a))
    buffered = fused(a, live_source(b, conds["sharer_pos"], conds["sharer_neg"], streaming=False), projector(b, a))
    assert torch.equal(ksample(again, conds["pos"], conds["neg"]), ksample(buffered, conds["pos"], conds["neg"]))


# -- bidirectional fusion ------------------------------------------------------------------------
def bidirectional_source(sharer, receiver, pos, neg, kind="weighted", backward_strength=1.0, refresh_every=1):
    pack_nodes()
    from dit_cache_bridge.c2c_comfy import compat
    from dit_cache_bridge.c2c_comfy.live import LiveSharer
    from c2c_core import RefreshPolicy
    return LiveSharer(model=sharer, positive=pos, negative=neg, signature=compat.wan_signature(sharer),
                      refresh=RefreshPolicy(every=refresh_every), backward=projector(receiver, sharer, kind),
                      backward_strength=backward_strength)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_bidirectional_identity_twins_are_bit_identical_to_stock(models, conds, cfg):
    a, twin = models["a"], models["a_again"]
    stock = ksample(a, conds["pos"], conds["neg"], cfg=cfg)
    src = bidirectional_source(twin, a, conds["pos"], conds["neg"], kind="identity")
    assert torch.equal(ksample(fused(a, src, projector(twin, a, "identity")), conds["pos"], conds["neg"], cfg=cfg),
                       stock)


def test_bidirectional_strength_zero_both_ways_is_stock(models, conds):
    a, b = models["a"], models["b"]
    src = bidirectional_source(b, a, conds["sharer_pos"], conds["sharer_neg"], backward_strength=0.0)
    assert torch.equal(ksample(fused(a, src, projector(b, a), strength=0.0), conds["pos"], conds["neg"]),
                       ksample(a, conds["pos"], conds["neg"]))


def test_bidirectional_with_backward_strength_zero_equals_one_way_lockstep(models, conds):
    a, b = models["a"], models["b"]
    one_way = fused(a, live_source(b, conds["sharer_pos"], conds["sharer_neg"], streaming=True), projector(b, a))
    both = fused(a, bidirectional_source(b, a, conds["sharer_pos"], conds["sharer_neg"], backward_strength=0.0),
                 projector(b, a))
    assert torch.equal(ksample(both, conds["pos"], conds["neg"]), ksample(one_way, conds["pos"], conds["neg"]))


def test_bidirectional_fusion_changes_the_receiver_through_later_sharer_layers(models, conds):
    """Sharer layer 0 receives the receiver's layer 0; its layer 1, which the receiver reads, then differs."""
    a, b = models["a"], models["b"]
    one_way = ksample(fused(a, live_source(b, conds["sharer_pos"], conds["sharer_neg"], streaming=True),
                            projector(b, a)), conds["pos"], conds["neg"])
    runs = [ksample(fused(a, bidirectional_source(b, a, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a)),
                    conds["pos"], conds["neg"]) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], one_way)
    only_layer_0 = ksample(fused(a, bidirectional_source(b, a, conds["sharer_pos"], conds["sharer_neg"]),
                                 projector(b, a, layers="0")), conds["pos"], conds["neg"])
    layer_0_one_way = ksample(fused(a, live_source(b, conds["sharer_pos"], conds["sharer_neg"], streaming=True),
                                    projector(b, a, layers="0")), conds["pos"], conds["neg"])
    assert torch.equal(only_layer_0, layer_0_one_way)     # nothing after layer 0 is read: no effect


def test_bidirectional_with_refresh_every_k_is_refused(models, conds):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    a, b = models["a"], models["b"]
    src = bidirectional_source(b, a, conds["sharer_pos"], conds["sharer_neg"], refresh_every=2)
    with pytest.raises(BridgeInputError, match="refresh_every"):
        ksample(fused(a, src, projector(b, a)), conds["pos"], conds["neg"])


def test_fuse_caches_direction_bidirectional_equals_the_receiving_live_sharer(models, conds):
    a, b = models["a"], models["b"]
    direct = fused(a, bidirectional_source(b, a, conds["sharer_pos"], conds["sharer_neg"], backward_strength=0.7),
                   projector(b, a))
    node = pack_nodes().FuseCaches.execute(a, live_source(b, conds["sharer_pos"], conds["sharer_neg"], True),
                                           projector(b, a), 1.0, 0.0, 1.0, "constant", "", direction="bidirectional",
                                           backward_projector=projector(a, b), backward_strength=0.7).args[0]
    assert torch.equal(ksample(node, conds["pos"], conds["neg"]), ksample(direct, conds["pos"], conds["neg"]))


def test_bidirectional_without_a_fitting_backward_projector_is_refused(models, conds):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    a, wide = models["a"], models["wide"]
    node = pack_nodes().FuseCaches
    src = live_source(wide, conds["sharer_pos"], conds["sharer_neg"], True)
    forward = projector(wide, a, "full", "terminal")
    with pytest.raises(BridgeInputError, match=r"Fuse Caches › backward_projector: nothing connected"):
        node.execute(a, src, forward, 1.0, 0.0, 1.0, direction="bidirectional")
    with pytest.raises(BridgeInputError, match=r"Fuse Caches › backward_projector: a projector from .* swapped"):
        node.execute(a, src, forward, 1.0, 0.0, 1.0, direction="bidirectional", backward_projector=forward)


def test_without_greenlet_live_mode_stays_buffered_and_bidirectional_is_refused(models, conds, monkeypatch):
    """A user who skipped requirements.txt still gets the pack: same output, buffered memory, a clear refusal."""
    from c2c_core import lockstep
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    a, b = models["a"], models["b"]
    buffered, streamed, r_buf, _ = both_modes(a, b, conds, projector(b, a), 4.0)
    monkeypatch.setattr(lockstep, "greenlet", None)
    src = live_source(b, conds["sharer_pos"], conds["sharer_neg"], True)
    patched = fused(a, src, projector(b, a))
    assert torch.equal(ksample(patched, conds["pos"], conds["neg"]), streamed)
    assert report_of(patched).peak_kv_bytes == r_buf.peak_kv_bytes > 0
    with pytest.raises(BridgeInputError, match=r"Fuse Caches › direction: bidirectional, but the Python package "
                                               r"greenlet is not installed.*pip install -r requirements.txt"):
        pack_nodes().FuseCaches.execute(a, src, projector(b, a), 1.0, 0.0, 1.0, direction="bidirectional",
                                        backward_projector=projector(a, b))


def test_every_source_run_implements_the_host_contract(models, conds, monkeypatch):
    """Buffered, lockstep, bidirectional and recorded runs are c2c_core.contract.KVSourceRun, as diffusers' are."""
    from c2c_core.contract import KVSourceRun
    from bridge_helpers import empty_latent
    pack_nodes()
    from dit_cache_bridge.c2c_comfy import bridge, live, lockstep, recorded
    seen = []
    close = bridge.BridgeRun.close
    monkeypatch.setattr(bridge.BridgeRun, "close", lambda self: (seen.append(self.source_run), close(self))[1])
    a, b = models["a"], models["b"]
    record = pack_nodes().RecordKVCache.execute(b, conds["sharer_pos"], conds["sharer_neg"], empty_latent(), 7, 4, 4.0,
                                                "euler", "simple", 1.0, layers="all", storage_dtype="fp32").args[0]
    sources = (live_source(b, conds["sharer_pos"], conds["sharer_neg"], streaming=False),
               live_source(b, conds["sharer_pos"], conds["sharer_neg"], streaming=True),
               bidirectional_source(b, a, conds["sharer_pos"], conds["sharer_neg"]), record)
    for source in sources:
        ksample(fused(a, source, projector(b, a)), conds["pos"], conds["neg"])
    assert [type(run) for run in seen] == [live.LiveSharerRun, lockstep.LockstepRun, lockstep.LockstepRun,
                                           recorded.RecordedRun]
    assert all(isinstance(run, KVSourceRun) for run in seen)
