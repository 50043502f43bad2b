"""ComfyUI and diffusers agree: the same tiny weights, converted, and the same projector bundle.

The ComfyUI side is the real host in-process (the ``comfy`` fixture) with this pack's bridge; the
diffusers side is c2c_diffusers on weights converted by c2c_diffusers.convert. fp32 throughout.
"""
import importlib

import pytest
import torch
from safetensors.torch import load_file

import tiny
from c2c_core import FusionSchedule, LayerMap, ModelSignature, ProjectorBank, load_bundle, save_bundle
from c2c_core.recording import load_recording
from c2c_diffusers import Bridge, LiveSharer, RecordedSharer, SharerInputs, convert
from c2c_diffusers.hooks import add_taps, remove_taps

pytestmark = [pytest.mark.usefixtures("comfy"), pytest.mark.slow]

TEXT = 512


def comfy_keys(patcher, x, t, context, **extra):
    """K after RoPE of every block as ComfyUI's attention override sees it (B, N, H*D)."""
    from bridge_helpers import pack_nodes
    pack_nodes()
    compat = importlib.import_module("dit_cache_bridge.c2c_comfy.compat")
    clone, got = patcher.clone(), {}
    layers = list(range(len(patcher.model.diffusion_model.blocks)))

    def grab(layer, q, k, v, heads, transformer_options):
        got[layer] = k.clone()
        return k, v
    compat.hook_self_attention(clone, layers, grab)
    with torch.no_grad():
        clone.model.diffusion_model(x, t, context, transformer_options=clone.model_options["transformer_options"], **extra)
    return got


def diffusers_keys(transformer, **inputs):
    got = {}

    def grab(layer, k, v):
        got[layer] = k.flatten(2).clone()
        return k, v
    add_taps(transformer, range(len(transformer.blocks)), "test.grab", grab)
    try:
        with torch.no_grad():
            transformer(**inputs, return_dict=False)
    finally:
        remove_taps(transformer, "test.grab")
    return got


@pytest.mark.parametrize("name", ["tiny_wan_t2v_a", "tiny_wan_i2v"])
def test_converted_weights_round_trip_exactly(tiny_models, name):
    weights = load_file(tiny_models.path(name))
    back = convert.to_comfy(convert.from_comfy(weights).state_dict())
    assert sorted(back) == sorted(weights)
    assert all(torch.equal(back[k], weights[k]) for k in weights)


