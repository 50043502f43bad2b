"""c2c_core.refresh (when the sharer runs) and the FusionRun split that makes a reused step cost only the blend."""

import json

import pytest
import torch

from c2c_core import FusionSchedule, LayerMap, ModelSignature, ProjectorBank, RefreshPolicy, RefreshTracker, TokenGrid
from c2c_core.bundle import ProjectorBundle
from c2c_core.errors import KVShapeError, ScheduleError
from c2c_core.refresh import SignalMeter, input_change, kv_change, magnitude_change
from c2c_core.runtime import FusionRun
from core_helpers import kv, signature

LINEAR = [1.0 - i / 12 for i in range(13)]          # 12 steps, sigma 1 -> 0


def ran(policy, signals=None, sigmas=LINEAR):
    """Schedule steps at which the sharer runs, one evaluation per step, with ``signals[i]`` at step i."""
    tracker = RefreshTracker(policy)
    tracker.begin_run(sigmas)
    steps = []
    for i, sigma in enumerate(sigmas[:-1]):
        r = tracker.decide(sigma, None if signals is None else signals[i], evaluation=i)
        if r.run_sharer:
            steps.append(r.step)
    assert tracker.report().sharer_steps == steps
    assert tracker.report().forwards_saved == len(sigmas) - 1 - len(steps)
    return steps


# --- the policy ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "sometimes"}, r"mode='sometimes'; expected one of \('every', 'adaptive', 'budget'\)"),
    ({"every": 0}, r"every=0; expected an integer >= 1"),
    ({"every": True}, r"every=True; expected an integer >= 1"),
    ({"threshold": -0.1}, r"threshold=-0.1; expected a number >= 0 \(relative change"),
    ({"threshold": float("nan")}, r"threshold=nan; expected a number >= 0"),
    ({"max_reuse": -1}, r"max_reuse=-1; expected an integer >= 0"),
    ({"budget": 0}, r"budget=0; expected an integer >= 1"),
    ({"signal": "vibes"}, r"signal='vibes'; expected one of \('input', 'sigma', 'magnitude'\)"),
])
def test_bad_policies_are_refused_with_the_field_and_the_accepted_values(kwargs, message):
    with pytest.raises(ScheduleError, match=r"RefreshPolicy\." + message):
        RefreshPolicy(**kwargs)


def test_policy_round_trips_through_json():
    p = RefreshPolicy(mode="budget", budget=3, max_reuse=5, signal="sigma", threshold=0.25)
    assert RefreshPolicy.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ScheduleError, match=r"unknown keys \['refresh_every'\]"):
        RefreshPolicy.from_dict({"refresh_every": 2})


def test_only_every_one_and_threshold_zero_always_run_the_sharer():
    assert RefreshPolicy().always and RefreshPolicy(mode="adaptive", threshold=0).always
    assert not RefreshPolicy(every=2).always and not RefreshPolicy(mode="adaptive").always
    assert not RefreshPolicy(mode="budget", budget=100).always


# --- every k ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("every, steps", [(1, list(range(12))), (3, [0, 3, 6, 9]), (5, [0, 5, 10]), (20, [0])])
def test_every_k_runs_on_multiples_of_k(every, steps):
    assert ran(RefreshPolicy(every=every)) == steps


def test_calls_of_one_evaluation_share_one_decision_and_window():
    tracker = RefreshTracker(RefreshPolicy(every=2))
    tracker.begin_run(LINEAR)
    first = tracker.decide(1.0, evaluation=0)
    assert tracker.decide(1.0, evaluation=0) is first               # the uncond call of the same evaluation
    second = tracker.decide(LINEAR[1], evaluation=1)
    assert not second.run_sharer and second.window == first.window  # reused: the same K/V generation
    third = tracker.decide(LINEAR[2], evaluation=2)
    assert third.run_sharer and third.window != first.window and third.step == 2


def test_every_one_runs_in_each_evaluation_of_a_two_evaluation_sampler():
    """heun evaluates at sigma_i and sigma_(i+1); the next step again at sigma_(i+1): three runs, three windows."""
    tracker = RefreshTracker(RefreshPolicy())
    tracker.begin_run(LINEAR)
    decisions = [tracker.decide(s, evaluation=e) for e, s in enumerate((LINEAR[0], LINEAR[1], LINEAR[1]))]
    assert all(d.run_sharer for d in decisions) and len({d.window for d in decisions}) == 3


