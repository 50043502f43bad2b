"""Image-to-video pipelines: WanImageToVideoPipeline (cache_context without a step) and ChronoEditPipeline
(no cache_context: the CFG branch comes from the call order)."""
import torch

import tiny
from c2c_diffusers import BridgeConfig, WanChronoEditBridge

STEPS = 2


def call_args(**extra):
    return dict(prompt_embeds=tiny.embeds(10, tokens=512), negative_prompt_embeds=tiny.embeds(11, tokens=512),
                height=tiny.HEIGHT, width=tiny.WIDTH, num_frames=tiny.FRAMES, num_inference_steps=STEPS,
                guidance_scale=4.0, output_type="latent", generator=torch.Generator().manual_seed(0), **extra)


def twin_bridge(receiver, sharer, **config):
    """The API with a twin of the receiver as sharer (the 'wan' slot shares when target is 'chronoedit')."""
    return WanChronoEditBridge(BridgeConfig(target="chronoedit", projector_kind="identity", **config), sharer, receiver)


def test_wan_image_to_video_twin_and_strength_zero_are_bit_identical():
    receiver, twin = tiny.wan_i2v_pipe(tiny.wan(3, **tiny.I2V_WAN)), tiny.wan_i2v_pipe(tiny.wan(3, **tiny.I2V_WAN))
    plain = receiver(image=tiny.image(), **call_args()).frames
    bridge = twin_bridge(receiver, twin)
    assert torch.equal(bridge.generate_with_fusion(tiny.image(), **call_args()).frames, plain)
    assert bridge.last_report.sharer_forwards == 2 * STEPS
    other = twin_bridge(receiver, tiny.wan_i2v_pipe(tiny.wan(4, **tiny.I2V_WAN)), strength=0.0)
    assert torch.equal(other.generate_with_fusion(tiny.image(), **call_args()).frames, plain)
    assert torch.equal(receiver(image=tiny.image(), **call_args()).frames, plain)


def test_chronoedit_twin_is_bit_identical_through_the_call_order_fallback():
    receiver, twin = tiny.chronoedit_pipe(tiny.chronoedit(3)), tiny.chronoedit_pipe(tiny.chronoedit(3))
    plain = receiver(image=tiny.image(), **call_args()).frames
    bridge = twin_bridge(receiver, twin)
    assert torch.equal(bridge.generate_with_fusion(tiny.image(), **call_args()).frames, plain)
    assert (bridge.last_report.model_calls, bridge.last_report.sharer_forwards) == (2 * STEPS, 2 * STEPS)
    swapped = twin_bridge(receiver, twin)
    out = swapped.generate_with_fusion(tiny.image(), **call_args(), sharer_prompt_embeds=tiny.embeds(11, tokens=512),
                                       sharer_negative_prompt_embeds=tiny.embeds(10, tokens=512)).frames
    assert not torch.equal(out, plain), "a sharer fed the other branch's prompt must change the result"
