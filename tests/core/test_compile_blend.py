"""The traced half of the fuse tail (docs/compile.md): ``FusionRun.layer_blend`` decides outside the compiled code,
the ``LayerBlend`` it returns is what a compiled receiver traces. One graph, no break, for every projector kind, every
fused layer and every strength; the compiled blend gives the eager one's output and statistics."""

import pytest
import torch

from c2c_core import FusionSchedule, LayerMap, ProjectorBank, TokenGrid
from c2c_core.bundle import ProjectorBundle
from c2c_core.runtime import FusionRun
from core_helpers import kv, signature

pytestmark = pytest.mark.slow      # dynamo traces once per projector kind

SIG = signature(layers=4, heads=2, head_dim=8)
GRID = TokenGrid(1, 2, 3)


class CountingBackend:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def run_of(kind, **hparams):
    layer_map = LayerMap.build("identity", 4, 4, layers=[0, 1, 2, 3])
    torch.manual_seed(0)
    bank = ProjectorBank.build(kind, SIG, SIG, layer_map.layers, **hparams).eval()
    bundle = ProjectorBundle(bank=bank, layer_map=layer_map, sharer=SIG, receiver=SIG)
    return FusionRun(bundle, FusionSchedule(ramp="linear_down"), 0.9, sharer_grid=GRID, receiver_grid=GRID)


def fuse_every_layer(run, blend_fn, sk, k, v):
    """Three calls at falling strength, every layer: what a host's hand-off and its traced blend do."""
    out = []
    for percent in (0.0, 0.4, 0.7):
        run.begin_call(percent)
        for layer in run.layers:
            blend = run.layer_blend(layer, k.device)           # the host side: decided outside the graph
            pk, pv = run.sharer_part(layer, sk, sk, like=k)
            out.extend(blend_fn(blend, k, v, pk, pv))
    return out


@pytest.mark.parametrize("kind, hparams", [("identity", {}), ("weighted", {"alpha": 0.3}), ("gating", {}),
                                           ("full", {"hidden_dim": 4}), ("c2c", {"hidden_dim": 4})])
def test_one_graph_for_every_layer_and_strength_and_the_eager_result(kind, hparams):
    torch._dynamo.reset()
    backend = CountingBackend()
    compiled = torch.compile(lambda blend, k, v, pk, pv: blend(k, v, pk, pv), backend=backend, fullgraph=True)
    sk, k, v = (kv(1, GRID.numel, SIG, seed=seed) for seed in (1, 2, 3))
    eager_run, compiled_run = run_of(kind, **hparams), run_of(kind, **hparams)
    with torch.no_grad():
        expected = fuse_every_layer(eager_run, lambda blend, *t: blend(*t), sk, k, v)
        got = fuse_every_layer(compiled_run, compiled, sk, k, v)
    assert backend.graphs == 1          # fullgraph: no break inside the blend either
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert compiled_run.close().k_change == pytest.approx(eager_run.close().k_change, rel=1e-5)


def test_a_layer_switched_off_gets_no_blend():
    run = run_of("weighted")
    run.begin_call(1.0)                 # linear_down ramp: strength 0 at the end of the schedule
    assert run.layer_blend(0, torch.device("cpu")) is None