def test_decide_before_begin_run_says_what_to_call():
    with pytest.raises(ScheduleError, match=r"decide before begin_run; call begin_run\(sigmas\)"):
        RefreshTracker(RefreshPolicy()).decide(1.0)


# --- adaptive -----------------------------------------------------------------------------------------
def test_adaptive_runs_when_the_accumulated_signal_reaches_the_threshold():
    signals = [None, 0.05, 0.04, 0.02, 0.3, 0.0, 0.0, 0.09, 0.02, 0.2, 0.05, 0.05]
    assert ran(RefreshPolicy(mode="adaptive", threshold=0.1, signal="input"), signals) == [0, 3, 4, 8, 9, 11]


def test_adaptive_threshold_zero_decides_exactly_as_every_one():
    signals = [None] + [float(x) for x in torch.rand(11, generator=torch.Generator().manual_seed(0))]
    assert ran(RefreshPolicy(mode="adaptive", threshold=0.0), signals) == ran(RefreshPolicy(every=1)) == list(range(12))


def test_adaptive_caps_consecutive_reuses_and_runs_on_an_unknown_signal():
    assert ran(RefreshPolicy(mode="adaptive", threshold=1.0, max_reuse=2, signal="input"), [0.0] * 12) == [0, 3, 6, 9]
    assert ran(RefreshPolicy(mode="adaptive", threshold=1.0, max_reuse=99, signal="input"),
               [0.0] * 5 + [None] + [0.0] * 6) == [0, 5]


def test_a_lazy_signal_is_read_only_for_new_decisions():
    reads = []
    tracker = RefreshTracker(RefreshPolicy(mode="adaptive", threshold=0.5, signal="input"))
    tracker.begin_run(LINEAR)
    for e, sigma in enumerate(LINEAR[:4]):
        for _ in range(2):                                   # cond and uncond called separately
            tracker.decide(sigma, lambda: reads.append(sigma) or 0.1, evaluation=e)
    assert reads == LINEAR[:4]


def test_the_sigma_signal_is_the_fraction_of_the_schedule_travelled():
    # 1/12 per step: a threshold of 0.25 runs every third step, with no tensor read at all
    assert ran(RefreshPolicy(mode="adaptive", signal="sigma", threshold=0.25 - 1e-9)) == [0, 3, 6, 9]


# --- budget ---------------------------------------------------------------------------------------------
# The still miniature of experiments/REFRESH.md: euler, 12 steps, ComfyUI's "simple" schedule at shift 3, and the
# receiver input's measured change per step (experiments/README.md, "Refresh frontier": growing from 0.03 to
# about 0.25, 1.07 in all). The run's JSON is not kept, so the curve is a smooth fit to those numbers that
# reproduces every placement adaptive made on it (checked below); the best fixed placements were (0, 10),
# (0, 10, 11), (0, 9, 10, 11), and the old budget rule's (0, 5), (0, 5, 9), (0, 5, 8, 10) kept 7.2, 2.4 and 1.3
# points less.
STILL_SIGMAS = [1.0, 0.9707, 0.9378, 0.9, 0.8573, 0.8081, 0.75, 0.6821, 0.6007, 0.5, 0.3756, 0.2158, 0.0]
STILL_INPUT = [None, 0.031, 0.036, 0.043, 0.05, 0.06, 0.074, 0.091, 0.115, 0.148, 0.187, 0.234]


def ran_again(tracker, signals, sigmas):
    """Steps that run the sharer in one more run of ``tracker``."""
    tracker.begin_run(sigmas)
    return [r.step for i, sigma in enumerate(sigmas[:-1])
            if (r := tracker.decide(sigma, None if signals is None else signals[i], evaluation=i)).run_sharer]


def test_the_still_curve_reproduces_what_adaptive_placed_on_it():
    measured = {0.08: [0, 3, 5, 7, 8, 9, 10, 11], 0.15: [0, 4, 7, 9, 10, 11], 0.25: [0, 6, 9, 11], 0.4: [0, 8, 11],
                0.6: [0, 9]}
    for threshold, steps in measured.items():
        policy = RefreshPolicy(mode="adaptive", threshold=threshold, max_reuse=12, signal="input")
        assert ran(policy, STILL_INPUT, STILL_SIGMAS) == steps, threshold


