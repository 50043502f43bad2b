"""The bridge on the paths real users take (issue 9), in-process on the real ComfyUI host.

Real Wan graphs batch cond and uncond into one model call (umT5 pads every prompt to 512 tokens); here
equal-length stand-in texts do the same. Every contract of tests/pack/test_live_bridge.py that the
math makes bit-exact is re-checked on batched CFG, CFG 1 and a latent batch of 2; then the guiders
whose branches are not (positive, negative) in list order, LoRA'd sharers of the receiver's own
loader, split samplers, samplers that evaluate the model twice per step, and per-call shape changes.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bridge_helpers import empty_latent, ksample, load_model, pack_nodes

pytestmark = [pytest.mark.usefixtures("comfy"), pytest.mark.slow]

STEPS = 4


@pytest.fixture(scope="module")
def models(tiny_models):
    import host
    return {"a": load_model(tiny_models.path(host.T2V_A)), "a_again": load_model(tiny_models.path(host.T2V_A)),
            "b": load_model(tiny_models.path(host.T2V_B))}


@pytest.fixture(scope="module")
def conds():
    from comfy_test_nodes import wan_conditioning
    return {"pos": wan_conditioning(1), "neg": wan_conditioning(2), "short_neg": wan_conditioning(2, length=5),
            "other": wan_conditioning(9), "sharer_pos": wan_conditioning(3), "sharer_neg": wan_conditioning(4),
            "sharer_short_neg": wan_conditioning(4, length=5)}


# Variants of the stock contracts: (negative text key, cfg, latent batch)
VARIANTS = {"batched_cfg": ("neg", 4.0, 1), "cfg_one": ("short_neg", 1.0, 1), "batch_two": ("neg", 4.0, 2)}


def latent(batch=1):
    return empty_latent((batch, 16, 3, 8, 8))


def projector(sharer, receiver, kind="identity", layers="all"):
    return pack_nodes().CreateC2CProjector.execute(sharer, receiver, kind, "identity", layers, alpha=0.5,
                                                   hidden_dim=0, seed=0).args[0]


def capture(sharer, pos, neg, streaming=None, **kw):
    src = pack_nodes().CaptureKVCache.execute(sharer, pos, neg, **kw).args[0]
    return src if streaming is None else dataclasses.replace(src, streaming=streaming)


def record(sharer, pos, neg, cfg=4.0, batch=1, sampler="euler", seed=7, steps=STEPS, refresh_every=1):
    return pack_nodes().RecordKVCache.execute(sharer, pos, neg, latent(batch), seed, steps, cfg, sampler, "simple",
                                              1.0, layers="all", storage_dtype="fp32",
                                              refresh_every=refresh_every).args[0]


def fused(receiver, src, proj, strength=1.0, start=0.0, end=1.0):
    return pack_nodes().FuseCaches.execute(receiver, src, proj, strength, start, end).args[0]


def report(patched):
    wrappers = patched.wrappers["outer_sample"]
    key = next(k for k in wrappers if k.startswith("dit_cache_bridge"))
    return wrappers[key][0].__self__.last_report


def sample(model, pos, neg, cfg=4.0, batch=1, sampler="euler", steps=STEPS, seed=7):
    return ksample(model, pos, neg, cfg=cfg, seed=seed, steps=steps, sampler=sampler, latent=latent(batch))


def custom_sample(guider, sampler="euler", steps=STEPS, seed=7):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as custom
    import host
    sigmas = host.run_node(custom.BasicScheduler, guider.model_patcher, "simple", steps, 1.0)[0]
    noise = host.run_node(custom.RandomNoise, seed)[0]
    return host.run_node(custom.SamplerCustomAdvanced, noise, guider, comfy.samplers.sampler_object(sampler), sigmas,
                         latent())[0]["samples"]


# --- the stock contracts on batched CFG, CFG 1, batch 2 ---------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_strength_zero_is_stock(models, conds, variant):
    neg, cfg, batch = VARIANTS[variant]
    a, b = models["a"], models["b"]
    src = capture(b, conds["sharer_pos"], conds["sharer_neg"])
    bridged = sample(fused(a, src, projector(b, a, "weighted"), 0.0), conds["pos"], conds[neg], cfg, batch)
    assert torch.equal(bridged, sample(a, conds["pos"], conds[neg], cfg, batch))


@pytest.mark.parametrize("variant", VARIANTS)
def test_identity_twin_is_stock(models, conds, variant):
    neg, cfg, batch = VARIANTS[variant]
    a, twin = models["a"], models["a_again"]
    patched = fused(a, capture(twin, conds["pos"], conds[neg]), projector(twin, a))
    assert torch.equal(sample(patched, conds["pos"], conds[neg], cfg, batch),
                       sample(a, conds["pos"], conds[neg], cfg, batch))
    r = report(patched)
    assert r.sharer_forwards == r.model_calls == STEPS          # one sharer batch per receiver call
    assert r.copied_kv_bytes == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_bridged_ksampler_is_capture_plus_fuse_plus_ksampler(models, conds, variant):
    neg, cfg, batch = VARIANTS[variant]
    a, b = models["a"], models["b"]
    proj = projector(b, a, "weighted")
    via_fuse = sample(fused(a, capture(b, conds["sharer_pos"], conds["sharer_neg"]), proj, 0.8, 0.0, 0.75),
                      conds["pos"], conds[neg], cfg, batch)
    (out,) = pack_nodes().BridgedKSampler.execute(
        a, conds["pos"], conds[neg], b, conds["sharer_pos"], conds["sharer_neg"], proj, 0.8, 0.0, 0.75,
        7, STEPS, cfg, "euler", "simple", latent(batch)).args
    assert torch.equal(out["samples"], via_fuse)
    assert not torch.equal(via_fuse, sample(a, conds["pos"], conds[neg], cfg, batch))


@pytest.mark.parametrize("variant", VARIANTS)
def test_replay_equals_live_when_trajectories_coincide(models, conds, variant):
    neg, cfg, batch = VARIANTS[variant]
    a, twin = models["a"], models["a_again"]
    proj = projector(twin, a)
    live = sample(fused(a, capture(twin, conds["pos"], conds[neg]), proj), conds["pos"], conds[neg], cfg, batch)
    replayed = sample(fused(a, record(twin, conds["pos"], conds[neg], cfg, batch), proj), conds["pos"], conds[neg],
                      cfg, batch)
    assert torch.equal(replayed, live) and torch.equal(live, sample(a, conds["pos"], conds[neg], cfg, batch))


# --- the batched path holds no K/V copies -------------------------------------------------------------
@pytest.mark.parametrize("streaming, held_layers", [(False, 2), (True, 1)])
def test_batched_cfg_hands_over_the_sharers_batch_without_a_copy(models, conds, streaming, held_layers):
    """One receiver call holds cond and uncond (2 rows); the sharer runs one batch in that order, and its
    K/V are handed over as they are: held bytes = layers held × (K + V) × 2 rows × 48 tokens × 256 × fp32."""
    a, b = models["a"], models["b"]
    src = capture(b, conds["sharer_pos"], conds["sharer_neg"], streaming=streaming)
    patched = fused(a, src, projector(b, a, "weighted"))
    sample(patched, conds["pos"], conds["neg"])
    r = report(patched)
    assert r.model_calls == STEPS                               # batched: one receiver call per step
    assert r.peak_kv_bytes == held_layers * 2 * (2 * 48 * 256 * 4)
    assert r.copied_kv_bytes == 0


def test_sharer_texts_that_cannot_batch_still_fuse_the_right_roles(models, conds):
    """Sharer prompts of different lengths cannot share a batch: the sharer runs per role, its K/V are
    assembled in the receiver's order (a copy, reported), and the result equals the receiver's roles."""
    a, twin = models["a"], models["a_again"]
    patched = fused(a, capture(twin, conds["pos"], conds["short_neg"]), projector(twin, a))
    # the receiver batches (equal lengths) but the twin's own negative is shorter: roles still line up,
    # so the twin's positive K/V equal the receiver's own and the negative's differ
    out = sample(patched, conds["pos"], conds["neg"])
    r = report(patched)
    assert r.copied_kv_bytes > 0
    assert torch.equal(out, sample(patched, conds["pos"], conds["neg"]))
    assert not torch.equal(out, sample(a, conds["pos"], conds["neg"]))


# --- guiders whose branches are not (positive, negative) in list order --------------------------------
def dual_cfg(model, cond1, cond2, negative, cfg_conds=4.0, cfg_cond2_negative=2.0):
    import comfy_extras.nodes_custom_sampler as custom
    import host
    return host.run_node(custom.DualCFGGuider, model, cond1, cond2, negative, cfg_conds, cfg_cond2_negative,
                         "regular")[0]


def perp_neg(model, positive, negative, empty, cfg=4.0, neg_scale=1.0):
    from comfy_extras.nodes_perpneg import PerpNegGuider
    return PerpNegGuider.execute(model, positive, negative, empty, cfg, neg_scale).args[0]


@pytest.mark.parametrize("neg", ["neg", "short_neg"])
def test_dual_cfg_identity_twin_is_stock(models, conds, neg):
    """DualCFG's chunks arrive as cond indexes (2, 1, 0) = (positive, middle, negative); by role the twin's
    positive feeds the positive branch and its negative the middle and negative branches."""
    a, twin = models["a"], models["a_again"]
    patched = fused(a, capture(twin, conds["pos"], conds[neg]), projector(twin, a))
    out = custom_sample(dual_cfg(patched, conds["pos"], conds[neg], conds[neg]))
    assert torch.equal(out, custom_sample(dual_cfg(a, conds["pos"], conds[neg], conds[neg])))


def test_dual_cfg_sharers_positive_reaches_the_positive_branch(models, conds):
    """With both scales 1 DualCFG evaluates only its positive (cond index 2): a twin whose negative is
    deliberately different still reproduces stock, a twin whose positive differs does not."""
    a, twin = models["a"], models["a_again"]
    stock = custom_sample(dual_cfg(a, conds["pos"], conds["neg"], conds["neg"], 1.0, 1.0))
    right = fused(a, capture(twin, conds["pos"], conds["other"]), projector(twin, a))
    wrong = fused(a, capture(twin, conds["other"], conds["pos"]), projector(twin, a))
    assert torch.equal(custom_sample(dual_cfg(right, conds["pos"], conds["neg"], conds["neg"], 1.0, 1.0)), stock)
    assert not torch.equal(custom_sample(dual_cfg(wrong, conds["pos"], conds["neg"], conds["neg"], 1.0, 1.0)), stock)


@pytest.mark.parametrize("streaming", [True, False])
def test_dual_cfg_middle_takes_the_sharers_own_middle(models, conds, streaming):
    """Capture KV Cache's optional middle feeds DualCFG's middle (cond2): an identity twin given the receiver's
    positive-like middle reproduces stock bit for bit; without it the twin's negative feeds the middle (today's
    mapping), so the output differs."""
    a, twin = models["a"], models["a_again"]
    proj = projector(twin, a)
    stock = custom_sample(dual_cfg(a, conds["pos"], conds["other"], conds["neg"]))
    own = fused(a, capture(twin, conds["pos"], conds["neg"], streaming, middle=conds["other"]), proj)
    out = custom_sample(dual_cfg(own, conds["pos"], conds["other"], conds["neg"]))
    assert torch.equal(out, stock)
    negative_as_middle = fused(a, capture(twin, conds["pos"], conds["neg"], streaming), proj)
    assert not torch.equal(custom_sample(dual_cfg(negative_as_middle, conds["pos"], conds["other"], conds["neg"])),
                           out)


def test_dual_cfg_with_a_different_sharer_changes_the_output_deterministically(models, conds):
    a, b = models["a"], models["b"]
    patched = fused(a, capture(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a, "weighted"))
    first = custom_sample(dual_cfg(patched, conds["pos"], conds["neg"], conds["neg"]))
    assert torch.isfinite(first).all()
    assert torch.equal(first, custom_sample(dual_cfg(patched, conds["pos"], conds["neg"], conds["neg"])))
    assert not torch.equal(first, custom_sample(dual_cfg(a, conds["pos"], conds["neg"], conds["neg"])))


def test_perp_neg_identity_twin_is_stock_and_roles_line_up(models, conds):
    a, twin = models["a"], models["a_again"]
    patched = fused(a, capture(twin, conds["pos"], conds["neg"]), projector(twin, a))
    out = custom_sample(perp_neg(patched, conds["pos"], conds["neg"], conds["neg"]))
    assert torch.equal(out, custom_sample(perp_neg(a, conds["pos"], conds["neg"], conds["neg"])))
    # cfg 1, neg_scale 0: only the positive is evaluated, and the twin's (different) negative never reaches it
    stock = custom_sample(perp_neg(a, conds["pos"], conds["neg"], conds["neg"], 1.0, 0.0))
    right = fused(a, capture(twin, conds["pos"], conds["other"]), projector(twin, a))
    assert torch.equal(custom_sample(perp_neg(right, conds["pos"], conds["neg"], conds["neg"], 1.0, 0.0)), stock)


def test_dual_cfg_replays_a_recording_by_role(models, conds):
    """DualCFG at scales 1 follows the positive alone, as a cfg-1 recording does: replay reproduces stock."""
    a, twin = models["a"], models["a_again"]
    proj = projector(twin, a)
    rec = record(twin, conds["pos"], conds["neg"], cfg=1.0)
    out = custom_sample(dual_cfg(fused(a, rec, proj), conds["pos"], conds["neg"], conds["neg"], 1.0, 1.0))
    assert torch.equal(out, custom_sample(dual_cfg(a, conds["pos"], conds["neg"], conds["neg"], 1.0, 1.0)))
    with pytest.raises(ValueError, match=r"Fuse Caches › kv_source: a recording without the sharer's negative pass"
                                         r".*Fix: record with cfg > 1"):
        custom_sample(dual_cfg(fused(a, rec, proj), conds["pos"], conds["neg"], conds["neg"]))


def test_a_guider_with_unknown_branches_is_refused(models, conds):
    import comfy.samplers
    a, b = models["a"], models["b"]

    class TwoPromptGuider(comfy.samplers.CFGGuider):
        def set_conds(self, first, second):
            self.inner_set_conds({"first": first, "second": second})

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds["second"],
                                                    self.conds["first"], self.cfg, model_options, seed)

    guider = TwoPromptGuider(fused(a, capture(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a)))
    guider.set_conds(conds["pos"], conds["neg"])
    guider.set_cfg(4.0)
    with pytest.raises(ValueError, match=r"Fuse Caches › model: a TwoPromptGuider guider whose conditionings are "
                                         r"named \['first', 'second'\].*Fix: sample the bridged model with one"):
        custom_sample(guider)


# --- a LoRA'd sharer from the receiver's own loader -------------------------------------------------------
@pytest.fixture(scope="module")
def lora_name(comfy, tiny_models):
    """A LoRA for the tiny model in the tests' loras folder: a weight difference on each block's self-attention."""
    from safetensors.torch import save_file
    folder = tiny_models.root / "loras"
    folder.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {f"diffusion_model.blocks.{i}.self_attn.{w}.diff": 0.05 * torch.randn(256, 256, generator=gen)
               for i in range(2) for w in ("q", "k", "v")}
    save_file(tensors, str(folder / "dcb_test_lora.safetensors"))
    return "dcb_test_lora.safetensors"


def with_lora(model, name):
    import nodes
    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]


def test_lora_sharer_of_the_receivers_loader_is_refused_live(models, conds, lora_name):
    a = models["a"]
    sharer = with_lora(a, lora_name)
    assert sharer.model is a.model and sharer.patches
    with pytest.raises(ValueError, match=r"Capture KV Cache › sharer: a sharer that shares the receiver's loaded "
                                         r"model but has other weight patches.*Fix: record the sharer with Record KV"):
        fused(a, capture(sharer, conds["pos"], conds["neg"]), projector(sharer, a))


def test_lora_sharer_of_the_receivers_loader_is_recorded_with_its_lora(models, conds, lora_name):
    a = models["a"]
    sharer = with_lora(a, lora_name)
    proj = projector(a, a)
    plain = sample(fused(a, record(a, conds["pos"], conds["neg"]), proj), conds["pos"], conds["neg"])
    lora = sample(fused(a, record(sharer, conds["pos"], conds["neg"]), proj), conds["pos"], conds["neg"])
    assert torch.equal(plain, sample(a, conds["pos"], conds["neg"]))
    assert not torch.equal(lora, plain)


# --- split samplers: windows are sigma percent ---------------------------------------------------------
def advanced(model, pos, neg, start, end, add_noise="enable", leftover="disable", latent_image=None, steps=8):
    import nodes
    (out,) = nodes.KSamplerAdvanced().sample(model, add_noise, 7, steps, 4.0, "euler", "simple", pos, neg,
                                             latent_image or latent(), start, end, leftover)
    return out


def test_split_ksampler_advanced_follows_sigma_percent_windows(models, conds):
    """Window [0, 0.45] of 8 steps covers steps 0-3 (sigma percent 0 … 0.375) in one run or in two halves:
    the second half (steps 4-8) never runs the sharer, and the halves together equal one full run."""
    a, b = models["a"], models["b"]
    patched = fused(a, capture(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a, "weighted"), 1.0, 0.0,
                    0.45)
    first = advanced(patched, conds["pos"], conds["neg"], 0, 4, leftover="enable")
    assert report(patched).sharer_forwards == 4
    second = advanced(patched, conds["pos"], conds["neg"], 4, 10000, add_noise="disable", latent_image=first)
    assert report(patched).sharer_forwards == 0
    stock_second = advanced(a, conds["pos"], conds["neg"], 4, 10000, add_noise="disable", latent_image=first)
    assert torch.equal(second["samples"], stock_second["samples"])
    full = advanced(patched, conds["pos"], conds["neg"], 0, 10000)
    assert report(patched).sharer_forwards == 4
    stock_halves = advanced(a, conds["pos"], conds["neg"], 4, 10000, add_noise="disable",
                            latent_image=advanced(a, conds["pos"], conds["neg"], 0, 4, leftover="enable"))
    stock_full = advanced(a, conds["pos"], conds["neg"], 0, 10000)
    # the halves differ from one run only by the latent's process_out/process_in round trip between them
    tolerance = (stock_halves["samples"] - stock_full["samples"]).abs().max() * 4 + 1e-6
    assert (second["samples"] - full["samples"]).abs().max() <= tolerance


# --- samplers that evaluate the model twice per step ------------------------------------------------------
@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_two_evaluation_samplers_replay_equals_live(models, conds, sampler):
    a, twin = models["a"], models["a_again"]
    proj = projector(twin, a)
    stock = sample(a, conds["pos"], conds["neg"], sampler=sampler)
    patched = fused(a, capture(twin, conds["pos"], conds["neg"]), proj)
    live = sample(patched, conds["pos"], conds["neg"], sampler=sampler)
    assert report(patched).model_calls > STEPS                   # more than one evaluation per step
    rec = record(twin, conds["pos"], conds["neg"], sampler=sampler)
    assert len(rec.recording.evaluations) == report(patched).model_calls
    # the memory check before recording counts every evaluation: one per step would be too low
    from dit_cache_bridge.c2c_comfy import memory, recorded
    size = dict(chunks=2, layers=2, tokens=48, heads=2, head_dim=128, storage_dtype="fp32")
    assert memory.recording_bytes(steps=STEPS, **size) < rec.recording.nbytes
    assert rec.recording.nbytes <= memory.recording_bytes(steps=STEPS * recorded.EVALUATIONS_PER_STEP[sampler], **size)
    replayed = sample(fused(a, rec, proj), conds["pos"], conds["neg"], sampler=sampler)
    assert torch.equal(live, stock) and torch.equal(replayed, live)


def test_two_evaluation_samplers_differ_from_euler_with_a_different_sharer(models, conds):
    a, b = models["a"], models["b"]
    proj = projector(b, a, "weighted")
    rec = record(b, conds["sharer_pos"], conds["sharer_neg"], sampler="heun")
    live = sample(fused(a, capture(b, conds["sharer_pos"], conds["sharer_neg"]), proj), conds["pos"], conds["neg"],
                  sampler="heun")
    replayed = sample(fused(a, rec, proj), conds["pos"], conds["neg"], sampler="heun")
    assert not torch.equal(replayed, live)          # the sharer's own trajectory, not the receiver's
    assert torch.equal(replayed, sample(fused(a, rec, proj), conds["pos"], conds["neg"], sampler="heun"))


def test_replay_with_refresh_reuses_the_evaluation_each_window_began_with(models, conds):
    a, b = models["a"], models["b"]
    proj = projector(b, a, "weighted")
    every = fused(a, record(b, conds["sharer_pos"], conds["sharer_neg"]), proj)
    second = fused(a, record(b, conds["sharer_pos"], conds["sharer_neg"], refresh_every=2), proj)
    out_every, out_second = sample(every, conds["pos"], conds["neg"]), sample(second, conds["pos"], conds["neg"])
    assert report(every).sharer_forwards == STEPS and report(second).sharer_forwards == STEPS // 2
    assert not torch.equal(out_second, out_every)
    assert torch.equal(out_second, sample(second, conds["pos"], conds["neg"]))


def test_replay_with_another_sampler_is_refused_at_the_first_differing_evaluation(models, conds):
    a, b = models["a"], models["b"]
    rec = record(b, conds["sharer_pos"], conds["sharer_neg"], sampler="euler")
    with pytest.raises(ValueError, match=r"Fuse Caches › kv_source: a recording whose model evaluation 2 is at "
                                         r"sigma .*expected the receiver's sampler evaluating the model at sigma .*"
                                         r"Fix: record with the receiver's sampler_name"):
        sample(fused(a, rec, projector(b, a, "weighted")), conds["pos"], conds["neg"], sampler="heun")


# --- per-call shape changes -----------------------------------------------------------------------------
def test_replay_into_another_batch_size_is_refused_before_the_first_step(models, conds):
    a, b = models["a"], models["b"]
    rec = record(b, conds["sharer_pos"], conds["sharer_neg"], batch=1)
    with pytest.raises(ValueError, match=r"Fuse Caches › kv_source: a recording of a latent batch of 1; expected "
                                         r"the receiver's latent batch of 2"):
        sample(fused(a, rec, projector(b, a, "weighted")), conds["pos"], conds["neg"], batch=2)


def test_area_conditioning_on_the_receiver_is_refused(models, conds):
    import nodes
    a, b = models["a"], models["b"]
    area = nodes.ConditioningSetArea().append(conds["pos"], 32, 32, 0, 0, 1.0)[0]
    patched = fused(a, capture(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a, "weighted"))
    with pytest.raises(ValueError, match=r"Fuse Caches › model: a model call on 1 chunk\(s\) of shape .*expected "
                                         r"whole-latent chunks.*Fix: remove area or mask conditioning"):
        sample(patched, area, conds["short_neg"])


def test_context_windows_on_the_receiver_are_refused(models, conds):
    from comfy_extras.nodes_context_windows import WanContextWindowsManualNode
    a, b = models["a"], models["b"]
    patched = fused(a, capture(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a, "weighted"))
    import inspect
    newer = {"freenoise": False} if "freenoise" in inspect.signature(WanContextWindowsManualNode.execute).parameters else {}
    windowed = WanContextWindowsManualNode.execute(patched, 5, 1, "standard_static", 1, False, "pyramid", **newer).args[0]
    with pytest.raises(ValueError, match=r"Fuse Caches › model: a model evaluation on a latent of shape "
                                         r"\(1, 16, 2, 8, 8\).*Fix: remove context windows"):
        sample(windowed, conds["pos"], conds["neg"])


def test_the_noisy_latent_reaches_a_sharer_on_another_grid_by_nearest(tiny_models, models, conds, monkeypatch):
    """Interpolating the noisy latent would lower its variance below sigma²: every value the sharer sees
    is one of the receiver's latent values (nearest), while its K/V may still be resampled trilinearly."""
    import host
    from comfy_test_nodes import clip_vision_features, i2v_conditioning
    pack_nodes()
    import dit_cache_bridge.c2c_comfy.live as live
    a, i2v = models["a"], load_model(tiny_models.path(host.I2V))
    small = torch.randn(1, 16, 2, 6, 6, generator=torch.Generator().manual_seed(6))
    pos = i2v_conditioning(conds["pos"], small, clip_vision_features(3))
    neg = i2v_conditioning(conds["neg"], small, clip_vision_features(3))
    seen = []
    real = live.resample_latent

    def spy(x, shape, mode):
        out = real(x, shape, mode)
        if mode == "nearest" and x.shape[-3:] != out.shape[-3:]:
            seen.append(bool(torch.isin(out, x).all()))
        elif x.shape[-3:] != out.shape[-3:] and torch.count_nonzero(x):
            seen.append(False)                      # a noisy latent interpolated
        return out
    monkeypatch.setattr(live, "resample_latent", spy)
    out = sample(fused(a, capture(i2v, pos, neg, grid_alignment="trilinear"), projector(i2v, a, "weighted")),
                 conds["pos"], conds["neg"])
    assert torch.isfinite(out).all() and len(seen) == STEPS and all(seen)


def test_conditioning_that_adds_frames_to_the_receiver_is_refused(models, conds):
    """Wan's time_dim_concat (reference frames appended in time) gives self-attention more tokens than the
    sampled latent has: refused with the node's name instead of a shape error from inside the fusion."""
    import node_helpers
    a, b = models["a"], models["b"]
    extra = {"time_dim_concat": torch.zeros(1, 16, 1, 8, 8)}
    pos, neg = (node_helpers.conditioning_set_values(conds[k], extra) for k in ("pos", "neg"))
    patched = fused(a, capture(b, conds["sharer_pos"], conds["sharer_neg"]), projector(b, a, "weighted"))
    with pytest.raises(ValueError, match=r"Fuse Caches › model: self-attention over 64 tokens in layer 0; expected "
                                         r"the 48 tokens of the sampled latent \(3×4×4\).*Fix: remove conditioning"):
        sample(patched, pos, neg)
