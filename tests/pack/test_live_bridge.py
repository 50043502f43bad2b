"""Live bridging through the real ComfyUI host, in-process: the contracts of issue 3.

Every comparison against stock sampling is bit-exact (torch.equal) where the math promises it:
strength 0 never touches the receiver's K/V, and an identity projector fed by a sharer with the
receiver's own weights and conditioning hands the receiver exactly the K/V it computed itself.
"""
from __future__ import annotations

import pytest
import torch

from bridge_helpers import empty_latent, ksample, load_model, model_options_snapshot, pack_nodes

pytestmark = [pytest.mark.usefixtures("comfy"), pytest.mark.slow]


@pytest.fixture(scope="module")
def models(tiny_models):
    import host
    return {
        "a": load_model(tiny_models.path(host.T2V_A)),
        "a_again": load_model(tiny_models.path(host.T2V_A)),
        "b": load_model(tiny_models.path(host.T2V_B)),
        "wide": load_model(tiny_models.path(host.T2V_WIDE)),
        "i2v": load_model(tiny_models.path(host.I2V)),
    }


@pytest.fixture(scope="module")
def conds():
    from comfy_test_nodes import wan_conditioning
    return {"pos": wan_conditioning(1), "neg": wan_conditioning(2, length=5),
            "sharer_pos": wan_conditioning(3), "sharer_neg": wan_conditioning(4, length=5)}


@pytest.fixture(scope="module")
def stock_a(models, conds):
    """The receiver's stock KSampler output for the module's text, computed once per setting: ``stock_a(cfg=1.0)``.

    Tests that check a run left the model clean still sample it again afterwards and compare with this."""
    outputs = {}

    def sample(**settings):
        key = tuple(sorted(settings.items()))
        if key not in outputs:
            outputs[key] = ksample(models["a"], conds["pos"], conds["neg"], **settings)
        return outputs[key]
    return sample


def projector(sharer, receiver, kind="identity", mapping="identity", layers="all", **kw):
    node = pack_nodes().CreateC2CProjector
    args = dict(alpha=0.5, hidden_dim=0, seed=0) | kw
    return node.execute(sharer, receiver, kind, mapping, layers, **args).args[0]


def source(sharer, pos, neg, layers="auto", refresh_every=1, rope_alignment="auto"):
    return pack_nodes().CaptureKVCache.execute(sharer, pos, neg, layers=layers, refresh_every=refresh_every,
                                               rope_alignment=rope_alignment).args[0]


def fused(receiver, src, proj, strength=1.0, start=0.0, end=1.0, ramp="constant", layer_strengths=""):
    return pack_nodes().FuseCaches.execute(receiver, src, proj, strength, start, end, ramp, layer_strengths).args[0]


def bridge_of(patched):
    """The Bridge object a Fuse Caches clone carries (for its run report)."""
    wrappers = patched.wrappers["outer_sample"]
    key = next(k for k in wrappers if k.startswith("dit_cache_bridge"))
    return wrappers[key][0].__self__


@pytest.mark.smoke
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_strength_zero_is_bit_identical_to_stock_ksampler(models, conds, stock_a, cfg):
    a, b = models["a"], models["b"]
    stock = stock_a(cfg=cfg)
    src = source(b, conds["sharer_pos"], conds["sharer_neg"])
    bridged = ksample(fused(a, src, projector(b, a), strength=0.0), conds["pos"], conds["neg"], cfg=cfg)
    assert torch.equal(bridged, stock)


@pytest.mark.smoke
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_identity_with_identical_sharer_is_bit_identical_to_stock(models, conds, stock_a, cfg):
    a, twin = models["a"], models["a_again"]
    stock = stock_a(cfg=cfg)
    src = source(twin, conds["pos"], conds["neg"])
    patched = fused(a, src, projector(twin, a, "identity"), strength=1.0)
    bridged = ksample(patched, conds["pos"], conds["neg"], cfg=cfg)
    assert torch.equal(bridged, stock)
    report = bridge_of(patched).last_report
    assert report.sharer_forwards == report.model_calls > 0
    assert all(report.strength[layer] == 1.0 for layer in report.layers)