@pytest.mark.parametrize("budget, first, calibrated", [(2, [0, 9], [0, 9]), (3, [0, 8, 11], [0, 8, 11]),
                                                        (4, [0, 6, 9, 11], [0, 7, 10, 11])])
def test_budget_places_late_on_the_still_miniature_as_adaptive_did(budget, first, calibrated):
    """A fresh tracker calibrates on the steps it measured so far and lands where adaptive 0.6 / 0.4 / 0.25 did
    (96.8, 99.0, 99.2 % of the gain; the old rule: 90.6, 96.7, 98.7 %); a second run of the same length starts
    with the first run's calibration (the input moves 1.37x the sigma prior over the whole run) and spends later
    still. A run of another length does not take it."""
    tracker = RefreshTracker(RefreshPolicy(mode="budget", budget=budget, signal="input"))
    assert ran_again(tracker, STILL_INPUT, STILL_SIGMAS) == first
    assert ran_again(tracker, STILL_INPUT, STILL_SIGMAS) == calibrated
    shorter = (STILL_INPUT[:9], STILL_SIGMAS[:9] + [0.0])
    assert ran_again(tracker, *shorter) == ran(tracker.policy, *shorter)


def test_calibrated_budget_two_would_wait_for_step_10_without_the_reuse_cap():
    tracker = RefreshTracker(RefreshPolicy(mode="budget", budget=2, max_reuse=12, signal="input"))
    ran_again(tracker, STILL_INPUT, STILL_SIGMAS)
    assert ran_again(tracker, STILL_INPUT, STILL_SIGMAS) == [0, 10]     # the best placement of 2 (97.8 %)
    assert tracker.budget_threshold() == pytest.approx(sum(STILL_INPUT[1:]) / (1 - STILL_SIGMAS[-2]) / 2)


@pytest.mark.parametrize("budget, steps", [(2, [0, 9]), (3, [0, 8, 11]), (4, [0, 6, 9, 11])])
def test_budget_on_the_sigma_signal_spends_a_forward_per_budget_share_of_the_noise_travel(budget, steps):
    # the threshold is 1 / budget of the travel from the first sigma to 0 (0.5, 0.33, 0.25 here)
    assert ran(RefreshPolicy(mode="budget", budget=budget, signal="sigma"), None, STILL_SIGMAS) == steps
    assert ran(RefreshPolicy(mode="budget", budget=3, signal="sigma", max_reuse=99)) == [0, 4, 8]    # linear: even


def test_budget_follows_where_the_measured_signal_changes_most():
    late = [None] + [0.01] * 7 + [0.5] * 4                  # the input barely moves until step 8
    steps = ran(RefreshPolicy(mode="budget", budget=3, max_reuse=99, signal="input"), late)
    assert len(steps) == 3 and steps[0] == 0 and steps[-1] >= 8     # the last run lands in the late change
    even = ran(RefreshPolicy(mode="budget", budget=3, max_reuse=99, signal="input"), [None] + [0.1] * 11)
    assert even == [0, 4, 8]


@pytest.mark.parametrize("seed", range(6))
def test_budget_never_spends_more_than_its_budget_and_a_run_to_sigma_0_spends_all_of_it(seed):
    g = torch.Generator().manual_seed(seed)
    for budget in (1, 2, 3, 5, 12, 20):
        for max_reuse in (0, 1, 3, 8):
            signals = [None] + [float(x) for x in torch.rand(11, generator=g) ** 3]
            steps = ran(RefreshPolicy(mode="budget", budget=budget, max_reuse=max_reuse, signal="input"), signals,
                        STILL_SIGMAS)
            assert steps[0] == 0 and len(steps) == min(budget, 12), (budget, max_reuse, steps)


@pytest.mark.parametrize("budget, max_reuse, steps", [(2, 1, [0, 10]), (3, 2, [0, 6, 9]), (6, 2, [0, 3, 6, 9, 10, 11]),
                                                      (2, 6, [0, 7])])
