"""Model selection across steps in diffusers (issue 19, docs/model_selection.md): Wan2.2's two experts, the
high-noise expert sampling alone above the boundary and sharing its K/V once, at the switch, with the low-noise
expert, which fuses them in every later step (refresh budget 1). Strength 0 is the plain expert switch."""
import pytest
import torch

import tiny
from c2c_core.refresh import RefreshPolicy
from c2c_diffusers import Bridge, LiveSharer, SharerInputs

STEPS = 6
BOUNDARY = 0.875       # Wan2.2 text-to-video's own: timesteps 1000, 961, 909 high noise; 833, 714, 500 low noise
SWITCH = 3


@pytest.fixture(scope="module")
def experts():
    high, low = tiny.wan(1), tiny.wan(4)
    pipe = tiny.wan_pipe(high, low, boundary_ratio=BOUNDARY)
    return pipe, high, low


def bridged(pipe, high, low, strength):
    """Run the pipeline with the high-noise expert sharing into the low-noise one; (latents, report, sharer timesteps)."""
    timesteps = []
    handle = high.register_forward_pre_hook(lambda m, a, kw: timesteps.append(float(kw["timestep"].flatten()[0])),
                                            with_kwargs=True)
    bridge = Bridge(LiveSharer(high, SharerInputs(tiny.embeds(10), tiny.embeds(11))), tiny.bundle("weighted"),
                    strength=strength, refresh=RefreshPolicy(mode="budget", budget=1),
                    scheduler=pipe.scheduler).attach(low)
    try:
        out = tiny.run_pipe(pipe, steps=STEPS)
    finally:
        bridge.detach()
        handle.remove()
    return out, bridge.last_report, timesteps


def test_the_high_noise_expert_shares_once_at_the_switch(experts):
    pipe, high, low = experts
    plain = tiny.run_pipe(pipe, steps=STEPS)
    fused, report, timesteps = bridged(pipe, high, low, 1.0)
    sigmas = [float(s) for s in pipe.scheduler.sigmas]
    switch_t = sigmas[SWITCH] * 1000.0
    assert report.model_calls == 2 * (STEPS - SWITCH), "the bridge sees the low-noise expert's calls only"
    assert report.refresh["sharer_steps"] == [SWITCH] and report.refresh["forwards_saved"] == STEPS - SWITCH - 1
    assert report.sharer_forwards == 2                          # once, cond and uncond
    pipeline_calls, bridge_calls = timesteps[:2 * SWITCH], timesteps[2 * SWITCH:]
    assert all(t >= BOUNDARY * 1000 for t in pipeline_calls)    # the expert sampling alone above the boundary
    assert bridge_calls == pytest.approx([switch_t, switch_t])  # then once more, on the receiver's first latent
    assert (fused - plain).abs().max() > 1e-3 and torch.isfinite(fused).all()


def test_strength_zero_is_the_plain_expert_switch_bit_for_bit(experts):
    """The baseline without fusion (T-Stitch / FlowBlending: switch models, fuse nothing)."""
    pipe, high, low = experts
    plain = tiny.run_pipe(pipe, steps=STEPS)
    off, report, timesteps = bridged(pipe, high, low, 0.0)
    assert torch.equal(off, plain)
    assert report.sharer_forwards == 0 and len(timesteps) == 2 * SWITCH, "strength 0 never runs the sharer"
