"""c2c_core's lockstep driver, captured-K/V store and backward bookkeeping, without a host.

A "sharer forward" here is a plain function calling the driver's capture hook per layer, as a
host's attention hook does; the hosts' own tests (tests/pack/test_lockstep.py,
tests/diffusers/test_bidirectional.py) check the same driver inside real models.
"""
import pytest
import torch

from c2c_core import FusionSchedule, LayerMap, ProjectorBank, TokenGrid
from c2c_core.bundle import ProjectorBundle
from c2c_core.capture import CapturedKV
from c2c_core.contract import NEGATIVE, POSITIVE, SharerDone
from c2c_core.lockstep import BackwardFusion, Lockstep, available, is_monotone
from c2c_core.runtime import FusionRun
from core_helpers import signature

pytestmark = pytest.mark.skipif(not available(), reason="greenlet is a dependency (pyproject.toml)")


def test_a_map_that_reads_sharer_layers_out_of_order_does_not_stream():
    assert is_monotone({0: 0, 1: 1, 2: 1, 3: 2})
    assert not is_monotone({0: 1, 1: 0})


def kv_of(layer, rows=1):
    return torch.full((rows, 4, 8), float(layer)), torch.full((rows, 4, 8), -float(layer))


def sharer(steps, log, layers=4, rows=1):
    """A sharer forward: blocks 0..layers-1, each handing its K/V to the driver."""
    def forward():
        for layer in range(layers):
            log.append(layer)
            steps.capture(layer, *kv_of(layer, rows))
    return forward


def test_the_sharer_runs_only_as_far_as_the_receiver_asks_and_holds_one_layer():
    store, log = CapturedKV(), []
    steps = Lockstep(store, [0, 1, 2], streams=True)
    steps.queue((POSITIVE,), sharer(steps, log))
    assert log == [] and steps.forwards == 0                       # queued, not started
    k, v = steps.kv(0, (POSITIVE,))
    assert log == [0] and torch.equal(k, kv_of(0)[0]) and steps.forwards == 1
    steps.kv(1, (POSITIVE,))
    assert log == [0, 1] and sorted(store.batches) == [1]          # layer 0 dropped: the receiver is past it
    steps.kv(2, (POSITIVE,))
    assert log == [0, 1, 2] and steps.forwards == 1                # the last captured layer ends the forward
    assert store.peak_bytes == 2 * 4 * 8 * 4


def test_stop_unwinds_a_suspended_sharer():
    store, log, unwound = CapturedKV(), [], []

    def forward():
        try:
            sharer(steps, log)()
        finally:
            unwound.append(True)
    steps = Lockstep(store, [0, 1, 2], streams=True)
    steps.queue((POSITIVE,), forward)
    steps.kv(0, (POSITIVE,))
    steps.stop()
    assert unwound == [True] and log == [0]


def test_a_branch_no_forward_produces_is_a_key_error():
    steps = Lockstep(CapturedKV(), [0], streams=True)
    with pytest.raises(KeyError):
        steps.kv(0, (NEGATIVE,))


def test_resuming_context_holds_only_while_the_sharer_runs():
    inside = []
    state = {"in_sharer": False}

    class Resuming:
        def __enter__(self):
            state["in_sharer"] = True

        def __exit__(self, *exc):
            state["in_sharer"] = False

    store = CapturedKV()
    steps = Lockstep(store, [0, 1], streams=True, resuming=Resuming)

    def forward():
        for layer in range(2):
            inside.append(state["in_sharer"])
            steps.capture(layer, *kv_of(layer))
    steps.queue((POSITIVE,), forward)
    steps.kv(0, (POSITIVE,))
    assert state["in_sharer"] is False
    steps.kv(1, (POSITIVE,))
    assert inside == [True, True] and state["in_sharer"] is False


def test_the_store_hands_back_whole_tensors_and_counts_what_it_copies():
    store = CapturedKV()
    k, v = kv_of(3, rows=2)
    store.put(3, k, v, (POSITIVE, NEGATIVE))
    assert store.get(3, (POSITIVE, NEGATIVE))[0] is k and store.copied_bytes == 0
    assert torch.equal(store.get(3, (NEGATIVE,))[0], k[1:]) and store.copied_bytes == 0
    swapped, _ = store.get(3, (NEGATIVE, POSITIVE))
    assert torch.equal(swapped, torch.cat([k[1:], k[:1]])) and store.copied_bytes == 2 * k.numel() * 4
    store.drop((NEGATIVE,))
    assert not store.has(3, POSITIVE)
    with pytest.raises(KeyError):
        store.get(3, (POSITIVE,))


def test_sharer_done_ends_a_forward_quietly():
    steps = Lockstep(CapturedKV(), [0], streams=False)
    steps.queue((POSITIVE,), lambda: (_ for _ in ()).throw(SharerDone()))
    with pytest.raises(KeyError):
        steps.kv(0, (POSITIVE,))                                    # the forward ended without layer 0


def test_backward_fuses_the_offered_receiver_kv_into_the_sharer_block_that_reads_it():
    sig = signature(layers=2, heads=2, head_dim=4)
    layer_map = LayerMap.build("identity", 2, 2, layers=[0, 1])
    bank = ProjectorBank.build("weighted", sig, sig, layer_map.layers, alpha=1.0).eval()
    bundle = ProjectorBundle(bank=bank, layer_map=layer_map, sharer=sig, receiver=sig)
    backward = BackwardFusion(bundle)
    grid = TokenGrid(1, 1, 4)
    backward.run = FusionRun(bundle, FusionSchedule(), 0.5, sharer_grid=grid, receiver_grid=grid, stats=False)
    backward.begin_call(0.0)
    rk, rv = torch.randn(2, 4, 8), torch.randn(2, 4, 8)             # the receiver's batch: (positive, negative)
    backward.offer(1, rk, rv, (POSITIVE, NEGATIVE))
    k, v = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    assert backward.fuse(0, k, v, (NEGATIVE,))[0] is k              # nothing offered for layer 0
    k2, v2 = backward.fuse(1, k, v, (NEGATIVE,))
    torch.testing.assert_close(k2, torch.lerp(k, rk[1:], 0.5))       # the negative rows, at strength 0.5
    assert backward.offered == {}                                    # the last reader used them
    assert backward.close().layers == [0, 1]
