"""When the sharer runs, on the real ComfyUI host (issue 19): the refresh policy of Capture KV Cache, Record KV Cache
and Bridged KSampler, kept across a KSamplerAdvanced split, and with ComfyUI's EasyCache on the receiver."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bridge_helpers import empty_latent, ksample, load_model, pack_nodes

pytestmark = [pytest.mark.usefixtures("comfy"), pytest.mark.slow]

STEPS = 6


@pytest.fixture(scope="module")
def models(tiny_models):
    import host
    return {"a": load_model(tiny_models.path(host.T2V_A)), "a_again": load_model(tiny_models.path(host.T2V_A)),
            "b": load_model(tiny_models.path(host.T2V_B))}


@pytest.fixture(scope="module")
def conds():
    from comfy_test_nodes import wan_conditioning
    return {"pos": wan_conditioning(1), "neg": wan_conditioning(2), "sharer_pos": wan_conditioning(3),
            "sharer_neg": wan_conditioning(4)}


def projector(sharer, receiver, kind="weighted"):
    return pack_nodes().CreateC2CProjector.execute(sharer, receiver, kind, "identity", "all", alpha=0.5,
                                                   hidden_dim=0, seed=0).args[0]


def capture(sharer, conds, own=False, signal=None, **policy):
    """Capture KV Cache's source; ``signal``: another than the default (the nodes have no input for it, the Python API
    has: the host's input meter is tested through it)."""
    pos, neg = (conds["pos"], conds["neg"]) if own else (conds["sharer_pos"], conds["sharer_neg"])
    nodes = pack_nodes()
    if signal is None:
        return nodes.CaptureKVCache.execute(sharer, pos, neg, **policy).args[0]
    refresh = dataclasses.replace(nodes.capture.refresh_policy(nodes.CaptureKVCache.NODE, **policy), signal=signal)
    return nodes.capture.make_live_source(nodes.CaptureKVCache.NODE, sharer, pos, neg, refresh=refresh)


def fused(receiver, src, proj):
    return pack_nodes().FuseCaches.execute(receiver, src, proj, 1.0, 0.0, 1.0).args[0]


def report(patched):
    wrappers = patched.wrappers["outer_sample"]
    key = next(k for k in wrappers if k.startswith("dit_cache_bridge"))
    return wrappers[key][0].__self__.last_report


def sample(model, conds, steps=STEPS):
    return ksample(model, conds["pos"], conds["neg"], steps=steps)


def advanced(model, conds, start, end, add_noise="enable", leftover="disable", latent_image=None):
    import nodes
    (out,) = nodes.KSamplerAdvanced().sample(model, add_noise, 7, STEPS, 4.0, "euler", "simple", conds["pos"],
                                             conds["neg"], latent_image or empty_latent(), start, end, leftover)
    return out


@pytest.fixture(scope="module")
def split_tolerance(models, conds):
    """How far two KSamplerAdvanced halves drift from one run without any bridge (the latent's process_out/in round
    trip between them), times 4."""
    a = models["a"]
    halves = advanced(a, conds, 3, 10000, add_noise="disable",
                      latent_image=advanced(a, conds, 0, 3, leftover="enable"))
    return float((halves["samples"] - advanced(a, conds, 0, 10000)["samples"]).abs().max()) * 4 + 1e-6


def test_threshold_zero_fuses_exactly_as_refresh_every_one(models, conds):
    a, b = models["a"], models["b"]
    proj = projector(b, a)
    every = fused(a, capture(b, conds), proj)
    adaptive = fused(a, capture(b, conds, refresh="adaptive", threshold=0.0), proj)
    assert torch.equal(sample(adaptive, conds), sample(every, conds))
    assert report(adaptive).sharer_forwards == report(every).sharer_forwards == STEPS
    assert report(adaptive).refresh["sharer_steps"] == list(range(STEPS))
    assert report(adaptive).refresh["forwards_saved"] == 0


