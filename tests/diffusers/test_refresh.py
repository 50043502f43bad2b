"""When the sharer runs in the diffusers host (issue 19): the refresh policy's config fields, budget and adaptive
runs, a schedule sampled in two parts, reused projections, and diffusers' FirstBlockCache on the receiver."""
import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

import tiny
from c2c_core.refresh import RefreshPolicy
from c2c_diffusers import (Bridge, BridgeConfig, BridgeSetupError, C2CBridgeConfig, LiveSharer, SharerInputs,
                           WanChronoEditConfig, apply_c2c_bridge, remove_c2c_bridge)
from c2c_diffusers.hooks import add_taps, remove_taps

STEPS = 6
CFG = 4.0


def sharer(seed=2):
    return LiveSharer(tiny.wan(seed), SharerInputs(tiny.embeds(10), tiny.embeds(11)))


def flow_sigmas(steps=STEPS, shift=5.0):
    """A flow schedule as FlowMatchEuler makes it: n + 1 sigmas, the last 0."""
    ts = [1.0 - i / steps for i in range(steps + 1)]
    return [shift * t / (1.0 + (shift - 1.0) * t) for t in ts]


def euler(transformer, bridge, parts, seed=0):
    """Euler + CFG on a bare transformer, one bridge session per part of the schedule (a part starts where the
    previous one ended, as KSamplerAdvanced halves do)."""
    x = tiny.latent(seed)
    reports = []
    with torch.no_grad():
        for part in parts:
            with bridge.session(sigmas=part):
                for i in range(len(part) - 1):
                    t = torch.tensor([part[i] * 1000.0])
                    v = {}
                    for name, embeds in (("cond", tiny.embeds(20)), ("uncond", tiny.embeds(21))):
                        with transformer.cache_context(name, step_index=i, sigma=part[i]):
                            v[name] = transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds,
                                                  return_dict=False)[0]
                    x = x + (part[i + 1] - part[i]) * (v["uncond"] + CFG * (v["cond"] - v["uncond"]))
            reports.append(bridge.last_report)
    return x, reports


# -- the config fields -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, expected", [
    ("refresh", "sometimes", r"refresh='sometimes'; expected one of \('every', 'adaptive', 'budget'\)\. Use 'every'"),
    ("refresh_every", 0, r"refresh_every=0; expected an integer >= 1 \(1 = run the sharer every step"),
    ("threshold", -0.5, r"threshold=-0\.5; expected a number >= 0 \(relative change"),
    ("budget", 0, r"budget=0; expected an integer >= 1 \(sharer runs per sampling run"),
    ("max_reuse", 1.5, r"max_reuse=1\.5; expected an integer >= 0"),
])
def test_each_config_refuses_a_bad_refresh_field_by_its_own_name(field, value, expected):
    with pytest.raises(BridgeSetupError, match=rf"^BridgeConfig\.{expected}"):
        BridgeConfig(**{field: value})
    with pytest.raises(BridgeSetupError, match=rf"^WanChronoEditConfig\.{expected}"):
        WanChronoEditConfig(**{field: value})
    with pytest.raises(BridgeSetupError, match=rf"^C2CBridgeConfig\.{expected}"):
        apply_c2c_bridge(tiny.wan(1), C2CBridgeConfig(projector=tiny.bundle(), **{field: value}), sharer=sharer())


def test_config_fields_make_the_policy_both_spellings_share():
    policy = RefreshPolicy(mode="budget", budget=2, max_reuse=3)
    assert BridgeConfig(refresh="budget", budget=2, max_reuse=3).refresh_policy() == policy
    assert WanChronoEditConfig(refresh="budget", budget=2, max_reuse=3).bridge_config().refresh_policy() == policy
    assert BridgeConfig().refresh_policy() == RefreshPolicy()
    with pytest.raises(BridgeSetupError, match=r"direction='bidirectional' with refresh='adaptive'; expected "
                                               r"refresh='every' with refresh_every=1"):
        BridgeConfig(direction="bidirectional", refresh="adaptive")
    with pytest.raises(BridgeSetupError, match=r"^Bridge\(refresh=…\) is a int; expected a c2c_core\.refresh\."):
        Bridge(sharer(), tiny.bundle(), refresh=2)


