"""The one-call API: WanChronoEditBridge(config, wan, chronoedit).generate_with_fusion(...) with tiny pipelines."""
import pytest
import torch

import tiny
from c2c_core import LayerMap, ModelSignature, ProjectorBank, save_bundle
from c2c_diffusers import BridgeConfig, BridgeSetupError, WanChronoEditBridge

STEPS = 3


def call_args(seed=0):
    return dict(prompt_embeds=tiny.embeds(10, tokens=512), negative_prompt_embeds=tiny.embeds(11, tokens=512),
                height=tiny.HEIGHT, width=tiny.WIDTH, num_frames=tiny.FRAMES, num_inference_steps=STEPS,
                guidance_scale=4.0, output_type="latent", generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pipes():
    return tiny.wan_pipe(tiny.wan(1)), tiny.chronoedit_pipe(tiny.chronoedit(3))


def plain(pipe, **extra):
    return pipe(**call_args(), **extra).frames


def test_wan_receiver_with_chronoedit_sharer_runs_live_and_strength_zero_is_plain(pipes):
    wan, chrono = pipes
    reference = plain(wan)
    bridge = WanChronoEditBridge(BridgeConfig(projector_kind="weighted", strength=1.0), wan, chrono)
    fused = bridge.generate_with_fusion(tiny.image(), **call_args()).frames
    report = bridge.last_report
    assert (report.model_calls, report.sharer_forwards) == (2 * STEPS, 2 * STEPS)
    assert (fused - reference).abs().max() > 1e-3 and torch.isfinite(fused).all()
    off = WanChronoEditBridge(BridgeConfig(projector_kind="weighted", strength=0.0), wan, chrono)
    assert torch.equal(off.generate_with_fusion(tiny.image(), **call_args()).frames, reference)
    assert torch.equal(plain(wan), reference), "the pipelines must be left as they were"


def test_the_refresh_fields_reach_the_bridge(pipes):
    wan, chrono = pipes
    bridge = WanChronoEditBridge(BridgeConfig(projector_kind="weighted", refresh="budget", budget=1), wan, chrono)
    bridge.generate_with_fusion(tiny.image(), **call_args())
    report = bridge.last_report
    assert report.refresh["sharer_steps"] == [0] and report.refresh["forwards_saved"] == STEPS - 1
    assert report.sharer_forwards == 2                  # once, for cond and uncond


def test_chronoedit_receiver_with_wan_sharer_uses_the_cfg_fallback(pipes):
    wan, chrono = pipes
    reference = plain(chrono, image=tiny.image())
    bridge = WanChronoEditBridge(BridgeConfig(target="chronoedit", projector_kind="weighted", end=0.5), wan, chrono)
    fused = bridge.generate_with_fusion(tiny.image(), **call_args()).frames
    assert bridge.last_report.model_calls == 2 * STEPS
    assert 0 < bridge.last_report.sharer_forwards < 2 * STEPS       # window [0, 0.5]
    assert (fused - reference).abs().max() > 1e-3


def test_recorded_mode_samples_the_sharer_first_then_replays(pipes, tmp_path):
    wan, chrono = pipes
    sig = ModelSignature(2, 2, 128)
    layer_map = LayerMap.build("terminal", 2, 2, layers=[1])
    save_bundle(tmp_path / "p.safetensors", ProjectorBank.build("weighted", sig, sig, [1]), layer_map)
    config = BridgeConfig(projector=str(tmp_path / "p.safetensors"), mode="recorded", storage_dtype="fp32",
                          record_folder=str(tmp_path / "rec"))
    own = chrono.scheduler
    chrono.scheduler = type(own).from_config(own.config, shift=3.0)     # recorded with the receiver's scheduler anyway
    bridge = WanChronoEditBridge(config, wan, chrono)
    try:
        fused = bridge.generate_with_fusion(tiny.image(), **call_args()).frames
    finally:
        restored, chrono.scheduler = chrono.scheduler, own
    assert restored.config.shift == 3.0, "the sharer pipeline gets its own scheduler back"
    assert bridge.last_report.sharer_forwards == 0 and bridge.last_report.layers == [1]
    assert bridge.last_recording.steps == STEPS and bridge.last_recording.layers == (1,)
    assert (fused - plain(wan)).abs().max() > 1e-3


def test_bidirectional_wan_and_chronoedit_fuse_both_ways(pipes):
    """ChronoEdit shares into Wan and receives Wan's K/V back: strength 0 both ways is plain, backward strength 0
    is the one-way run bit for bit, both ways on changes the output."""
    wan, chrono = pipes
    reference = plain(wan)

    def run(**config):
        bridge = WanChronoEditBridge(BridgeConfig(projector_kind="weighted", direction="bidirectional", **config),
                                     wan, chrono)
        return bridge.generate_with_fusion(tiny.image(), **call_args()).frames, bridge

    off, _ = run(strength=0.0, backward_strength=0.0)
    assert torch.equal(off, reference)
    one_way = WanChronoEditBridge(BridgeConfig(projector_kind="weighted"), wan, chrono)
    one_way_out = one_way.generate_with_fusion(tiny.image(), **call_args()).frames
    receive_nothing, _ = run(backward_strength=0.0)
    assert torch.equal(receive_nothing, one_way_out)
    both, bridge = run()
    assert (both - one_way_out).abs().max() > 1e-4
    assert bridge.last_report.sharer_forwards == 2 * STEPS and bridge.last_backward_report.strength == {0: 1.0, 1: 1.0}
    assert torch.equal(plain(wan), reference), "the pipelines must be left as they were"


def test_config_refuses_what_it_cannot_do():
    with pytest.raises(BridgeSetupError, match=r"direction='bidirectional' with mode='recorded'; expected mode 'live'"):
        BridgeConfig(direction="bidirectional", mode="recorded")
    with pytest.raises(BridgeSetupError, match=r"direction='bidirectional' with refresh_every=2; expected 1"):
        BridgeConfig(direction="bidirectional", refresh_every=2)
    with pytest.raises(BridgeSetupError, match=r"target='flux'; expected one of \('wan', 'chronoedit'\)"):
        BridgeConfig(target="flux")
    with pytest.raises(ValueError, match="window starts at 0.8 after it ends at 0.2"):
        BridgeConfig(start=0.8, end=0.2)


def test_an_image_to_video_sharer_without_an_image_is_refused(pipes):
    wan, chrono = pipes
    bridge = WanChronoEditBridge(BridgeConfig(), wan, chrono)
    with pytest.raises(BridgeSetupError, match="is image-to-video and needs image="):
        bridge.generate_with_fusion(None, **call_args())
