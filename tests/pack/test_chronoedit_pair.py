"""Wan ↔ ChronoEdit for real (issue 4): RoPE-correct fusion, different latent grids, recorded mode.

Tiny stand-ins: the I2V tiny model plays ChronoEdit (ScaleROPE scale_t 7, as ComfyUI's official
ChronoEdit template sets it), the T2V tiny models play Wan2.1.
"""
from __future__ import annotations

import pytest
import torch

from bridge_helpers import empty_latent, ksample, load_model, pack_nodes

pytestmark = [pytest.mark.usefixtures("comfy"), pytest.mark.slow]

# RoPE re-rotation is computed in float64 angles / float32 rotation; against keys computed at the
# receiver's own positions it agrees to ~1e-6 relative, which after 4 euler steps stays below this.
ROPE_ATOL = 1e-4


@pytest.fixture(scope="module")
def models(tiny_models):
    import host
    return {"a": load_model(tiny_models.path(host.T2V_A)), "a_again": load_model(tiny_models.path(host.T2V_A)),
            "b": load_model(tiny_models.path(host.T2V_B)), "i2v": load_model(tiny_models.path(host.I2V)),
            "i2v_again": load_model(tiny_models.path(host.I2V))}


@pytest.fixture(scope="module")
def conds():
    from comfy_test_nodes import clip_vision_features, i2v_conditioning, wan_conditioning
    pos, neg = wan_conditioning(1), wan_conditioning(2, length=5)
    start = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    small = torch.randn(1, 16, 2, 6, 6, generator=torch.Generator().manual_seed(6))
    clip = clip_vision_features(3)
    return {"pos": pos, "neg": neg,
            "i2v_pos": i2v_conditioning(pos, start, clip), "i2v_neg": i2v_conditioning(neg, start, clip),
            "i2v_small_pos": i2v_conditioning(pos, small, clip), "i2v_small_neg": i2v_conditioning(neg, small, clip),
            "sharer_pos": wan_conditioning(3), "sharer_neg": wan_conditioning(4, length=5)}


def scale_rope(model, scale_t=7.0):
    import host
    ScaleROPE = host.core_node("comfy_extras.nodes_rope", "ScaleROPE")
    return host.run_node(ScaleROPE, model, 1.0, 0.0, 1.0, 0.0, scale_t, 0.0)[0]


def projector(sharer, receiver, kind="identity", mapping="identity", layers="all"):
    return pack_nodes().CreateC2CProjector.execute(sharer, receiver, kind, mapping, layers, 0.5, 0, 0).args[0]


def capture(sharer, pos, neg, **kw):
    return pack_nodes().CaptureKVCache.execute(sharer, pos, neg, **kw).args[0]


def fused(receiver, src, proj, strength=1.0, **kw):
    return pack_nodes().FuseCaches.execute(receiver, src, proj, strength, 0.0, 1.0, **kw).args[0]


def report_of(patched):
    wrappers = patched.wrappers["outer_sample"]
    key = next(k for k in wrappers if k.startswith("dit_cache_bridge"))
    return wrappers[key][0].__self__.last_report


SAMPLING = dict(seed=3, steps=4, cfg=4.0, sampler_name="euler", scheduler="simple", denoise=1.0)


def record(sharer, pos, neg, layers="all", storage_dtype="fp32", storage="ram", latent=None, **overrides):
    settings = SAMPLING | overrides
    return pack_nodes().RecordKVCache.execute(sharer, pos, neg, latent or empty_latent(), layers=layers,
                                              storage_dtype=storage_dtype, storage=storage, **settings).args[0]


def sample(model, pos, neg, **overrides):
    s = SAMPLING | overrides
    return ksample(model, pos, neg, cfg=s["cfg"], seed=s["seed"], steps=s["steps"])