def test_a_policy_that_needs_the_schedule_is_refused_without_one():
    transformer = tiny.wan(1)
    bridge = Bridge(sharer(), tiny.bundle("weighted"), refresh=RefreshPolicy(mode="budget", budget=2)).attach(transformer)
    with pytest.raises(BridgeSetupError, match=r"refresh budget \(2 sharer runs, placed by sigma change\) needs the "
                                               r"run's noise schedule, and this bridge has no scheduler; attach it to "
                                               r"the pipeline, pass Bridge\(scheduler=pipe\.scheduler\)"):
        with torch.no_grad():
            transformer(hidden_states=tiny.latent(), timestep=torch.tensor([900.0]),
                        encoder_hidden_states=tiny.embeds(20), return_dict=False)
    bridge.detach()


# -- budget, adaptive, every ---------------------------------------------------------------------------------------

def run_policy(policy, steps=STEPS):
    pipe = tiny.wan_pipe(tiny.wan(1))
    bridge = Bridge(sharer(), tiny.bundle("weighted"), refresh=policy).attach(pipe)
    out = tiny.run_pipe(pipe, steps=steps)
    bridge.detach()
    return out, bridge.last_report


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_budget_caps_the_sharer_runs_and_the_first_step_always_runs(budget):
    out, report = run_policy(RefreshPolicy(mode="budget", budget=budget, max_reuse=STEPS, signal="input"))
    steps = report.refresh["sharer_steps"]
    print(f"budget {budget}: the sharer ran at steps {steps}")
    assert steps[0] == 0 and len(steps) == budget == len(set(steps))
    assert budget == 1 or steps[1] >= STEPS // 2, "the input changes most late in the schedule: so do the forwards"
    assert report.sharer_forwards == 2 * budget                  # cond and uncond at each chosen step
    assert report.refresh["forwards_saved"] == STEPS - budget
    assert report.model_calls == 2 * STEPS and torch.isfinite(out).all()


def test_adaptive_at_threshold_zero_is_every_step_bit_for_bit():
    every, r_every = run_policy(RefreshPolicy())
    adaptive, r_adaptive = run_policy(RefreshPolicy(mode="adaptive", threshold=0.0))
    assert torch.equal(adaptive, every)
    assert r_adaptive.sharer_forwards == r_every.sharer_forwards == 2 * STEPS
    assert r_adaptive.refresh["sharer_steps"] == list(range(STEPS))


def test_reused_kv_change_the_output_and_their_projections_are_kept_once(monkeypatch):
    """Reused K/V are projected once per refresh window and CFG branch: a reusing call gets the kept projection."""
    from c2c_core.runtime import FusionRun
    every, _ = run_policy(RefreshPolicy())
    made = {}
    real = FusionRun.sharer_part

    def counting(self, layer, sk, sv, key=None, **kwargs):
        pk, pv = real(self, layer, sk, sv, key, **kwargs)
        made.setdefault(layer, []).append(pk)     # kept alive: ids stay unique
        return pk, pv
    monkeypatch.setattr(FusionRun, "sharer_part", counting)
    second, report = run_policy(RefreshPolicy(every=2))
    assert report.refresh["sharer_steps"] == [0, 2, 4] and report.sharer_forwards == 6
    assert (second - every).abs().max() > 1e-4, "reusing older K/V must change the result"
    assert {layer: len(parts) for layer, parts in made.items()} == {0: 6, 1: 6}, \
        "one projection per refresh window, layer and branch (3 windows × 2 branches); reusing calls get it again"
    assert report.cached_kv_bytes > 0
    monkeypatch.setattr(FusionRun, "sharer_part", real)

    def recomputed(self, layer, k, call):
        sk, sv = self.source_run.kv(self.run.sharer_layer(layer), call)
        return self.run.sharer_part(layer, sk, sv, None, like=k)
    monkeypatch.setattr(Bridge, "_sharer_part", recomputed)
    again, _ = run_policy(RefreshPolicy(every=2))
    assert torch.equal(again, second), "a kept projection is the recomputed one, bit for bit"