@pytest.mark.parametrize("name", ["tiny_wan_t2v_a", "tiny_wan_i2v"])
def test_keys_after_rope_agree_per_layer(tiny_models, name):
    from bridge_helpers import load_model
    patcher = load_model(tiny_models.path(name))
    transformer = convert.from_comfy(load_file(tiny_models.path(name)))
    i2v = transformer.config.in_channels == 36
    x = torch.randn(1, transformer.config.in_channels, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    context = tiny.embeds(20, tokens=TEXT if i2v else 12)
    t = torch.tensor([640.0])
    extra = {"clip_fea": tiny.embeds(21, tokens=6, dim=1280)} if i2v else {}
    theirs = comfy_keys(patcher, x, t, context, **extra)
    ours = diffusers_keys(transformer, hidden_states=x, timestep=t, encoder_hidden_states=context,
                          encoder_hidden_states_image=extra.get("clip_fea"))
    assert sorted(theirs) == sorted(ours) == [0, 1]
    for layer in ours:
        err = (ours[layer] - theirs[layer]).abs().max() / theirs[layer].abs().max()
        print(f"{name} layer {layer}: K relative difference {err:.2e}")
        assert err <= 1e-5, f"layer {layer}: relative difference {err:.2e}"


def seeded_bundle(tiny_models, path, seed=3):
    sig = ModelSignature(2, 2, 128)
    layer_map = LayerMap.build("identity", 2, 2)
    bank = ProjectorBank.build("full", sig, sig, layer_map.layers, hidden_dim=64)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_bundle(path, bank, layer_map)


def diffusers_trained_bundle(tiny_models, path):
    """A 'full' projector trained for a few steps through the diffusers bridge (c2c_diffusers.training)."""
    from c2c_core import TrainConfig, train_bank, velocity_loss
    from c2c_core.bundle import ProjectorBundle
    from c2c_diffusers.training import TrainingBatch, bridged_velocity

    sig = ModelSignature(2, 2, 128)
    layer_map = LayerMap.build("identity", 2, 2)
    bank = ProjectorBank.build("full", sig, sig, layer_map.layers, hidden_dim=64)
    receiver = convert.from_comfy(load_file(tiny_models.path("tiny_wan_t2v_a"))).requires_grad_(False)
    sharer = convert.from_comfy(load_file(tiny_models.path("tiny_wan_t2v_b"))).requires_grad_(False)
    bundle = ProjectorBundle(bank=bank, layer_map=layer_map, sharer=sig, receiver=sig)
    bridge = Bridge(LiveSharer(sharer, SharerInputs(tiny.embeds(3))), bundle).attach(receiver)

    def batches(step):
        g = torch.Generator().manual_seed(step)
        return TrainingBatch(x0=torch.randn(1, 16, 3, 8, 8, generator=g), noise=torch.randn(1, 16, 3, 8, 8, generator=g),
                             sigma=0.5, prompt_embeds=tiny.embeds(1), sharer=SharerInputs(tiny.embeds(3)))
    train_bank(bank, layer_map, batches, velocity_loss(bridged_velocity(bridge, receiver)), TrainConfig(steps=3, lr=1e-2))
    bridge.detach()
    save_bundle(path, bank, layer_map, provenance={"trainer": "c2c_diffusers"})


@pytest.mark.parametrize("make_bundle", [seeded_bundle, diffusers_trained_bundle])
def test_a_bundle_fused_in_diffusers_gives_the_comfy_bridged_latents(tiny_models, tmp_path, make_bundle):
    """Same receiver/sharer weights, conditioning, noise, sigmas, Euler + CFG 4; the same projector file in both
    hosts (seeded, or trained through the diffusers bridge)."""
    import comfy.sample
    import comfy.samplers
    from bridge_helpers import empty_latent, ksample, load_model, pack_nodes
    from comfy_test_nodes import wan_conditioning

    path = tmp_path / "full.safetensors"
    make_bundle(tiny_models, path)

    conds = {name: wan_conditioning(seed, length) for name, seed, length in
             (("pos", 1, 8), ("neg", 2, 5), ("sharer_pos", 3, 8), ("sharer_neg", 4, 5))}
    steps, cfg, seed, strength = 4, 4.0, 7, 0.7

    receiver = load_model(tiny_models.path("tiny_wan_t2v_a"))
    sharer = load_model(tiny_models.path("tiny_wan_t2v_b"))
    nodes = pack_nodes()
    comfy_bundle = importlib.import_module("c2c_core").load_bundle(path)
    source = nodes.CaptureKVCache.execute(sharer, conds["sharer_pos"], conds["sharer_neg"], layers="auto",
                                          refresh_every=1, rope_alignment="auto").args[0]
    fused = nodes.FuseCaches.execute(receiver, source, comfy_bundle, strength, 0.0, 1.0, "constant", "").args[0]
    theirs = ksample(fused, conds["pos"], conds["neg"], cfg=cfg, seed=seed, steps=steps)

    sampling = receiver.get_model_object("model_sampling")
    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(sampling, "simple", steps)]
    x = comfy.sample.prepare_noise(empty_latent()["samples"], seed) * sigmas[0]

    wan = convert.from_comfy(load_file(tiny_models.path("tiny_wan_t2v_a")))
    inputs = SharerInputs(conds["sharer_pos"][0][0], conds["sharer_neg"][0][0])
    bridge = Bridge(LiveSharer(convert.from_comfy(load_file(tiny_models.path("tiny_wan_t2v_b"))), inputs), load_bundle(path),
                    strength=strength, schedule=FusionSchedule()).attach(wan)
    x = euler_cfg(wan, x, sigmas, conds, cfg, bridge)
    bridge.detach()
    ours = receiver.model.process_latent_out(x)
    plain = ksample(receiver, conds["pos"], conds["neg"], cfg=cfg, seed=seed, steps=steps)
    assert (theirs - plain).abs().max() > 1e-3, "the projector must change the output for this test to mean anything"
    assert bridge.last_report.sharer_forwards == 2 * steps
    err = (ours - theirs).abs().max() / theirs.abs().max()
    print(f"latents relative difference {err:.2e}, fusion moved them by {(theirs - plain).abs().max():.3f}")
    assert err <= 1e-5, f"relative difference {err:.2e}"