@pytest.mark.parametrize("policy", [{"refresh_every": 2},
                                    {"refresh": "adaptive", "threshold": 0.5, "max_reuse": 3, "signal": "input"}],
                         ids=["every_2", "adaptive_input"])
def test_a_split_ksampler_advanced_keeps_the_cycle_of_one_ksampler(models, conds, split_tolerance, policy):
    """Steps 0-2 and 3-5 in two KSamplerAdvanced nodes run the sharer at the steps one KSampler runs it: the
    second half goes on with the first half's cycle (and its K/V) instead of starting over. Adaptive on the input
    signal: the host's meter also carries over (the default sigma signal reads the schedule alone, tests/core)."""
    a, b = models["a"], models["b"]
    patched = fused(a, capture(b, conds, **policy), projector(b, a))
    full = advanced(patched, conds, 0, 10000)
    whole = report(patched)
    first = advanced(patched, conds, 0, 3, leftover="enable")
    before = report(patched)
    second = advanced(patched, conds, 3, 10000, add_noise="disable", latent_image=first)
    after = report(patched)
    assert 1 < len(whole.refresh["sharer_steps"]) < STEPS                   # some steps reuse
    assert before.refresh["sharer_steps"] + after.refresh["sharer_steps"] == whole.refresh["sharer_steps"]
    assert after.refresh["continued"] and not before.refresh["continued"]
    assert before.sharer_forwards + after.sharer_forwards == whole.sharer_forwards
    assert whole.cached_kv_bytes > 0                                     # reused steps blend cached projections
    assert float((second["samples"] - full["samples"]).abs().max()) <= split_tolerance


def test_a_new_latent_starts_a_new_cycle(models, conds):
    a, b = models["a"], models["b"]
    patched = fused(a, capture(b, conds, refresh_every=4), projector(b, a))
    first = advanced(patched, conds, 0, 3, leftover="enable")
    assert report(patched).refresh["sharer_steps"] == [0]
    advanced(patched, conds, 3, 10000, add_noise="disable", latent_image={"samples": first["samples"] + 1.0})
    r = report(patched)       # continued, step 3 would reuse step 0's K/V (refresh_every 4); a new run counts from 0
    assert not r.refresh["continued"] and r.refresh["sharer_steps"] == [0] and r.sharer_forwards == 1


def test_easycache_on_the_receiver_runs_no_sharer_on_skipped_steps(models, conds):
    """EasyCache skips receiver steps; the sharer (the receiver's twin, its own text, an identity projector) runs
    only in the steps the receiver computes, and fresh: the fused result equals EasyCache alone bit for bit,
    which stale K/V on a resumed step would break."""
    from comfy_extras.nodes_easycache import EasyCacheNode
    a, twin = models["a"], models["a_again"]

    def easy(model):
        return EasyCacheNode.execute(model, 3.0, 0.0, 1.0, False).args[0]
    patched = fused(easy(a), capture(twin, conds, own=True), projector(twin, a, "identity"))
    out = ksample(patched, conds["pos"], conds["neg"], steps=8)
    r = report(patched)
    assert r.model_calls == 8 > r.refresh["evaluations"] > 1              # EasyCache skipped receiver steps
    assert r.sharer_forwards == r.refresh["evaluations"] == len(r.refresh["sharer_steps"])
    assert torch.equal(out, ksample(easy(a), conds["pos"], conds["neg"], steps=8))