def test_different_sharer_changes_output_deterministically(models, conds, stock_a):
    a, b = models["a"], models["b"]
    stock = stock_a()
    patched = fused(a, source(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a, "weighted"), 1.0)
    first = ksample(patched, conds["pos"], conds["neg"])
    second = ksample(patched, conds["pos"], conds["neg"])
    assert torch.isfinite(first).all()
    assert not torch.equal(first, stock)
    assert (first - stock).abs().max() > 1e-3
    assert torch.equal(first, second)
    report = bridge_of(patched).last_report
    assert all(report.k_change[layer] > 0 for layer in report.layers)
    assert report.gate == {layer: {"k": 0.5, "v": 0.5} for layer in report.layers}   # weighted, alpha 0.5


def test_no_patch_leaks_after_a_bridged_run(models, conds, stock_a):
    a, b = models["a"], models["b"]
    before = model_options_snapshot(a), model_options_snapshot(b)
    stock = stock_a()
    ksample(fused(a, source(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a, "weighted"), 1.0),
            conds["pos"], conds["neg"])
    assert (model_options_snapshot(a), model_options_snapshot(b)) == before
    assert torch.equal(ksample(a, conds["pos"], conds["neg"]), stock)


def test_no_patch_leaks_after_a_run_that_raised(models, conds, stock_a):
    from comfy_test_nodes import i2v_conditioning
    a, i2v = models["a"], models["i2v"]
    stock = stock_a()
    wrong = i2v_conditioning(conds["sharer_pos"], torch.zeros(1, 16, 5, 8, 8))   # 5 frames, latent has 3
    patched = fused(a, source(i2v, wrong, conds["sharer_neg"]), projector(i2v, a), 1.0)
    with pytest.raises(ValueError, match=r"Capture KV Cache › positive: its image latent is \(5, 8, 8\)"):
        ksample(patched, conds["pos"], conds["neg"])
    assert bridge_of(patched).run is None
    assert torch.equal(ksample(a, conds["pos"], conds["neg"]), stock)
    assert torch.equal(ksample(i2v, conds["sharer_pos"], conds["sharer_neg"]),
                       ksample(i2v, conds["sharer_pos"], conds["sharer_neg"]))


def test_interrupt_stops_the_run_and_leaves_models_clean(models, conds, stock_a, monkeypatch):
    import comfy.model_management as mm
    a, b = models["a"], models["b"]
    stock = stock_a()
    patched = fused(a, source(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a, "weighted"), 1.0)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            ksample(patched, conds["pos"], conds["neg"])
    finally:
        mm.interrupt_current_processing(False)
    assert bridge_of(patched).run is None
    assert torch.equal(ksample(a, conds["pos"], conds["neg"]), stock)


def test_bridged_ksampler_equals_fuse_caches_plus_stock_ksampler(models, conds):
    a, b = models["a"], models["b"]
    proj = projector(b, a, "weighted", alpha=0.7)
    via_fuse = ksample(fused(a, source(b, conds["sharer_pos"], conds["sharer_neg"]), proj, 0.8, 0.0, 0.75),
                       conds["pos"], conds["neg"], cfg=3.0, seed=11, steps=5)
    (latent,) = pack_nodes().BridgedKSampler.execute(
        a, conds["pos"], conds["neg"], b, conds["sharer_pos"], conds["sharer_neg"], proj, 0.8, 0.0, 0.75,
        11, 5, 3.0, "euler", "simple", empty_latent()).args
    assert torch.equal(latent["samples"], via_fuse)


def test_fused_model_works_with_ksampler_advanced_and_sampler_custom_advanced(models, conds):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as custom
    import host
    import nodes
    a, b = models["a"], models["b"]
    patched = fused(a, source(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a, "weighted"), 1.0)
    reference = ksample(patched, conds["pos"], conds["neg"], seed=5, steps=4)
    (adv,) = nodes.KSamplerAdvanced().sample(patched, "enable", 5, 4, 4.0, "euler", "simple", conds["pos"],
                                             conds["neg"], empty_latent(), 0, 10000, "disable")
    assert torch.equal(adv["samples"], reference)
    guider = host.run_node(custom.CFGGuider, patched, conds["pos"], conds["neg"], 4.0)[0]
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = host.run_node(custom.BasicScheduler, patched, "simple", 4, 1.0)[0]
    noise = host.run_node(custom.RandomNoise, 5)[0]
    out = host.run_node(custom.SamplerCustomAdvanced, noise, guider, sampler, sigmas, empty_latent())[0]
    assert torch.equal(out["samples"], reference)