def test_bidirectional_fusion_in_diffusers_gives_the_comfy_bidirectional_latents(tiny_models, tmp_path):
    """Both hosts fuse both ways with the same two projector files (forward and backward) and agree: the sharer
    receives at the same blocks, from the same receiver layers, at the same strengths."""
    import comfy.sample
    import comfy.samplers
    from bridge_helpers import empty_latent, ksample, load_model, pack_nodes
    from comfy_test_nodes import wan_conditioning

    seeded_bundle(tiny_models, tmp_path / "forward.safetensors")
    seeded_bundle(tiny_models, tmp_path / "backward.safetensors", seed=5)
    conds = {name: wan_conditioning(seed, length) for name, seed, length in
             (("pos", 1, 8), ("neg", 2, 5), ("sharer_pos", 3, 8), ("sharer_neg", 4, 5))}
    steps, cfg, seed, strength, back = 4, 4.0, 7, 0.7, 0.8
    receiver = load_model(tiny_models.path("tiny_wan_t2v_a"))
    sharer = load_model(tiny_models.path("tiny_wan_t2v_b"))
    nodes = pack_nodes()
    pack_load = importlib.import_module("c2c_core").load_bundle
    source = nodes.CaptureKVCache.execute(sharer, conds["sharer_pos"], conds["sharer_neg"], layers="auto",
                                          refresh_every=1, rope_alignment="auto").args[0]
    one_way = nodes.FuseCaches.execute(receiver, source, pack_load(tmp_path / "forward.safetensors"), strength, 0.0,
                                       1.0, "constant", "").args[0]
    both = nodes.FuseCaches.execute(receiver, source, pack_load(tmp_path / "forward.safetensors"), strength, 0.0, 1.0,
                                    "constant", "", direction="bidirectional",
                                    backward_projector=pack_load(tmp_path / "backward.safetensors"),
                                    backward_strength=back).args[0]
    theirs = ksample(both, conds["pos"], conds["neg"], cfg=cfg, seed=seed, steps=steps)
    theirs_one_way = ksample(one_way, conds["pos"], conds["neg"], cfg=cfg, seed=seed, steps=steps)
    assert (theirs - theirs_one_way).abs().max() > 1e-3, "receiving must change the output for this test to mean anything"

    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(receiver.get_model_object("model_sampling"), "simple", steps)]
    x = comfy.sample.prepare_noise(empty_latent()["samples"], seed) * sigmas[0]
    wan = convert.from_comfy(load_file(tiny_models.path("tiny_wan_t2v_a")))
    inputs = SharerInputs(conds["sharer_pos"][0][0], conds["sharer_neg"][0][0])
    live = LiveSharer(convert.from_comfy(load_file(tiny_models.path("tiny_wan_t2v_b"))), inputs,
                      backward=load_bundle(tmp_path / "backward.safetensors"), backward_strength=back)
    bridge = Bridge(live, load_bundle(tmp_path / "forward.safetensors"), strength=strength).attach(wan)
    x = euler_cfg(wan, x, sigmas, conds, cfg, bridge)
    bridge.detach()
    ours = receiver.model.process_latent_out(x)
    err = (ours - theirs).abs().max() / theirs.abs().max()
    print(f"bidirectional latents relative difference {err:.2e}, receiving moved them by "
          f"{(theirs - theirs_one_way).abs().max():.3f}")
    assert err <= 1e-5, f"relative difference {err:.2e}"