# --- RoPE ---------------------------------------------------------------------------------------
def test_rerotation_makes_a_scaled_rope_twin_reproduce_the_receiver(models, conds):
    """Block 0 of twin I2V models sees identical inputs; only the RoPE positions differ (scale_t 7)."""
    receiver, sharer = models["i2v"], scale_rope(models["i2v_again"])
    stock = sample(receiver, conds["i2v_pos"], conds["i2v_neg"])
    proj = projector(sharer, receiver, "identity", "identity", layers="0")
    aligned = fused(receiver, capture(sharer, conds["i2v_pos"], conds["i2v_neg"], rope_alignment="auto"), proj)
    naive = fused(receiver, capture(sharer, conds["i2v_pos"], conds["i2v_neg"], rope_alignment="off"), proj)
    out_aligned = sample(aligned, conds["i2v_pos"], conds["i2v_neg"])
    out_naive = sample(naive, conds["i2v_pos"], conds["i2v_neg"])
    assert report_of(aligned).k_change[0] < 1e-5          # the receiver's own keys, reproduced
    assert report_of(naive).k_change[0] > 1e-2            # keys rotated for other frames
    assert (out_aligned - stock).abs().max() < ROPE_ATOL
    assert (out_naive - stock).abs().max() > 100 * ROPE_ATOL


def test_rope_is_detected_from_the_models_own_options(models, conds):
    """No user setting: a sharer without ScaleROPE needs no re-rotation and is bit-identical."""
    receiver, twin = models["i2v"], models["i2v_again"]
    proj = projector(twin, receiver, "identity", "identity", layers="0")
    out = sample(fused(receiver, capture(twin, conds["i2v_pos"], conds["i2v_neg"]), proj),
                 conds["i2v_pos"], conds["i2v_neg"])
    assert torch.equal(out, sample(receiver, conds["i2v_pos"], conds["i2v_neg"]))


# --- latent grids ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["nearest", "trilinear"])
def test_sharer_on_its_own_grid_is_resampled(models, conds, mode):
    receiver, sharer = models["a"], models["i2v"]
    proj = projector(sharer, receiver, "weighted")
    src = capture(sharer, conds["i2v_small_pos"], conds["i2v_small_neg"], grid_alignment=mode)
    first = sample(fused(receiver, src, proj), conds["pos"], conds["neg"])
    second = sample(fused(receiver, src, proj), conds["pos"], conds["neg"])
    assert torch.isfinite(first).all() and torch.equal(first, second)
    assert not torch.equal(first, sample(receiver, conds["pos"], conds["neg"]))


def test_sharer_on_another_grid_is_refused_by_default(models, conds):
    proj = projector(models["i2v"], models["a"], "weighted")
    src = capture(models["i2v"], conds["i2v_small_pos"], conds["i2v_small_neg"])
    with pytest.raises(ValueError, match=r"Capture KV Cache › positive: its image latent is \(2, 6, 6\).*"
                                         r"set grid_alignment to 'nearest' or 'trilinear'"):
        sample(fused(models["a"], src, proj), conds["pos"], conds["neg"])


# --- refresh ---------------------------------------------------------------------------------------
def test_refresh_one_is_live_mode_and_refresh_three_differs(models, conds):
    a, b = models["a"], models["b"]
    proj = projector(b, a, "weighted")
    live = sample(fused(a, capture(b, conds["sharer_pos"], conds["sharer_neg"]), proj), conds["pos"], conds["neg"])
    k1 = sample(fused(a, capture(b, conds["sharer_pos"], conds["sharer_neg"], refresh_every=1), proj),
                conds["pos"], conds["neg"])
    k3 = fused(a, capture(b, conds["sharer_pos"], conds["sharer_neg"], refresh_every=3), proj)
    out3 = sample(k3, conds["pos"], conds["neg"])
    assert torch.equal(live, k1)
    assert not torch.equal(out3, live) and torch.equal(out3, sample(k3, conds["pos"], conds["neg"]))


# --- recorded mode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["ram", "disk"])
def test_record_then_replay_equals_live_when_trajectories_coincide(models, conds, storage):
    """With a twin sharer, its own conditioning = the receiver's and an identity projector at strength 1,
    the bridged receiver follows the stock trajectory, which is exactly the trajectory the sharer
    samples when recording with the same seed, sigmas and CFG: the replayed K/V are bit-for-bit the
    live ones (fp32 storage)."""
    a, twin = models["a"], models["a_again"]
    proj = projector(twin, a)
    stock = sample(a, conds["pos"], conds["neg"])
    live = sample(fused(a, capture(twin, conds["pos"], conds["neg"]), proj), conds["pos"], conds["neg"])
    replayed = sample(fused(a, record(twin, conds["pos"], conds["neg"], storage=storage), proj),
                      conds["pos"], conds["neg"])
    assert torch.equal(live, stock) and torch.equal(replayed, live)