def test_bridged_ksampler_takes_the_policy_and_reports_the_saving(models, conds):
    a, b = models["a"], models["b"]
    node = pack_nodes().BridgedKSampler
    args = dict(receiver=a, positive=conds["pos"], negative=conds["neg"], sharer=b,
                sharer_positive=conds["sharer_pos"], sharer_negative=conds["sharer_neg"], projector=projector(b, a),
                strength=1.0, start_percent=0.0, end_percent=1.0, seed=7, steps=STEPS, cfg=4.0, sampler_name="euler",
                scheduler="simple", latent_image=empty_latent())
    budget = node.execute(**args, refresh="budget", budget=2, max_reuse=99).args[0]["samples"]
    source_budget = fused(a, capture(b, conds, refresh="budget", budget=2, max_reuse=99), args["projector"])
    assert torch.equal(budget, sample(source_budget, conds))
    r = report(source_budget)
    assert len(r.refresh["sharer_steps"]) == r.sharer_forwards == 2
    assert r.refresh["sharer_steps"][1] >= STEPS // 2, "the default signal places the forwards late in the schedule"
    assert r.refresh["forwards_saved"] == STEPS - 2 and r.refresh["policy"]["mode"] == "budget"


@pytest.mark.parametrize("node, inputs, message", [
    ("CaptureKVCache", {"refresh": "sometimes"}, r"Capture KV Cache › refresh: .*'sometimes'.*one of \['every', "
                                                 r"'adaptive', 'budget'\]"),
    ("CaptureKVCache", {"threshold": -0.5}, r"Capture KV Cache › threshold: .*-0.5.*from 0 to 10"),
    ("RecordKVCache", {"budget": 0}, r"Record KV Cache › budget: .*0.*from 1 to 10000"),
    ("LoadKVCache", {"max_reuse": -1}, r"Load KV Cache › max_reuse: .*-1.*from 0 to 10000"),
    ("BridgedKSampler", {"threshold": float("nan")}, r"Bridged KSampler › threshold: .*nan.*a finite number"),
])
def test_a_bad_refresh_input_names_the_node_and_the_input(node, inputs, message):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    cls = getattr(pack_nodes(), node)
    args = {"CaptureKVCache": dict(sharer=None, positive=[], negative=[]),
            "RecordKVCache": dict(sharer=None, positive=[], negative=[], latent_image=empty_latent(), seed=0, steps=4,
                                  cfg=4.0, sampler_name="euler", scheduler="simple"),
            "LoadKVCache": dict(kv_cache="missing.safetensors"),
            "BridgedKSampler": dict(receiver=None, positive=[], negative=[], sharer=None, sharer_positive=[],
                                    sharer_negative=[], projector=None, strength=1.0, start_percent=0.0,
                                    end_percent=1.0, seed=0, steps=4, cfg=4.0, sampler_name="euler",
                                    scheduler="simple", latent_image=empty_latent())}[node]
    with pytest.raises(BridgeInputError, match=message):
        cls.execute(**args, **inputs)


@pytest.mark.parametrize("policy, steps", [({"refresh_every": 2}, [0, 2, 4]),
                                           ({"refresh": "budget", "budget": 2, "max_reuse": 99}, None)],
                         ids=["every_2", "budget_2"])
def test_a_replay_moves_to_a_new_recorded_step_only_when_the_policy_refreshes(models, conds, policy, steps):
    a, b = models["a"], models["b"]
    src = pack_nodes().RecordKVCache.execute(b, conds["sharer_pos"], conds["sharer_neg"], empty_latent(), 7, STEPS,
                                             4.0, "euler", "simple", 1.0, layers="all", storage_dtype="fp32",
                                             **policy).args[0]
    patched = fused(a, src, projector(b, a))
    out = sample(patched, conds)
    r = report(patched)
    assert r.sharer_forwards == len(r.refresh["sharer_steps"]) == (len(steps) if steps else 2)
    assert steps is None or r.refresh["sharer_steps"] == steps
    every = fused(a, pack_nodes().RecordKVCache.execute(b, conds["sharer_pos"], conds["sharer_neg"], empty_latent(),
                                                       7, STEPS, 4.0, "euler", "simple", 1.0, layers="all",
                                                       storage_dtype="fp32").args[0], projector(b, a))
    assert not torch.equal(out, sample(every, conds)) and report(every).sharer_forwards == STEPS