def test_max_reuse_forces_a_run_only_where_the_forwards_left_keep_every_later_stretch_within_it(budget, max_reuse,
                                                                                                steps):
    """A still input: no threshold is crossed, so only the guards spend. budget 2, max_reuse 1: one forward cannot
    keep 11 steps within the cap, so it waits until it can keep the last stretch (10, 11); the budget is a hard cap."""
    assert ran(RefreshPolicy(mode="budget", budget=budget, max_reuse=max_reuse, signal="input"),
               [None] + [0.0] * 11) == steps


def test_budget_runs_on_an_unknown_signal_while_forwards_are_left():
    assert ran(RefreshPolicy(mode="budget", budget=2, max_reuse=99, signal="input"), [None] * 12) == [0, 1]


# --- the defaults (docs/refresh.md, "Defaults"): chosen on still and rule, where the input signal fails ---------
# The rule miniature samples with euler_ancestral: the fresh noise it injects moves the receiver's input 0.63-0.68
# per step whatever the content does, and adaptive on `input` ran the sharer at 11-12 of 12 steps.
ANCESTRAL_INPUT = [None] + [0.63 + 0.05 * float(x) for x in torch.rand(11, generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("mode", ["adaptive", "budget"])
def test_the_default_signal_does_not_read_sampler_noise_as_change(mode):
    """The default policy decides the same under an ancestral sampler's noisy input as under a smooth one (and the
    `input` signal would not: the control below), so the default keeps working with ancestral/SDE samplers."""
    policy = RefreshPolicy(mode=mode)
    assert ran(policy, ANCESTRAL_INPUT, STILL_SIGMAS) == ran(policy, STILL_INPUT, STILL_SIGMAS)
    if mode == "adaptive":
        noisy = RefreshPolicy(mode=mode, threshold=policy.threshold, signal="input")
        assert ran(noisy, ANCESTRAL_INPUT, STILL_SIGMAS) == list(range(12))


def test_the_default_threshold_places_where_the_frontier_measured_it():
    """Adaptive at the default on the frontier's schedule runs where `adaptive sigma 0.11` ran (6 forwards: 99.9 %
    of the gain on still, 95.2 % on rule, 100.1 % on denoise); max_reuse 8 does not move it."""
    assert ran(RefreshPolicy(mode="adaptive"), None, STILL_SIGMAS) == [0, 4, 7, 9, 10, 11]
    assert ran(RefreshPolicy(mode="adaptive", max_reuse=12), None, STILL_SIGMAS) == [0, 4, 7, 9, 10, 11]


@pytest.mark.parametrize("budget", [2, 3, 4, 6])
@pytest.mark.parametrize("split", [3, 6, 9])
def test_a_split_budget_run_places_as_one_run(budget, split):
    """The first part of a KSamplerAdvanced split ends above sigma 0 and does not know how many steps follow; the
    threshold (a share of the travel to 0) does not need to, so both parts together run where one run does, and the
    second part spends only what the first left."""
    policy = RefreshPolicy(mode="budget", budget=budget, signal="input")
    whole = ran(policy, STILL_INPUT, STILL_SIGMAS)
    tracker = RefreshTracker(policy)
    parts = ran_again(tracker, STILL_INPUT[:split], STILL_SIGMAS[:split + 1])
    assert tracker.begin_run(STILL_SIGMAS[split:])
    parts += [r.step for i, sigma in enumerate(STILL_SIGMAS[split:-1])
              if (r := tracker.decide(sigma, STILL_INPUT[split + i], evaluation=i)).run_sharer]
    assert parts == whole and len(whole) == budget


# --- split samplers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [RefreshPolicy(every=2), RefreshPolicy(every=5),
                                    RefreshPolicy(mode="adaptive", threshold=0.12, signal="input"),
                                    RefreshPolicy(mode="adaptive", signal="sigma", threshold=0.2)])