def test_record_then_replay_differs_from_live_when_trajectories_differ(models, conds):
    a, b = models["a"], models["b"]
    proj = projector(b, a, "weighted")
    live = sample(fused(a, capture(b, conds["sharer_pos"], conds["sharer_neg"]), proj), conds["pos"], conds["neg"])
    src = record(b, conds["sharer_pos"], conds["sharer_neg"])
    first = sample(fused(a, src, proj), conds["pos"], conds["neg"])
    assert not torch.equal(first, live)
    assert torch.equal(first, sample(fused(a, src, proj), conds["pos"], conds["neg"]))


def test_storage_dtypes_trade_memory_for_precision(models, conds):
    a, b = models["a"], models["b"]
    proj = projector(b, a, "weighted")
    sizes, outs = {}, {}
    for dtype in ("fp32", "bf16", "fp8_e4m3fn"):
        src = record(b, conds["sharer_pos"], conds["sharer_neg"], storage_dtype=dtype)
        sizes[dtype] = src.recording.nbytes
        outs[dtype] = sample(fused(a, src, proj), conds["pos"], conds["neg"])
    assert sizes["bf16"] == sizes["fp32"] // 2
    assert sizes["fp8_e4m3fn"] < sizes["fp32"] // 3
    scale = outs["fp32"].abs().max()
    assert (outs["bf16"] - outs["fp32"]).abs().max() < 0.05 * scale
    assert (outs["fp8_e4m3fn"] - outs["fp32"]).abs().max() < 0.2 * scale


def test_only_one_model_is_resident_in_recorded_mode(models, conds):
    import comfy.patcher_extension
    pack_nodes()    # loads the pack as dit_cache_bridge, as ComfyUI does
    from dit_cache_bridge.c2c_comfy import memory
    a, b = models["a"], models["b"]
    proj = projector(b, a, "weighted")
    seen = {}

    def spy(key, sharer):
        def wrapper(executor, *args, **kwargs):
            seen.setdefault(key, set()).add(memory.is_loaded(sharer))
            return executor(*args, **kwargs)
        return wrapper

    for key, src in (("recorded", record(b, conds["sharer_pos"], conds["sharer_neg"])),
                     ("live", capture(b, conds["sharer_pos"], conds["sharer_neg"]))):
        patched = fused(a, src, proj)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "spy", spy(key, b))
        sample(patched, conds["pos"], conds["neg"])
    assert seen == {"recorded": {False}, "live": {True}}


def test_save_and_load_kv_cache_replay_identically(models, conds):
    import os
    a, b = models["a"], models["b"]
    nodes = pack_nodes()
    proj = projector(b, a, "weighted")
    src = record(b, conds["sharer_pos"], conds["sharer_neg"], storage_dtype="bf16")
    saved = nodes.SaveKVCache.execute(src, "test/rec")
    (entry,) = saved.ui["kv_cache"]
    name = os.path.join(os.path.relpath(entry["subfolder"], "kv_cache"), entry["filename"])
    loaded = nodes.LoadKVCache.execute(name).args[0]
    assert torch.equal(sample(fused(a, src, proj), conds["pos"], conds["neg"]),
                       sample(fused(a, loaded, proj), conds["pos"], conds["neg"]))


def test_replay_into_a_run_with_other_sigmas_is_refused(models, conds):
    a, b = models["a"], models["b"]
    src = record(b, conds["sharer_pos"], conds["sharer_neg"])
    with pytest.raises(ValueError, match=r"Fuse Caches › kv_source: a recording over 4 steps.*expected the "
                                         r"receiver's 6 steps.*record with the same steps"):
        sample(fused(a, src, projector(b, a, "weighted")), conds["pos"], conds["neg"], steps=6)


def test_replay_with_another_seed_is_refused(models, conds):
    a, b = models["a"], models["b"]
    src = record(b, conds["sharer_pos"], conds["sharer_neg"], seed=3)
    with pytest.raises(ValueError, match=r"Fuse Caches › kv_source: a recording sampled with seed 3; expected the "
                                         r"receiver's seed 4.*same seed"):
        sample(fused(a, src, projector(b, a, "weighted")), conds["pos"], conds["neg"], seed=4)


