"""Bidirectional fusion in diffusers: the sharer steps block by block with the receiver and receives its K/V."""
import pytest
import torch

import tiny
from c2c_core import LayerMap, ModelSignature, ProjectorBank
from c2c_core.bundle import ProjectorBundle
from c2c_diffusers import Bridge, BridgeSetupError, LiveSharer, SharerInputs
from c2c_core import lockstep

STEPS = 3


def inputs():
    return SharerInputs(tiny.embeds(10), tiny.embeds(11))


def sample(pipe, bundle, sharer=None, strength=1.0, **live):
    """A bridged WanPipeline run (CFG 4); returns the latents and the bridge (detached)."""
    bridge = Bridge(LiveSharer(sharer if sharer is not None else tiny.wan(2), inputs(), **live), bundle,
                    strength=strength).attach(pipe)
    try:
        return tiny.run_pipe(pipe, steps=STEPS), bridge
    finally:
        bridge.detach()


@pytest.fixture(scope="module")
def pipe():
    return tiny.wan_pipe(tiny.wan(1))


@pytest.fixture(scope="module")
def stock(pipe):
    return tiny.run_pipe(pipe, steps=STEPS)


def test_identity_twins_both_ways_are_bit_identical_to_stock(pipe, stock):
    """The twin hands the receiver its own K/V and receives them back: nothing may change, bit for bit."""
    out, bridge = sample(pipe, tiny.bundle("identity"), tiny.wan(1), backward=tiny.bundle("identity"))
    assert torch.equal(out, stock)
    assert bridge.last_report.sharer_forwards == 2 * STEPS
    assert bridge.last_backward_report.strength == {0: 1.0, 1: 1.0}, "the backward bank fused in every call"


def test_strength_zero_both_ways_is_stock_and_never_runs_the_sharer(pipe, stock):
    out, bridge = sample(pipe, tiny.bundle("weighted"), strength=0.0, backward=tiny.bundle("weighted"),
                         backward_strength=0.0)
    assert torch.equal(out, stock) and bridge.last_report.sharer_forwards == 0


def test_receiving_changes_the_output_through_later_sharer_layers(pipe):
    """Backward strength 0 is the one-way run bit for bit; on, the sharer's block 0 receives the receiver's
    layer 0, so its layer 1 (read by the receiver) and the output change, the same in every run. With only
    layer 0 fused nothing after the receiving block is read: bidirectional equals one way."""
    one_way, one = sample(pipe, tiny.bundle("weighted"))
    none_back, _ = sample(pipe, tiny.bundle("weighted"), backward=tiny.bundle("weighted"), backward_strength=0.0)
    assert torch.equal(none_back, one_way)
    runs = [sample(pipe, tiny.bundle("weighted"), backward=tiny.bundle("weighted")) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and (runs[0][0] - one_way).abs().max() > 1e-4
    assert runs[0][1].last_report.peak_kv_bytes < one.last_report.peak_kv_bytes, "lockstep holds one layer at a time"
    layer_0 = tiny.bundle("weighted", layers=[0])
    assert torch.equal(sample(pipe, layer_0, backward=tiny.bundle("weighted"))[0], sample(pipe, layer_0)[0])


def test_the_receivers_grad_mode_survives_the_switches():
    """The sharer runs without grad in its coroutine; the receiver's forward keeps its own grad mode."""
    receiver = tiny.wan(1)
    bridge = Bridge(LiveSharer(tiny.wan(2), inputs(), backward=tiny.bundle("weighted")),
                    tiny.bundle("weighted")).attach(receiver)
    with torch.enable_grad(), bridge.session():
        out = receiver(hidden_states=tiny.latent(), timestep=torch.tensor([500.0]),
                       encoder_hidden_states=tiny.embeds(10), return_dict=False)[0]
        assert torch.is_grad_enabled() and out.requires_grad
    bridge.detach()
    assert bridge.last_report.sharer_forwards == 1


def test_what_cannot_be_fused_both_ways_is_refused():
    from c2c_core import RefreshPolicy
    wide = ProjectorBundle(bank=ProjectorBank.build("weighted", ModelSignature(2, 2, 128), ModelSignature(3, 2, 128),
                                                    [0, 1, 2]),
                           layer_map=LayerMap.build("terminal", 2, 3), sharer=ModelSignature(2, 2, 128),
                           receiver=ModelSignature(3, 2, 128))
    with pytest.raises(BridgeSetupError, match=r"backward projector feeds a model of 3 layers.*swapped"):
        LiveSharer(tiny.wan(2), inputs(), backward=wide)
    with pytest.raises(BridgeSetupError, match=r"backward_strength=-1; expected a number in \[0, 10\]"):
        LiveSharer(tiny.wan(2), inputs(), backward=tiny.bundle("weighted"), backward_strength=-1)
    with pytest.raises(BridgeSetupError, match=r"bidirectional fusion with refresh_every 2; expected 1"):
        Bridge(LiveSharer(tiny.wan(2), inputs(), backward=tiny.bundle("weighted")), tiny.bundle("weighted"),
               refresh=RefreshPolicy(every=2)).attach(tiny.wan(1))
    receiver = tiny.wan(1)
    bridge = Bridge(LiveSharer(receiver, inputs(), backward=tiny.bundle("weighted")), tiny.bundle("weighted"))
    bridge.attach(receiver)
    with pytest.raises(BridgeSetupError, match="needs two transformer objects"):
        receiver(hidden_states=tiny.latent(), timestep=torch.tensor([500.0]), encoder_hidden_states=tiny.embeds(1),
                 return_dict=False)
    bridge.detach()


def test_without_greenlet_bidirectional_is_refused_with_the_fix(monkeypatch):
    from c2c_diffusers import BridgeConfig
    monkeypatch.setattr(lockstep, "greenlet", None)
    with pytest.raises(BridgeSetupError, match=r"needs the Python package greenlet; run `pip install greenlet`"):
        LiveSharer(tiny.wan(2), inputs(), backward=tiny.bundle("weighted"))
    with pytest.raises(BridgeSetupError, match=r"direction='bidirectional' needs the Python package greenlet"):
        BridgeConfig(direction="bidirectional")