def test_a_run_that_continues_the_previous_one_keeps_its_cycle(policy):
    signals = [None] + [0.05 + 0.01 * (i % 3) for i in range(11)]
    whole = ran(policy, signals)
    tracker = RefreshTracker(policy)
    halves = []
    for sigmas, offset in ((LINEAR[:6], 0), (LINEAR[5:], 5)):
        continued = tracker.begin_run(sigmas)
        assert continued == (offset > 0)
        for i, sigma in enumerate(sigmas[:-1]):
            r = tracker.decide(sigma, signals[offset + i], evaluation=i)
            halves += [r.step] if r.run_sharer else []
    assert halves == whole
    assert tracker.report().continued


def test_a_new_schedule_or_a_host_that_knows_better_restarts_the_cycle():
    tracker = RefreshTracker(RefreshPolicy(every=4))
    tracker.begin_run(LINEAR[:6])
    tracker.decide(1.0, evaluation=0)
    assert not tracker.begin_run(LINEAR[5:], continues=False)     # another latent: a fresh run
    assert tracker.decide(LINEAR[5], evaluation=0).run_sharer
    assert not tracker.begin_run(LINEAR) and tracker.decide(1.0, evaluation=0).step == 0


# --- signals ------------------------------------------------------------------------------------------
def test_signals_measure_relative_change():
    x = torch.ones(2, 4, 3)
    assert input_change(x * 1.1, x) == pytest.approx(0.1)
    assert kv_change(x * 0.5, x) == pytest.approx(0.5)
    assert magnitude_change(9.0, 10.0) == pytest.approx(0.1)


def test_the_meter_compares_each_decision_with_the_previous_one():
    meter = SignalMeter(RefreshPolicy(mode="adaptive", signal="input"))
    x = torch.ones(1, 4, 2, 2, 2)
    assert meter.signal(x)() is None                         # nothing to compare with yet
    assert meter.signal(x * 1.5)() == pytest.approx(0.5)
    assert SignalMeter(RefreshPolicy(every=3)).signal(x) is None    # every k reads no tensor
    assert SignalMeter(RefreshPolicy(mode="adaptive", signal="sigma")).signal(x) is None


# --- the FusionRun split: a reused step projects nothing --------------------------------------------
SHARER = signature(layers=3, heads=2, head_dim=12)
WIDE = signature(layers=3, heads=3, head_dim=12)
GRID = TokenGrid(2, 2, 3)
SEPARABLE = [("identity", {}), ("weighted", {"alpha": 0.3}), ("weighted", {"alpha": 0.3, "learnable": True}),
             ("full", {"hidden_dim": 16}), ("c2c", {"hidden_dim": 16, "num_layers": 1})]


def pair(kind):
    return SHARER, (WIDE if kind in ("full", "c2c") else SHARER)