def test_a_recording_replays_the_step_that_last_refreshed_in_between():
    """Recorded K/V follow the policy as ComfyUI's recorded refresh_every does: a reusing step replays the K/V of the
    step that refreshed last (projected once), nothing is read for it."""
    from c2c_diffusers import KVRecorder, RecordedSharer
    source = tiny.wan_pipe(tiny.wan(2))
    with KVRecorder(source.transformer, layers=[0, 1], storage_dtype="fp32") as recorder:
        tiny.run_pipe(source, steps=4)
    outs = {}
    for every in (1, 2):
        pipe = tiny.wan_pipe(tiny.wan(1))
        bridge = Bridge(RecordedSharer(recorder.recording), tiny.bundle("weighted"),
                        refresh=RefreshPolicy(every=every)).attach(pipe)
        outs[every] = tiny.run_pipe(pipe, steps=4)
        bridge.detach()
        assert bridge.last_report.refresh["sharer_steps"] == list(range(0, 4, every))
        assert bridge.last_report.sharer_forwards == 0
    assert (outs[2] - outs[1]).abs().max() > 1e-4


def test_a_schedule_sampled_in_two_parts_keeps_the_cycle_of_one_run():
    """The diffusers form of a KSamplerAdvanced split: the second session starts at the first one's last sigma."""
    sigmas = flow_sigmas()
    for policy in (RefreshPolicy(every=2), RefreshPolicy(every=4),
                   RefreshPolicy(mode="adaptive", threshold=0.2, signal="input")):
        receiver = tiny.wan(1)
        bridge = Bridge(sharer(), tiny.bundle("weighted"), refresh=policy).attach(receiver)
        whole, (r_whole,) = euler(receiver, bridge, [sigmas])
        split, (first, second) = euler(receiver, bridge, [sigmas[:4], sigmas[3:]])
        bridge.detach()
        assert not r_whole.refresh["continued"] and second.refresh["continued"]
        assert first.refresh["sharer_steps"] + second.refresh["sharer_steps"] == r_whole.refresh["sharer_steps"], policy
        assert torch.equal(split, whole), policy
    assert r_whole.refresh["sharer_steps"] != list(range(STEPS)), "the adaptive case must reuse for this to mean much"


def test_apply_c2c_bridge_takes_the_policy_and_the_pipelines_schedule():
    pipe = tiny.wan_pipe(tiny.wan(1))
    bridge = apply_c2c_bridge(pipe.transformer, C2CBridgeConfig(projector=tiny.bundle("weighted"), refresh="budget",
                                                                budget=2), sharer=sharer(), scheduler=pipe.scheduler)
    tiny.run_pipe(pipe, steps=STEPS)
    remove_c2c_bridge(pipe.transformer)
    assert len(bridge.last_report.refresh["sharer_steps"]) == 2 and bridge.last_report.sharer_forwards == 4


# -- FirstBlockCache on the receiver --------------------------------------------------------------------------------

class Recorder:
    """The timestep of every receiver call, of every receiver call that computed block 1, and of every sharer forward."""

    def __init__(self, receiver, sharer_transformer):
        self.calls, self.computed, self.sharer = [], [], []
        self._now = None
        self.handles = [receiver.register_forward_pre_hook(self._call, with_kwargs=True),
                        sharer_transformer.register_forward_pre_hook(self._sharer, with_kwargs=True)]
        self.receiver = receiver
        add_taps(receiver, [1], "test.computed", self._computed)

    def _call(self, module, args, kwargs):
        self._now = float(kwargs["timestep"].flatten()[0])
        self.calls.append(self._now)

    def _sharer(self, module, args, kwargs):
        self.sharer.append(float(kwargs["timestep"].flatten()[0]))

    def _computed(self, layer, k, v):
        self.computed.append(self._now)
        return k, v

    def remove(self):
        for handle in self.handles:
            handle.remove()
        remove_taps(self.receiver, "test.computed")


def test_first_block_cache_skipped_calls_run_no_sharer_and_resumed_calls_get_fresh_kv():
    """A call the cache cuts short after block 0 never reaches the fused block 1, so the sharer does not run; the
    next call that computes block 1 runs it at its own timestep (fresh K/V), whatever was skipped before."""
    pipe = tiny.wan_pipe(tiny.wan(1))
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.45))
    live = sharer()
    bridge = Bridge(live, tiny.bundle("weighted", layers=(1,)), refresh=RefreshPolicy()).attach(pipe)
    seen = Recorder(pipe.transformer, live.transformer)
    out = tiny.run_pipe(pipe, steps=8)
    seen.remove()
    bridge.detach()
    assert torch.isfinite(out).all()
    assert len(seen.calls) == 16 and 0 < len(seen.computed) < 16, "the cache must skip some calls and compute others"
    assert seen.sharer == seen.computed, "the sharer runs in exactly the calls that compute the fused block"
    assert bridge.last_report.sharer_forwards == len(seen.computed)
