"""The per-layer path of FusionRun: never reads a tensor back to the host; statistics cheap or off.

The guard below makes every way of reading a tensor's value on the host (item, bool, float, int,
tolist, numpy, cpu) raise; on a GPU each of those is a device sync per fused layer.
"""

import contextlib

import pytest
import torch

from c2c_core import FusionSchedule, LayerMap, ProjectorBank, RopeSpec, TokenGrid
from c2c_core.bundle import ProjectorBundle
from c2c_core.runtime import FusionRun
from core_helpers import kv, signature

SIG = signature(layers=3, heads=2, head_dim=12)
GRID = TokenGrid(2, 4, 5)
SMALL = TokenGrid(1, 2, 3)
SCALED = RopeSpec(scale=(7.0, 1.0, 1.0))
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
KINDS = {"identity": {}, "weighted": {"alpha": 0.5}, "gating": {}, "full": {"hidden_dim": 8},
         "c2c": {"hidden_dim": 8}}


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Any host read of a tensor's value inside the block raises (a device sync on a GPU)."""
    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read Tensor.{name} in the per-layer path")
        return read
    with monkeypatch.context() as m:
        for name in HOST_READS:
            m.setattr(torch.Tensor, name, refuse(name))
        yield


def bundle(kind, layers=(0, 2)):
    layer_map = LayerMap.build("identity", SIG.num_layers, SIG.num_layers, layers=list(layers))
    torch.manual_seed(0)
    bank = ProjectorBank.build(kind, SIG, SIG, layer_map.layers, **KINDS[kind]).eval()
    return ProjectorBundle(bank=bank, layer_map=layer_map, sharer=SIG, receiver=SIG)


def tokens(grid, seed, dtype=torch.float32):
    return kv(2, grid.numel, SIG, dtype, seed)


def fused_run(kind, sharer_grid=GRID, stats=True, dtype=torch.float32, calls=(0.0, 0.4, 0.9), guard=None,
              strength=0.7):
    """Fuse layers 0 and 2 over three calls; returns (run, [every fused (k, v)])."""
    run = FusionRun(bundle(kind), FusionSchedule(), strength, sharer_grid=sharer_grid, receiver_grid=GRID,
                    sharer_rope=SCALED, grid_mode="nearest", stats=stats)
    outs = []
    with torch.no_grad(), (guard or contextlib.nullcontext()):
        for c, percent in enumerate(calls):
            run.begin_call(percent)
            for layer in (0, 2):
                k, v = tokens(GRID, 10 * c + layer, dtype), tokens(GRID, 10 * c + layer + 1, dtype)
                sk, sv = tokens(sharer_grid, 10 * c + layer + 2, dtype), tokens(sharer_grid, 10 * c + layer + 3, dtype)
                outs.append(run.fuse(layer, k, v, sk, sv))
    return run, outs


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("sharer_grid", [GRID, SMALL])
@pytest.mark.parametrize("stats", [True, False])
def test_the_per_layer_path_never_reads_a_tensor_on_the_host(monkeypatch, kind, sharer_grid, stats):
    run, _ = fused_run(kind, sharer_grid, stats, guard=no_host_reads(monkeypatch))
    report = run.close()                               # the one read of the run
    assert report.layers == [0, 2] and report.nonfinite_layers == []


def test_the_guard_catches_a_host_read(monkeypatch):
    with pytest.raises(AssertionError, match="Tensor.item"), no_host_reads(monkeypatch):
        torch.ones(1).item()


@pytest.mark.parametrize("kind", ["weighted", "c2c"])
def test_statistics_off_fuses_bit_for_bit_and_reports_no_change(kind):
    on, fused_on = fused_run(kind, stats=True)
    off, fused_off = fused_run(kind, stats=False)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(fused_on, fused_off))
    r_on, r_off = on.close(), off.close()
    assert r_off.k_change == {} and r_off.v_change == {}
    assert r_on.k_change[0] > 0 and r_on.v_change[2] > 0
    assert r_off.strength == r_on.strength and r_off.gate == r_on.gate


def test_statistics_off_still_names_non_finite_layers():
    run = FusionRun(bundle("identity"), FusionSchedule(), 1.0, sharer_grid=GRID, receiver_grid=GRID, stats=False)
    run.begin_call(0.0)
    sk = tokens(GRID, 3)
    sk[0, 0, 0, 0] = float("inf")
    run.fuse(2, tokens(GRID, 1), tokens(GRID, 2), sk, tokens(GRID, 4))
    assert run.close().nonfinite_layers == [2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_equal_the_simple_formula(dtype):
    """The mean over calls of ||after - before|| / ||before|| on every 16th token, K and V each."""
    calls = (0.0, 0.4, 0.9)
    run, outs = fused_run("weighted", dtype=dtype, calls=calls)
    report = run.close()
    s = FusionRun.STATS_TOKEN_STRIDE
    for i, layer in enumerate((0, 2)):
        for which, change in ((0, report.k_change), (1, report.v_change)):
            ratios = []
            for c in range(len(calls)):
                before = tokens(GRID, 10 * c + layer + which, dtype)[:, ::s].double()
                after = outs[2 * c + i][which][:, ::s].double()
                ratios.append(((after - before).norm() / before.norm()).item())
            assert change[layer] == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)


@pytest.mark.parametrize("kind", ["identity", "c2c"])
def test_fuse_tokens_takes_either_layout_bit_for_bit_without_host_reads(monkeypatch, kind):
    """The one fuse tail every host calls: (B, N, H*D) as ComfyUI's attention has K/V, (B, N, H, D) as diffusers'."""
    runs = [FusionRun(bundle(kind), FusionSchedule(), 0.7, sharer_grid=GRID, receiver_grid=GRID, sharer_rope=SCALED)
            for _ in range(3)]
    k, v, sk, sv = (tokens(GRID, seed) for seed in range(4))
    with torch.no_grad():
        for run in runs:
            run.begin_call(0.0)
        expected = runs[0].fuse(0, k.clone(), v.clone(), sk, sv)
        with no_host_reads(monkeypatch):
            heads = runs[1].fuse_tokens(0, k.clone(), v.clone(), sk, sv)
            flat = runs[2].fuse_tokens(0, k.flatten(2), v.flatten(2), sk.flatten(2), sv.flatten(2))
    assert heads[0].shape == k.shape and flat[0].shape == k.flatten(2).shape
    assert torch.equal(heads[0], expected[0]) and torch.equal(heads[1], expected[1])
    assert torch.equal(flat[0], expected[0].flatten(2)) and torch.equal(flat[1], expected[1].flatten(2))