def euler_cfg(wan, x, sigmas, conds, cfg, bridge):
    """ComfyUI's euler + CFG on a diffusers transformer, with the cache context WanPipeline would give."""
    with torch.no_grad(), bridge.session(sigmas=sigmas):
        for i in range(len(sigmas) - 1):
            t = torch.tensor([sigmas[i] * 1000.0])
            velocity = {}
            for branch, cond in (("cond", conds["pos"]), ("uncond", conds["neg"])):
                with wan.cache_context(branch, step_index=i, sigma=sigmas[i]):
                    velocity[branch] = wan(hidden_states=x, timestep=t, encoder_hidden_states=cond[0][0],
                                           return_dict=False)[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * (velocity["uncond"] + cfg * (velocity["cond"] - velocity["uncond"]))
    return x


def test_a_comfy_recording_replayed_in_diffusers_gives_the_comfy_recorded_latents(tiny_models, tmp_path):
    """Record KV Cache in ComfyUI -> the recording file -> RecordedSharer in diffusers; same bundle, same sampling."""
    import comfy.sample
    import comfy.samplers
    from bridge_helpers import empty_latent, ksample, load_model, pack_nodes
    from comfy_test_nodes import wan_conditioning

    bundle_path = tmp_path / "full.safetensors"
    seeded_bundle(tiny_models, bundle_path)
    conds = {name: wan_conditioning(seed, length) for name, seed, length in
             (("pos", 1, 8), ("neg", 2, 5), ("sharer_pos", 3, 8), ("sharer_neg", 4, 5))}
    steps, cfg, seed, strength = 4, 4.0, 7, 0.7
    receiver = load_model(tiny_models.path("tiny_wan_t2v_a"))
    nodes = pack_nodes()
    pack_core = importlib.import_module("c2c_core")
    source = nodes.RecordKVCache.execute(load_model(tiny_models.path("tiny_wan_t2v_b")), conds["sharer_pos"],
                                         conds["sharer_neg"], empty_latent(), seed, steps, cfg, "euler", "simple", 1.0,
                                         layers="all", storage_dtype="fp32").args[0]
    fused = nodes.FuseCaches.execute(receiver, source, pack_core.load_bundle(bundle_path), strength, 0.0, 1.0,
                                     "constant", "").args[0]
    theirs = ksample(fused, conds["pos"], conds["neg"], cfg=cfg, seed=seed, steps=steps)
    importlib.import_module("c2c_core.recording").save_recording(tmp_path / "rec.safetensors",
                                                                                  source.recording)

    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(receiver.get_model_object("model_sampling"), "simple", steps)]
    x = comfy.sample.prepare_noise(empty_latent()["samples"], seed) * sigmas[0]
    wan = convert.from_comfy(load_file(tiny_models.path("tiny_wan_t2v_a")))
    bridge = Bridge(RecordedSharer(load_recording(tmp_path / "rec.safetensors")), load_bundle(bundle_path),
                    strength=strength).attach(wan)
    ours = receiver.model.process_latent_out(euler_cfg(wan, x, sigmas, conds, cfg, bridge))
    bridge.detach()
    plain = ksample(receiver, conds["pos"], conds["neg"], cfg=cfg, seed=seed, steps=steps)
    assert (theirs - plain).abs().max() > 1e-3
    assert bridge.last_report.model_calls == 2 * steps and bridge.last_report.sharer_forwards == 0
    err = (ours - theirs).abs().max() / theirs.abs().max()
    print(f"recorded: latents relative difference {err:.2e}")
    assert err <= 1e-5, f"relative difference {err:.2e}"


@pytest.mark.parametrize("refresh", [dict(refresh="every", refresh_every=3),
                                     dict(refresh="adaptive", threshold=0.15, max_reuse=3, signal="input"),
                                     dict(refresh="budget", budget=3, max_reuse=5)], ids=["every3", "adaptive", "budget3"])