def test_mismatched_pair_runs_through_full_projector_with_terminal_mapping(models, conds, stock_a):
    a, wide = models["a"], models["wide"]          # receiver 2 layers × 2 heads, sharer 3 layers × 4 heads
    proj = projector(wide, a, "full", "terminal")
    assert proj.layer_map.pairs == {0: 1, 1: 2}
    stock = stock_a()
    out = ksample(fused(a, source(wide, conds["sharer_pos"], conds["sharer_neg"]), proj, 1.0),
                  conds["pos"], conds["neg"])
    assert torch.isfinite(out).all() and not torch.equal(out, stock)


def test_refresh_interval_counts_sharer_forwards(models, conds):
    a, b = models["a"], models["b"]
    proj = projector(b, a, "weighted")
    every = fused(a, source(b, conds["sharer_pos"], conds["sharer_neg"], refresh_every=1), proj, 1.0)
    third = fused(a, source(b, conds["sharer_pos"], conds["sharer_neg"], refresh_every=3), proj, 1.0)
    ksample(every, conds["pos"], conds["neg"], steps=6)
    ksample(third, conds["pos"], conds["neg"], steps=6)
    # cfg 4 with text of different lengths: cond and uncond are separate model calls (2 per step)
    assert bridge_of(every).last_report.sharer_forwards == 12
    assert bridge_of(third).last_report.sharer_forwards == 4     # steps 0 and 3, cond and uncond


def test_fusion_window_skips_the_sharer_outside_it(models, conds):
    a, b = models["a"], models["b"]
    patched = fused(a, source(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a, "weighted"), 1.0,
                    start=0.0, end=0.5)
    ksample(patched, conds["pos"], conds["neg"], steps=5)      # progress 0, .25, .5 inside; .75, 1 outside
    assert bridge_of(patched).last_report.sharer_forwards == 6


def test_existing_attention_override_is_chained(models, conds):
    a, b = models["a"], models["b"]
    calls = []

    def other_pack_override(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs)

    with_other = a.clone()
    with_other.model_options["transformer_options"]["optimized_attention_override"] = other_pack_override
    stock_other = ksample(with_other, conds["pos"], conds["neg"])
    n_stock = len(calls)
    calls.clear()
    out = ksample(fused(with_other, source(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a), 0.0),
                  conds["pos"], conds["neg"])
    assert len(calls) == n_stock > 0
    assert torch.equal(out, stock_other)


# --- bad input: each names the node, the input and the fix -------------------------------------
def test_projector_for_another_pair_is_refused(models, conds):
    a, wide = models["a"], models["wide"]
    proj = projector(wide, a, "full", "terminal")
    with pytest.raises(ValueError, match=r"Fuse Caches › projector: a projector made for a sharer of 3 layers × 4 "
                                         r"heads × 128, but the sharer model has 2 layers × 2 heads × 128.*Fix: load"):
        fused(a, source(models["b"], conds["sharer_pos"], conds["sharer_neg"]), proj)
    with pytest.raises(ValueError, match=r"Fuse Caches › projector: a projector made for a receiver of 2 layers"):
        fused(wide, source(wide, conds["sharer_pos"], conds["sharer_neg"]), proj)


