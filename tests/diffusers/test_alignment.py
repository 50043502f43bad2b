"""Grid and RoPE alignment read from the models: a ChronoEdit sharer into a Wan receiver.

diffusers' ChronoEdit rotates 2-frame latents at temporal positions [0, 7] (its rope_temporal_skip_len),
Wan at [0, 1]. The bridge reads the positions back from each model's own RoPE tables and re-rotates the
sharer's keys; with identical weights the first block's keys then coincide.
"""
import pytest
import torch

import tiny
from c2c_core import RopeRerotation, RopeSpec
from c2c_diffusers import Bridge, BridgeSetupError, LiveSharer, SharerInputs, models
from c2c_diffusers.hooks import add_taps, remove_taps

TEXT = 512          # I2V transformers split text and image context at 512 text tokens


def keys(transformer, layer, **inputs):
    got = {}

    def grab(index, k, v):
        got[index] = (k.clone(), v.clone())
        return k, v
    add_taps(transformer, [layer], "test.grab", grab)
    try:
        with torch.no_grad():
            out = transformer(**inputs, return_dict=False)[0]
    finally:
        remove_taps(transformer, "test.grab")
    return got[layer], out


@pytest.fixture(scope="module")
def pair():
    """A ChronoEdit transformer and a Wan I2V transformer with the same weights, and one set of inputs."""
    chrono = tiny.chronoedit(3)
    wan = tiny.wan(3, in_channels=36, image_dim=1280, added_kv_proj_dim=256)
    wan.load_state_dict(chrono.state_dict())
    condition = tiny.latent(5, channels=20)
    inputs = dict(hidden_states=torch.cat([tiny.latent(0), condition], dim=1), timestep=torch.tensor([600.0]),
                  encoder_hidden_states=tiny.embeds(10, tokens=TEXT), encoder_hidden_states_image=tiny.embeds(12, tokens=4, dim=1280))
    return chrono, wan, condition, inputs


@pytest.mark.parametrize("frames, scale_t", [(1, 1.0), (2, 7.0), (3, 1.0), (5, 1.0)])
def test_positions_are_read_from_the_models_rope(frames, scale_t):
    shape = (1, 16, frames, 4, 6)
    assert models.rope_spec(tiny.chronoedit(3), shape) == RopeSpec(scale=(scale_t, 1.0, 1.0))
    assert models.rope_spec(tiny.wan(3), shape) == RopeSpec()
    assert models.token_grid(tiny.wan(3), shape).shape == (frames, 2, 3)


def test_chronoedit_keys_rerotated_match_wans_direct_rotation(pair):
    chrono, wan, _, inputs = pair
    (k_chrono, v_chrono), _ = keys(chrono, 0, **inputs)
    (k_wan, v_wan), _ = keys(wan, 0, **inputs)
    shape = inputs["hidden_states"].shape
    grid = models.token_grid(wan, shape)
    src, dst = models.rope_spec(chrono, shape).positions(grid), models.rope_spec(wan, shape).positions(grid)
    assert not torch.allclose(k_chrono, k_wan, atol=1e-2), "the two models must rotate differently"
    rerotated = RopeRerotation(src, dst, 128).apply(k_chrono)
    assert (rerotated - k_wan).abs().max() <= 1e-5 * k_wan.abs().max()
    assert torch.equal(v_chrono, v_wan)


def test_bridge_realigns_a_chronoedit_sharer_into_a_wan_receiver(pair):
    chrono, wan, condition, inputs = pair
    with torch.no_grad():
        plain = wan(**inputs, return_dict=False)[0]
    sharer_inputs = SharerInputs(inputs["encoder_hidden_states"], image_embeds=inputs["encoder_hidden_states_image"],
                                 condition=condition)
    results = {}     # block 0 only: from block 1 on the two models' hidden states differ (positions differ)
    for alignment in ("auto", "off"):
        bridge = Bridge(LiveSharer(chrono, sharer_inputs), tiny.bundle("identity", layers=(0,)),
                        rope_alignment=alignment).attach(wan)
        with torch.no_grad():
            results[alignment] = wan(**inputs, return_dict=False)[0]
        bridge.detach()
    assert (results["auto"] - plain).abs().max() <= 1e-5 * plain.abs().max()
    assert (results["off"] - plain).abs().max() > 1e-3 * plain.abs().max()


def test_a_sharer_on_another_grid_is_refused_unless_resampling_is_asked_for(pair):
    chrono, wan, _, inputs = pair
    other = SharerInputs(inputs["encoder_hidden_states"], image_embeds=inputs["encoder_hidden_states_image"],
                         condition=tiny.latent(5, channels=20, size=6))
    bridge = Bridge(LiveSharer(chrono, other), tiny.bundle("identity", layers=(1,))).attach(wan)
    with pytest.raises(BridgeSetupError, match=r"condition latent is \(2, 6, 6\).*receiver samples \(2, 4, 4\)"):
        with torch.no_grad():
            wan(**inputs, return_dict=False)
    bridge.detach()
    bridge = Bridge(LiveSharer(chrono, other, grid_alignment="nearest"), tiny.bundle("identity", layers=(1,)),
                    strength=0.5).attach(wan)
    with torch.no_grad():
        out = wan(**inputs, return_dict=False)[0]
    bridge.detach()
    assert out.shape == inputs["hidden_states"][:, :16].shape and torch.isfinite(out).all()
    assert bridge.last_report.k_change[1] > 0


def test_positions_are_read_from_bf16_tables_at_480p_81_frames():
    """A transformer cast with .to(bfloat16) keeps its RoPE tables in bf16: positions up to 51 still read exactly."""
    shape = (1, 16, 21, 60, 104)          # 480 × 832, 81 frames
    assert models.rope_spec(tiny.wan(3).to(torch.bfloat16), shape) == RopeSpec()
    assert models.rope_spec(tiny.chronoedit(3).to(torch.bfloat16), (1, 16, 2, 60, 104)) == RopeSpec(scale=(7.0, 1.0, 1.0))