@pytest.mark.parametrize("kind, hparams", SEPARABLE + [("gating", {"hidden_dim": 8})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_of_the_sharer_part_is_forward_bit_for_bit(kind, hparams, dtype):
    torch.manual_seed(0)
    s_sig, r_sig = pair(kind)
    bank = ProjectorBank.build(kind, s_sig, r_sig, [0], **hparams).eval()
    for p in bank.parameters():
        p.data.normal_()                                      # trained-looking weights (zero-init would hide terms)
    if kind == "c2c":
        bank.projector(0, "k").set_gate_logit(1.0)
    s, r = kv(2, 12, s_sig, dtype, 1), kv(2, 12, r_sig, dtype, 2)
    proj = bank.projector(0, "k")
    with torch.no_grad():
        assert torch.equal(proj.merge(proj.sharer_part(s), r), proj(s, r))
    if kind in ("full", "c2c"):
        assert proj.sharer_part(s).dim() == 3             # the sharer's projection really is split off
    else:
        assert proj.sharer_part(s) is s                    # nothing to precompute (weighted, identity) or not separable


def test_a_closed_c2c_gate_computes_no_sharer_part():
    proj = ProjectorBank.build("c2c", SHARER, WIDE, [0], hidden_dim=8).eval().projector(0, "k")
    proj.set_gate_logit(-1.0)
    s, r = kv(1, 4, SHARER, seed=1), kv(1, 4, WIDE, seed=2)
    assert proj.sharer_part(s) is s and proj.merge(s, r) is r


def test_a_part_of_the_wrong_shape_is_refused():
    proj = ProjectorBank.build("full", SHARER, WIDE, [0], hidden_dim=8).eval().projector(0, "k")
    s, r = kv(1, 4, SHARER, seed=1), kv(1, 5, WIDE, seed=2)
    with pytest.raises(KVShapeError, match=r"full projector: sharer part \(1, 4, 36\) does not fit receiver"):
        proj.merge(proj.sharer_part(s), r)
    with pytest.raises(KVShapeError, match=r"full projector: sharer has shape \(1, 4, 3, 12\); expected \(B, N, 2, 12\)"):
        proj.sharer_part(kv(1, 4, WIDE))


def fusion_run(kind, hparams, strength=0.5):
    torch.manual_seed(0)
    s_sig, r_sig = pair(kind)
    layer_map = LayerMap.build("terminal", s_sig.num_layers, r_sig.num_layers, layers=[1, 2])
    bank = ProjectorBank.build(kind, s_sig, r_sig, layer_map.layers, **hparams).eval()
    for p in bank.parameters():
        p.data.normal_()
    return FusionRun(ProjectorBundle(bank=bank, layer_map=layer_map, sharer=s_sig, receiver=r_sig), FusionSchedule(),
                     strength, sharer_grid=GRID, receiver_grid=GRID)


@pytest.mark.parametrize("kind, hparams", SEPARABLE)
def test_a_cached_projection_fuses_exactly_as_a_recomputed_one(kind, hparams):
    """Call 1 runs the sharer; calls 2 and 3 reuse its K/V with new receiver K/V: the cached part is used
    (the sharer K/V handed in are never read again), and every result equals a run that recomputes."""
    cached, fresh = fusion_run(kind, hparams), fusion_run(kind, hparams)
    s_sig, r_sig = pair(kind)
    sk, sv = kv(2, GRID.numel, s_sig, seed=10).flatten(2), kv(2, GRID.numel, s_sig, seed=11).flatten(2)
    junk = torch.full_like(sk, float("nan"))
    for call in range(3):
        k, v = kv(2, GRID.numel, r_sig, seed=20 + call).flatten(2), kv(2, GRID.numel, r_sig, seed=30 + call).flatten(2)
        cached.begin_call(0.5), fresh.begin_call(0.5)
        for layer in (1, 2):
            handed = (sk, sv) if call == 0 else (junk, junk)
            got = cached.fuse_tokens(layer, k.clone(), v.clone(), *handed, key=("window", 0))
            want = fresh.fuse_tokens(layer, k.clone(), v.clone(), sk, sv)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    report = cached.close()
    assert report.cached_kv_bytes > 0 and fresh.close().cached_kv_bytes == 0
    assert not report.nonfinite_layers


def test_a_new_key_recomputes_the_sharer_part():
    run = fusion_run("full", {"hidden_dim": 16})
    s_sig, r_sig = pair("full")
    k = kv(1, GRID.numel, r_sig, seed=1)
    run.begin_call(0.5)
    a = run.sharer_part(1, kv(1, GRID.numel, s_sig, seed=2), kv(1, GRID.numel, s_sig, seed=3), ("w", 0), like=k)
    again = run.sharer_part(1, torch.zeros(1, GRID.numel, s_sig.width), torch.zeros(1, GRID.numel, s_sig.width),
                            ("w", 0), like=k)
    assert again[0] is a[0]
    other = run.sharer_part(1, kv(1, GRID.numel, s_sig, seed=4), kv(1, GRID.numel, s_sig, seed=5), ("w", 1), like=k)
    assert not torch.equal(other[0], a[0])
    nothing = run.sharer_part(1, kv(1, GRID.numel, s_sig, seed=4), kv(1, GRID.numel, s_sig, seed=5), None, like=k)
    assert nothing[0] is not other[0] and torch.equal(nothing[0], other[0])


def test_the_split_is_refused_for_a_layer_that_is_not_fused():
    run = fusion_run("identity", {})
    run.begin_call(0.5)
    x = kv(1, GRID.numel, SHARER)
    with pytest.raises(Exception, match=r"FusionRun.sharer_part: receiver layer 0 is not fused; fused layers are \[1, 2\]"):
        run.sharer_part(0, x, x)
    with pytest.raises(Exception, match=r"FusionRun.blend: receiver layer 0 is not fused"):
        run.blend(0, x, x, x, x)
