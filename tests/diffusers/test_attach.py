"""Attaching a bridge to a diffusers transformer or pipeline, and detaching it, bit-for-bit."""
import pytest
import torch

import tiny
from c2c_diffusers import Bridge, BridgeSetupError, LiveSharer, SharerInputs
from c2c_diffusers.hooks import SelfAttentionTap


def forward(transformer, x, t, e):
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]


@pytest.fixture
def inputs():
    return tiny.latent(), torch.tensor([700.0]), tiny.embeds(10)


def test_strength_zero_is_bit_identical_and_never_runs_the_sharer(inputs):
    receiver = tiny.wan(1)
    plain = forward(receiver, *inputs)
    bridge = Bridge(LiveSharer(tiny.wan(2), SharerInputs(tiny.embeds(10))), tiny.bundle("weighted"), strength=0.0)
    bridge.attach(receiver)
    assert torch.equal(forward(receiver, *inputs), plain)
    bridge.detach()
    assert bridge.last_report.sharer_forwards == 0 and bridge.last_report.model_calls == 1


def test_identity_twin_is_bit_identical_and_another_sharer_is_not(inputs):
    receiver = tiny.wan(1)
    plain = forward(receiver, *inputs)
    twin = Bridge(LiveSharer(tiny.wan(1), SharerInputs(inputs[2])), tiny.bundle("identity")).attach(receiver)
    assert torch.equal(forward(receiver, *inputs), plain)
    twin.detach()
    assert twin.last_report.sharer_forwards == 1 and twin.last_report.strength == {0: 1.0, 1: 1.0}

    other = Bridge(LiveSharer(tiny.wan(2), SharerInputs(inputs[2])), tiny.bundle("identity"), strength=0.5)
    other.attach(receiver)
    assert (forward(receiver, *inputs) - plain).abs().max() > 1e-3
    other.detach()
    assert other.last_report.k_change[0] > 0


def test_detach_restores_processors_hooks_and_output(inputs):
    receiver = tiny.wan(1)
    processors = [block.attn1.processor for block in receiver.blocks]
    plain = forward(receiver, *inputs)
    bridge = Bridge(LiveSharer(tiny.wan(2), SharerInputs(inputs[2])), tiny.bundle("identity")).attach(receiver)
    assert all(isinstance(block.attn1.processor, SelfAttentionTap) for block in receiver.blocks)
    assert not torch.equal(forward(receiver, *inputs), plain)
    bridge.detach()
    assert [block.attn1.processor for block in receiver.blocks] == processors
    assert bridge.key not in receiver._diffusers_hook.hooks
    assert torch.equal(forward(receiver, *inputs), plain)


def test_the_users_attention_backend_stays_in_force(inputs):
    receiver = tiny.wan(1)
    bridge = Bridge(LiveSharer(tiny.wan(2), SharerInputs(inputs[2])), tiny.bundle("identity")).attach(receiver)
    receiver.blocks[0].attn1.set_attention_backend("_native_math")
    inner = receiver.blocks[0].attn1.processor.inner
    assert str(inner._attention_backend.value) == "_native_math"
    bridge.detach()
    assert receiver.blocks[0].attn1.processor is inner


def test_wan_pipeline_twin_and_strength_zero_are_bit_identical_with_cfg():
    pipe = tiny.wan_pipe(tiny.wan(1))
    plain = tiny.run_pipe(pipe)
    twin = Bridge(LiveSharer(tiny.wan(1), SharerInputs(tiny.embeds(10), tiny.embeds(11))), tiny.bundle("identity"))
    twin.attach(pipe)
    assert torch.equal(tiny.run_pipe(pipe), plain)
    twin.detach()
    assert (twin.last_report.model_calls, twin.last_report.sharer_forwards) == (6, 6)

    swapped = Bridge(LiveSharer(tiny.wan(1), SharerInputs(tiny.embeds(11), tiny.embeds(10))), tiny.bundle("identity"))
    swapped.attach(pipe)
    assert not torch.equal(tiny.run_pipe(pipe), plain), "cond/uncond branches must reach the sharer by name"
    swapped.detach()

    off = Bridge(LiveSharer(tiny.wan(2), SharerInputs(tiny.embeds(10), tiny.embeds(11))), tiny.bundle("identity"),
                 strength=0.0).attach(pipe)
    assert torch.equal(tiny.run_pipe(pipe), plain)
    off.detach()
    assert torch.equal(tiny.run_pipe(pipe), plain)


def test_bundle_for_another_receiver_is_refused():
    bridge = Bridge(LiveSharer(tiny.wan(2, num_layers=3), SharerInputs(tiny.embeds(10))),
                    tiny.bundle("identity", layers=(0, 1, 2), sharer_layers=3, receiver_layers=3))
    with pytest.raises(BridgeSetupError, match=r"receiver WanTransformer3DModel has 2 layers .* made for 3"):
        bridge.attach(tiny.wan(1))


def test_missing_negative_embeddings_name_the_fix():
    pipe = tiny.wan_pipe(tiny.wan(1))
    bridge = Bridge(LiveSharer(tiny.wan(2), SharerInputs(tiny.embeds(10))), tiny.bundle("identity")).attach(pipe)
    with pytest.raises(BridgeSetupError, match="negative_prompt_embeds is None"):
        tiny.run_pipe(pipe)
    bridge.detach()
    assert not any(isinstance(b.attn1.processor, SelfAttentionTap) for b in pipe.transformer.blocks)


def test_the_receiver_can_be_its_own_sharer(inputs):
    receiver = tiny.wan(1)
    plain = forward(receiver, *inputs)
    bridge = Bridge(LiveSharer(receiver, SharerInputs(inputs[2])), tiny.bundle("identity")).attach(receiver)
    assert torch.equal(forward(receiver, *inputs), plain)
    bridge.detach()
    assert bridge.last_report.sharer_forwards == 1
    assert not any(isinstance(b.attn1.processor, SelfAttentionTap) for b in receiver.blocks)


def test_a_processor_that_never_dispatches_is_refused_and_nothing_stays_attached(inputs):
    class OwnAttention:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            return hidden_states

    receiver = tiny.wan(1)
    receiver.blocks[1].attn1.set_processor(OwnAttention())
    first = receiver.blocks[0].attn1.processor
    sharer = tiny.wan(2)
    with pytest.raises(BridgeSetupError, match="block 1: self-attention processor OwnAttention does not call"):
        Bridge(LiveSharer(sharer, SharerInputs(inputs[2])), tiny.bundle("identity")).attach(receiver)
    assert receiver.blocks[0].attn1.processor is first
    assert not getattr(receiver, "_diffusers_hook", None) or not receiver._diffusers_hook.hooks
    assert not any(isinstance(b.attn1.processor, SelfAttentionTap) for b in sharer.blocks)


def test_each_pipeline_call_is_one_run_without_a_session():
    pipe = tiny.wan_pipe(tiny.wan(1))
    bridge = Bridge(LiveSharer(tiny.wan(2), SharerInputs(tiny.embeds(10), tiny.embeds(11))), tiny.bundle("weighted"))
    bridge.attach(pipe)
    tiny.run_pipe(pipe, steps=2)
    assert bridge.last_report is None               # the run stays open until sampling starts over
    tiny.run_pipe(pipe, steps=3)
    assert bridge.last_report.model_calls == 4      # the first run, closed when the second began
    bridge.detach()
    assert bridge.last_report.model_calls == 6
