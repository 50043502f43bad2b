"""torch.compile and the bridge (docs/compile.md), in-process on the CPU through ComfyUI's TorchCompileModel code.

ComfyUI's TorchCompileModel node compiles with ``comfy_api.torch_helpers.set_torch_compile_wrapper`` (an
APPLY_MODEL wrapper that swaps the compiled diffusion model in for each call). These tests call that helper
with a counting backend: dynamo traces exactly as for inductor and hands each graph over, the graph then runs
eagerly (fast, and the eager kernels). One test compiles with inductor itself.

The contracts: a compiled receiver breaks its graph only at the hand-off between the models (one
``torch.compiler.disable``d call per fused layer: every break reason a bridged run adds to a stock compiled
run's is that call); nothing recompiles after the first model call, also when the strength changes in every
call (a ramp), and the per-layer code is not specialised per layer (a real model fuses 30-40 layers, dynamo keeps
8 variants of a function); a compiled sharer runs compiled in lockstep (also with a compiled receiver), buffered
live and recorded modes and gives the eager chain's output.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
from collections import Counter

import pytest
import torch

from bridge_helpers import ksample, load_model, pack_nodes

pytestmark = [pytest.mark.usefixtures("comfy"), pytest.mark.slow(seconds=120)]

HAND_OFF = "_hand_off"          # Bridge._hand_off, the one boundary per fused layer
SHARER_HOOK = "capture"         # the sharer's attention hook (Bridge.capture, the recorder's capture)


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(scope="module")
def models(tiny_models):
    import host
    yield {"a": load_model(tiny_models.path(host.T2V_A)), "b": load_model(tiny_models.path(host.T2V_B)),
           "wide": load_model(tiny_models.path(host.T2V_WIDE)), "wide_again": load_model(tiny_models.path(host.T2V_WIDE))}
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def conds():
    from comfy_test_nodes import wan_conditioning
    # equal text lengths: cond and uncond run batched, one model call per step (no shape change between calls)
    return {"pos": wan_conditioning(1), "neg": wan_conditioning(2), "sharer_pos": wan_conditioning(3),
            "sharer_neg": wan_conditioning(4)}


def compiled(model, backend):
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    m = model.clone()
    set_torch_compile_wrapper(m, backend=backend)
    return m


def projector(sharer, receiver, kind="weighted"):
    return pack_nodes().CreateC2CProjector.execute(sharer, receiver, kind, "identity", "all", alpha=0.5,
                                                   hidden_dim=0, seed=0).args[0]


def live(sharer, conds, streaming=True):
    source = pack_nodes().CaptureKVCache.execute(sharer, conds["sharer_pos"], conds["sharer_neg"]).args[0]
    return dataclasses.replace(source, streaming=streaming)


def fuse(receiver, source, proj, ramp="constant"):
    return pack_nodes().FuseCaches.execute(receiver, source, proj, 0.8, 0.0, 1.0, ramp, "").args[0]


def sample(model, conds, steps=3):
    return ksample(model, conds["pos"], conds["neg"], cfg=4.0, steps=steps)


def breaks_of(fn):
    """(fn's result, Counter of the graph-break reasons dynamo met while it ran, addresses stripped)."""
    from torch._dynamo.utils import counters
    counters.clear()
    out = fn()
    return out, Counter({re.sub(r" at 0x[0-9a-f]+", "", reason): n for reason, n in counters["graph_break"].items()})


def fresh():
    """A new counting backend, with dynamo's caches, counters and recompile records cleared."""
    torch._dynamo.reset()
    return CountingBackend()


def test_compiled_receiver_breaks_only_at_the_hand_off_and_compiles_only_in_the_first_call(models, conds):
    """Three calls whose strength falls (a ramp): every graph is compiled in the first call, a second run compiles
    nothing; the breaks a bridged run adds to a stock compiled run's are all at the hand-off."""
    import comfy.patcher_extension
    a, b = models["a"], models["b"]
    _, stock = breaks_of(lambda: sample(compiled(a, fresh()), conds))
    backend = fresh()
    bridged = fuse(compiled(a, backend), live(b, conds), projector(b, a), ramp="linear_down")
    graphs_after_call = []

    def count(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        graphs_after_call.append(backend.graphs)
        return out
    bridged.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_compile", count)
    out, added = breaks_of(lambda: sample(bridged, conds))
    assert len(graphs_after_call) == 3 and graphs_after_call[0] > 0
    assert set(graphs_after_call) == {graphs_after_call[0]}, graphs_after_call
    ours = {reason for reason in added if reason not in stock}
    assert ours and all(HAND_OFF in reason for reason in ours), ours
    _, later = breaks_of(lambda: sample(bridged, conds))
    assert backend.graphs == graphs_after_call[0] and not later
    eager = sample(fuse(a, live(b, conds), projector(b, a), ramp="linear_down"), conds)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_the_traced_code_is_the_same_for_every_fused_layer(models, conds):
    """Three fused layers: no function of the pack is compiled again for another layer (a real model fuses 30-40
    layers and dynamo keeps 8 variants of a function: a per-layer specialisation would run the rest eagerly). The
    layer index may turn from static to dynamic once (dynamo's automatic dynamic ints), never per layer."""
    from torch._dynamo.utils import guard_failures
    wide, twin = models["wide"], models["wide_again"]
    backend = fresh()
    sample(fuse(compiled(wide, backend), live(twin, conds), projector(twin, wide), ramp="linear_up"), conds)
    assert backend.graphs > 0
    per_layer = {code.co_name: [r for r in reasons if "layer ==" in r] for code, reasons in guard_failures.items()}
    assert all(len(reasons) <= 1 for reasons in per_layer.values()), per_layer


@pytest.mark.parametrize("streaming", [True, False], ids=["lockstep, both compiled", "buffered"])
def test_compiled_sharer_runs_compiled_live(models, conds, streaming):
    """Lockstep with the receiver compiled too: the two compiled models take turns block by block (each switch
    inside a disabled hook), both compile once, and a second run compiles nothing."""
    a, b = models["a"], models["b"]
    proj = projector(b, a)
    eager = sample(fuse(a, live(b, conds, streaming), proj), conds)
    sharer_backend, receiver_backend = fresh(), CountingBackend()
    receiver = compiled(a, receiver_backend) if streaming else a
    bridged = fuse(receiver, live(compiled(b, sharer_backend), conds, streaming), proj)
    out, reasons = breaks_of(lambda: sample(bridged, conds))
    assert sharer_backend.graphs > 0 and (receiver_backend.graphs > 0) == streaming
    assert any(SHARER_HOOK in reason for reason in reasons)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    graphs = (sharer_backend.graphs, receiver_backend.graphs)
    _, later = breaks_of(lambda: sample(bridged, conds))
    assert (sharer_backend.graphs, receiver_backend.graphs) == graphs and not later


def test_compiled_sharer_runs_compiled_when_recorded(models, conds):
    a, b = models["a"], models["b"]
    nodes = pack_nodes()
    proj = projector(b, a)

    def recorded(sharer):
        from bridge_helpers import empty_latent
        source = nodes.RecordKVCache.execute(sharer, conds["sharer_pos"], conds["sharer_neg"], empty_latent(), 7, 3,
                                             4.0, "euler", "simple", 1.0, layers="all", storage_dtype="fp32").args[0]
        return sample(fuse(a, source, proj), conds)

    eager = recorded(b)
    backend = fresh()
    out = recorded(compiled(b, backend))
    assert backend.graphs > 0
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler")
def test_inductor_compiled_bridge_matches_eager(models, conds):
    """TorchCompileModel itself (backend inductor) on the receiver of a bridged run: the eager output within float
    tolerance (inductor fuses kernels, so not bit for bit)."""
    import host
    a, b = models["a"], models["b"]
    torch._dynamo.reset()
    node = host.core_node("comfy_extras.nodes_torch_compile", "TorchCompileModel")
    (receiver,) = host.run_node(node, a, "inductor")
    proj = projector(b, a)
    out = sample(fuse(receiver, live(b, conds), proj), conds, steps=2)
    eager = sample(fuse(a, live(b, conds), proj), conds, steps=2)
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)