def test_replay_of_a_cfg_one_recording_into_cfg_sampling_is_refused(models, conds):
    a, b = models["a"], models["b"]
    src = record(b, conds["sharer_pos"], conds["sharer_neg"], cfg=1.0)
    with pytest.raises(ValueError, match=r"kv_source: a recording made with cfg 1.*record with cfg > 1"):
        sample(fused(a, src, projector(b, a, "weighted")), conds["pos"], conds["neg"])


def test_recording_on_a_latent_of_another_grid_than_the_sharers_image_is_refused_before_sampling(models, conds):
    with pytest.raises(ValueError, match=r"Record KV Cache › positive: its image latent is \(2, 6, 6\).*"
                                         r"expected the sampled latent's \(3, 8, 8\)"):
        record(models["i2v"], conds["i2v_small_pos"], conds["i2v_small_neg"])


def test_capture_refuses_positive_and_negative_image_latents_of_two_grids(models, conds):
    with pytest.raises(ValueError, match=r"Capture KV Cache › negative: an image latent of \(2, 6, 6\).*"
                                         r"expected the \(3, 8, 8\) of positive"):
        capture(models["i2v"], conds["i2v_pos"], conds["i2v_small_neg"])


def test_load_kv_cache_refuses_a_file_that_is_not_a_recording(models, tmp_path):
    import folder_paths
    import os
    from safetensors.torch import save_file
    folder = os.path.join(folder_paths.get_output_directory(), "kv_cache")
    os.makedirs(folder, exist_ok=True)
    save_file({"x": torch.zeros(1)}, os.path.join(folder, "not_a_recording.safetensors"))
    with pytest.raises(ValueError, match=r"Load KV Cache › kv_cache: .*no 'c2c_kv_recording' metadata"):
        pack_nodes().LoadKVCache.execute("not_a_recording.safetensors")


# --- an image-to-video sharer without its image ----------------------------------------------------
def i2v_warning(node, inputs):
    return (f"{node} › {inputs}: the sharer is an image-to-video model but this conditioning carries no image, so "
            "ComfyUI fills the sharer's image input with zeros and its K/V describe a blank start frame. Fix: give "
            "the sharer its image: feed its positive and negative through WanImageToVideo (start_image, and "
            "clip_vision_output from CLIP Vision Encode for Wan2.1 I2V) or its ChronoEdit node, or use a "
            "text-to-video sharer.")


def warnings_logged(caplog):
    return [r.getMessage() for r in caplog.records if "image-to-video" in r.getMessage()]


def test_an_i2v_sharer_without_image_conditioning_is_warned_about_in_the_log_and_the_run_report(models, conds,
                                                                                                caplog, monkeypatch):
    import logging

    import server
    pack_nodes()                    # imports the pack as dit_cache_bridge
    from dit_cache_bridge.nodes import fuse as fuse_module
    sent = []

    class Server:
        def send_sync(self, event, data):
            sent.append(data)

    monkeypatch.setattr(server.PromptServer, "instance", Server(), raising=False)
    expected = i2v_warning("Capture KV Cache", "positive, negative")
    with caplog.at_level(logging.WARNING, logger="dit_cache_bridge"):
        src = capture(models["i2v"], conds["pos"], conds["neg"])
    assert warnings_logged(caplog) == [expected]
    assert src.warnings == (expected,)
    patched = fuse_module.bridge_model("Fuse Caches", models["a"], src, projector(models["i2v"], models["a"]), 1.0,
                                       0.0, 1.0, report_to="7")
    sample(patched, conds["pos"], conds["neg"], steps=1)
    assert [data["report"]["warnings"] for data in sent] == [[expected]]


def test_an_i2v_sharer_missing_the_image_on_one_input_names_that_input(models, conds, caplog):
    import logging
    with caplog.at_level(logging.WARNING, logger="dit_cache_bridge"):
        rec = record(models["i2v"], conds["i2v_pos"], conds["neg"], layers="0", steps=1)
    assert warnings_logged(caplog) == [i2v_warning("Record KV Cache", "negative")]
    assert rec.warnings == (i2v_warning("Record KV Cache", "negative"),)


def test_sharers_with_their_image_or_without_image_input_are_not_warned_about(models, conds, caplog):
    import logging
    with caplog.at_level(logging.WARNING, logger="dit_cache_bridge"):
        assert capture(models["i2v"], conds["i2v_pos"], conds["i2v_neg"]).warnings == ()
        assert capture(models["b"], conds["pos"], conds["neg"]).warnings == ()
    assert warnings_logged(caplog) == []