def test_both_hosts_run_the_sharer_at_the_same_steps(tiny_models, tmp_path, refresh):
    """Capture KV Cache's refresh inputs in ComfyUI and the same policy in diffusers, on the same weights, bundle,
    conditioning, noise and sigmas: one tracker code, one signal, so the same steps run the sharer (issue 19), and
    the K/V reused in between give the same latents. every3 and budget3 take the default signal (sigma) through the
    node; adaptive the input signal (the nodes have no input for it: Capture KV Cache's own make_live_source), so
    both hosts' input meters are compared."""
    import comfy.sample
    import comfy.samplers
    from bridge_helpers import empty_latent, ksample, load_model, pack_nodes
    from comfy_test_nodes import wan_conditioning
    from c2c_core.refresh import RefreshPolicy
    from c2c_diffusers.bridge import REFRESH_FIELDS

    path = tmp_path / "full.safetensors"
    seeded_bundle(tiny_models, path)
    conds = {name: wan_conditioning(seed, length) for name, seed, length in
             (("pos", 1, 8), ("neg", 2, 5), ("sharer_pos", 3, 8), ("sharer_neg", 4, 5))}
    steps, cfg, seed, strength = 8, 4.0, 7, 0.7
    receiver = load_model(tiny_models.path("tiny_wan_t2v_a"))
    sharer = load_model(tiny_models.path("tiny_wan_t2v_b"))
    nodes = pack_nodes()
    policy = RefreshPolicy(**{REFRESH_FIELDS.get(name, name): value for name, value in refresh.items()})
    if "signal" in refresh:
        source = nodes.capture.make_live_source(nodes.CaptureKVCache.NODE, sharer, conds["sharer_pos"],
                                                conds["sharer_neg"], refresh=nodes.capture.RefreshPolicy.from_dict(
                                                    policy.to_dict()))
    else:
        source = nodes.CaptureKVCache.execute(sharer, conds["sharer_pos"], conds["sharer_neg"], layers="auto",
                                              rope_alignment="auto", **refresh).args[0]
    fused = nodes.FuseCaches.execute(receiver, source, importlib.import_module("c2c_core").load_bundle(path), strength,
                                     0.0, 1.0, "constant", "").args[0]
    theirs = ksample(fused, conds["pos"], conds["neg"], cfg=cfg, seed=seed, steps=steps)
    wrappers = fused.wrappers["outer_sample"]
    comfy_report = wrappers[next(k for k in wrappers if k.startswith("dit_cache_bridge"))][0].__self__.last_report

    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(receiver.get_model_object("model_sampling"), "simple", steps)]
    x = comfy.sample.prepare_noise(empty_latent()["samples"], seed) * sigmas[0]
    wan = convert.from_comfy(load_file(tiny_models.path("tiny_wan_t2v_a")))
    inputs = SharerInputs(conds["sharer_pos"][0][0], conds["sharer_neg"][0][0])
    bridge = Bridge(LiveSharer(convert.from_comfy(load_file(tiny_models.path("tiny_wan_t2v_b"))), inputs),
                    load_bundle(path), strength=strength, refresh=policy).attach(wan)
    ours = receiver.model.process_latent_out(euler_cfg(wan, x, sigmas, conds, cfg, bridge))
    bridge.detach()
    report = bridge.last_report
    print(f"{refresh}: ComfyUI ran the sharer at {comfy_report.refresh['sharer_steps']}, diffusers at "
          f"{report.refresh['sharer_steps']}")
    assert report.refresh["sharer_steps"] == comfy_report.refresh["sharer_steps"]
    assert 1 < len(report.refresh["sharer_steps"]) < steps, "the policy must both run and reuse for this to mean much"
    if refresh["refresh"] == "budget":
        assert len(report.refresh["sharer_steps"]) == refresh["budget"]    # a run to sigma 0 spends its budget
        assert report.refresh["sharer_steps"][1] >= steps // 2               # late in the schedule
    assert report.sharer_forwards == comfy_report.sharer_forwards == 2 * len(report.refresh["sharer_steps"])
    err = (ours - theirs).abs().max() / theirs.abs().max()
    assert err <= 1e-5, f"relative difference {err:.2e}"