def test_non_wan_model_is_refused(conds):
    import comfy.model_patcher

    class NotWan(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Linear(2, 2)

    other = comfy.model_patcher.ModelPatcher(NotWan(), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"Capture KV Cache › sharer: expected a Wan2.1-architecture model "
                                         r"\(WanModel\), found Linear.*Fix: load a Wan2.1 or ChronoEdit"):
        source(other, conds["sharer_pos"], conds["sharer_neg"])


def test_identity_projector_between_different_shapes_is_refused(models):
    with pytest.raises(ValueError, match=r"Create C2C Projector › kind: 'identity' for sharer 3 layers × 4 heads"):
        projector(models["wide"], models["a"], "identity", "terminal")


def test_capture_missing_a_needed_layer_is_refused(models, conds):
    a, b = models["a"], models["b"]
    with pytest.raises(ValueError, match=r"Fuse Caches › kv_source: a capture of sharer layers \[0\].*add layers "
                                         r"\[1\] in Capture KV Cache"):
        fused(a, source(b, conds["sharer_pos"], conds["sharer_neg"], layers="0"), projector(b, a))


def test_bad_layer_strengths_are_refused(models, conds):
    a, b = models["a"], models["b"]
    src, proj = source(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a)
    with pytest.raises(ValueError, match=r"Fuse Caches › layer_strengths: 'x'"):
        fused(a, src, proj, layer_strengths="x")
    with pytest.raises(ValueError, match=r"Fuse Caches › layer_strengths: layer 7; expected one of the fused"):
        fused(a, src, proj, layer_strengths="7:1")


def test_window_with_start_after_end_is_refused(models, conds):
    a, b = models["a"], models["b"]
    with pytest.raises(ValueError, match=r"Fuse Caches › start_percent: window 0.8–0.2"):
        fused(a, source(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a), 1.0, 0.8, 0.2)


def test_layer_strengths_scale_single_layers(models, conds):
    a, b = models["a"], models["b"]
    proj = projector(b, a, "weighted")
    src = source(b, conds["sharer_pos"], conds["sharer_neg"])
    off = fused(a, src, proj, 1.0, layer_strengths="0:0, 1:0")
    assert torch.equal(ksample(off, conds["pos"], conds["neg"]), ksample(a, conds["pos"], conds["neg"]))
    assert bridge_of(off).last_report.sharer_forwards == 0      # every layer off: the sharer never runs
    half = fused(a, src, proj, 1.0, layer_strengths="1:0.5")
    ksample(half, conds["pos"], conds["neg"])
    report = bridge_of(half).last_report
    assert report.strength == {0: 1.0, 1: 0.5}


def test_bridged_ksampler_errors_name_its_own_inputs(models, conds):
    from comfy_test_nodes import i2v_conditioning
    a, i2v = models["a"], models["i2v"]
    wrong = i2v_conditioning(conds["sharer_pos"], torch.zeros(1, 16, 5, 8, 8))
    proj = projector(i2v, a)
    with pytest.raises(ValueError, match=r"Bridged KSampler › sharer_positive: its image latent is \(5, 8, 8\).*"
                                         r"use Capture KV Cache with grid_alignment"):
        pack_nodes().BridgedKSampler.execute(a, conds["pos"], conds["neg"], i2v, wrong, conds["sharer_neg"], proj,
                                             1.0, 0.0, 1.0, 1, 2, 4.0, "euler", "simple", empty_latent())
    with pytest.raises(ValueError, match=r"Bridged KSampler › receiver: a projector made for a receiver|"
                                         r"Bridged KSampler › projector: a projector made for a receiver"):
        pack_nodes().BridgedKSampler.execute(models["wide"], conds["pos"], conds["neg"], i2v, conds["sharer_pos"],
                                             conds["sharer_neg"], proj, 1.0, 0.0, 1.0, 1, 2, 4.0, "euler", "simple",
                                             empty_latent())


def test_chained_fuse_caches_add_a_second_sharer(models, conds, stock_a):
    """Two Fuse Caches in a row fuse two sharers in sequence; each keeps its own wrappers and report."""
    a, b, wide = models["a"], models["b"], models["wide"]
    stock = stock_a()
    first = fused(a, source(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a, "weighted"), 1.0)
    both = fused(first, source(wide, conds["sharer_pos"], conds["sharer_neg"]),
                 projector(wide, a, "full", "terminal"), 1.0)
    only_first = ksample(first, conds["pos"], conds["neg"])
    out = ksample(both, conds["pos"], conds["neg"])
    assert not torch.equal(out, only_first) and not torch.equal(out, stock)
    keys = [k for k in both.wrappers["outer_sample"] if k.startswith("dit_cache_bridge")]
    assert len(keys) == 2
    reports = [both.wrappers["outer_sample"][k][0].__self__.last_report for k in keys]
    assert all(r.sharer_forwards == r.model_calls > 0 for r in reports)
    zero = fused(fused(a, source(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a, "weighted"), 0.0),
                 source(wide, conds["sharer_pos"], conds["sharer_neg"]), projector(wide, a, "full", "terminal"), 0.0)
    assert torch.equal(ksample(zero, conds["pos"], conds["neg"]), stock)


@pytest.mark.parametrize("layers", ["1", "all"])
def test_live_mode_holds_one_layer_of_kv_whatever_the_number_of_fused_layers(models, conds, layers):
    """Lockstep (the live default): peak sharer K/V = one layer × (K + V) × one CFG chunk: (1, 48, 2 × 128) fp32.

    Buffered live mode (fused layers × that) is compared in tests/pack/test_lockstep.py."""
    a, b = models["a"], models["b"]
    patched = fused(a, source(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a, "weighted", layers=layers))
    ksample(patched, conds["pos"], conds["neg"])     # cond and uncond are separate calls (texts of 8 and 5 tokens)
    one_tensor = 1 * 48 * 256 * 4
    assert bridge_of(patched).last_report.peak_kv_bytes == 2 * one_tensor
