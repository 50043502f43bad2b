"""c2c_core.runtime: the host-free fusion runtime every bridge fuses through."""

import math

import pytest
import torch

from c2c_core import FusionSchedule, LayerMap, ProjectorBank, RopeSpec, TokenGrid, align_kv
from c2c_core import align as align_module
from c2c_core.bundle import ProjectorBundle
from c2c_core.contract import SourceReport
from c2c_core.runtime import BankCache, FusionRun, percent_of, step_index
from core_helpers import kv, signature

SIG = signature(layers=3, heads=2, head_dim=12)
GRID = TokenGrid(2, 2, 3)
SMALL = TokenGrid(1, 2, 2)
SCALED = RopeSpec(scale=(7.0, 1.0, 1.0))


def bundle(kind="identity", layers=(0, 2), strengths=None, **hparams):
    layer_map = LayerMap.build("identity", SIG.num_layers, SIG.num_layers, layers=list(layers), strengths=strengths)
    bank = ProjectorBank.build(kind, SIG, SIG, layer_map.layers, **hparams).eval()
    return ProjectorBundle(bank=bank, layer_map=layer_map, sharer=SIG, receiver=SIG)


def run_of(b=None, schedule=FusionSchedule(), strength=1.0, **kw):
    kw = {"sharer_grid": GRID, "receiver_grid": GRID} | kw
    return FusionRun(b or bundle(), schedule, strength, **kw)


def tokens(grid, seed, dtype=torch.float32, batch=2):
    return kv(batch, grid.numel, SIG, dtype, seed)


# --- step_index / percent_of ---------------------------------------------------------------------
def test_step_index_finds_the_step_a_sigma_lies_in():
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [step_index(sigmas, s) for s in (1.0, 0.9, 0.75, 0.6, 0.5, 0.25, 0.1)] == [0, 0, 1, 1, 2, 3, 3]


def test_step_index_works_on_timesteps_as_well():
    timesteps = [999, 749, 499, 249, 0]
    assert [step_index(timesteps, t) for t in (999, 749, 600, 249)] == [0, 1, 1, 3]


def shifted(shift=5.0):
    """ComfyUI's flow percent_to_sigma (time_snr_shift of 1 - percent)."""
    def percent_to_sigma(p):
        if p <= 0.0:
            return 1.0
        if p >= 1.0:
            return 0.0
        t = 1.0 - p
        return shift * t / (1 + (shift - 1) * t)
    return percent_to_sigma


@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.5, 0.77, 0.999])
def test_percent_of_inverts_the_hosts_conversion(p):
    f = shifted()
    assert math.isclose(percent_of(f(p), f), p, abs_tol=1e-9)


def test_percent_of_returns_window_edges_exactly():
    f = shifted()
    sigma = f(0.3)
    assert percent_of(sigma, f, snap=(0.0, 0.3)) == 0.3
    assert percent_of(2.0, f) == 0.0 and percent_of(0.0, f) == 1.0


# --- strengths -------------------------------------------------------------------------------------
def test_begin_call_sets_python_float_strengths_by_window_and_layer():
    run = run_of(bundle(strengths={2: 0.5}), FusionSchedule(0.2, 0.6), 0.8, layer_strengths={0: 0.25})
    assert run.begin_call(0.1) is False and run.strength(0) == 0.0
    assert run.begin_call(0.4) is True
    assert run.strength(0) == 0.8 * 0.25 and run.strength(2) == 0.8 * 0.5
    assert all(type(run.strength(layer)) is float for layer in (0, 2))
    assert run.strength(1) == 0.0                       # not fused at all


def test_strength_zero_returns_the_receivers_tensors_without_reading_the_sharers():
    run = run_of(strength=0.0)
    run.begin_call(0.0)
    k, v = tokens(GRID, 1), tokens(GRID, 2)
    out = run.fuse(0, k, v, torch.empty(0), torch.empty(0))    # never cast, aligned or projected
    assert out[0] is k and out[1] is v


def test_identity_at_strength_one_hands_over_the_sharers_kv_cast_to_the_receivers_dtype():
    run = run_of()
    run.begin_call(0.5)
    k, v = tokens(GRID, 1), tokens(GRID, 2)
    sk, sv = tokens(GRID, 3, torch.float64), tokens(GRID, 4, torch.float64)
    k2, v2 = run.fuse(0, k, v, sk, sv)
    assert k2.dtype == v2.dtype == torch.float32
    assert torch.equal(k2, sk.float()) and torch.equal(v2, sv.float())


# --- alignment -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sharer_grid, mode", [(GRID, "nearest"), (SMALL, "nearest"), (SMALL, "trilinear")])
def test_alignment_equals_align_kv_bit_for_bit(sharer_grid, mode):
    run = run_of(sharer_grid=sharer_grid, sharer_rope=SCALED, grid_mode=mode)
    run.begin_call(0.0)
    sk, sv = tokens(sharer_grid, 3), tokens(sharer_grid, 4)
    k2, v2 = run.fuse(0, tokens(GRID, 1), tokens(GRID, 2), sk, sv)
    ek, ev = align_kv(sk, sv, sharer_grid, GRID, SCALED, RopeSpec(), mode)
    assert torch.equal(k2, ek) and torch.equal(v2, ev)


def test_rope_alignment_off_fuses_the_sharers_keys_as_they_are():
    run = run_of(sharer_rope=SCALED, rope_alignment="off")
    run.begin_call(0.0)
    sk = tokens(GRID, 3)
    assert torch.equal(run.fuse(0, tokens(GRID, 1), tokens(GRID, 2), sk, tokens(GRID, 4))[0], sk)


@pytest.mark.parametrize("sharer_grid, tables", [(GRID, 1), (SMALL, 2)])
def test_rope_tables_are_built_once_per_run(monkeypatch, sharer_grid, tables):
    built = []
    real = align_module._rotation_table
    monkeypatch.setattr(align_module, "_rotation_table", lambda *a: built.append(1) or real(*a))
    run = run_of(sharer_grid=sharer_grid, sharer_rope=SCALED)
    for percent in (0.0, 0.5, 1.0):                        # three calls × two fused layers
        run.begin_call(percent)
        for layer in (0, 2):
            run.fuse(layer, tokens(GRID, 1), tokens(GRID, 2), tokens(sharer_grid, 3), tokens(sharer_grid, 4))
    assert len(built) == tables


# --- bank placement, report ------------------------------------------------------------------------
def test_bank_cache_places_a_copy_once_and_never_moves_the_users_bank():
    b = bundle("full", hidden_dim=4)
    cache = BankCache(b.bank)
    placed = cache.on(torch.device("cpu"), torch.float64)
    assert placed is not b.bank and next(placed.parameters()).dtype == torch.float64
    assert next(b.bank.parameters()).dtype == torch.float32
    assert cache.on(torch.device("cpu"), torch.float64) is placed
    assert cache.on(torch.device("cpu"), torch.float32) is b.bank


def test_run_on_another_dtype_fuses_in_that_dtype():
    run = run_of(bundle("full", hidden_dim=4), device=torch.device("cpu"), dtype=torch.float64)
    run.begin_call(0.0)
    k2, _ = run.fuse(0, tokens(GRID, 1, torch.float64), tokens(GRID, 2, torch.float64), tokens(GRID, 3), tokens(GRID, 4))
    assert k2.dtype == torch.float64


def test_close_reports_strengths_changes_and_gates():
    run = run_of(bundle("weighted", alpha=0.5), FusionSchedule(0.0, 0.5))
    for percent in (0.0, 0.25, 0.75):
        if run.begin_call(percent):
            run.fuse(0, tokens(GRID, 1), tokens(GRID, 2), tokens(GRID, 3), tokens(GRID, 4))
    report = run.close(SourceReport(sharer_forwards=2, peak_kv_bytes=10))
    assert report.model_calls == 3 and report.sharer_forwards == 2 and report.peak_kv_bytes == 10
    assert report.strength == {0: 1.0, 2: 1.0}
    assert report.k_change[0] > 0 and report.k_change[2] == 0.0     # layer 2 was never fused here
    assert report.gate[0] == {"k": 0.5, "v": 0.5}
    assert report.nonfinite_layers == []
    assert report.to_json()["strength"] == {0: 1.0, 2: 1.0}


def test_close_names_layers_whose_fused_kv_are_not_finite():
    run = run_of()
    run.begin_call(0.0)
    sk = tokens(GRID, 3)
    sk[0, 0, 0, 0] = float("nan")
    run.fuse(2, tokens(GRID, 1), tokens(GRID, 2), sk, tokens(GRID, 4))
    assert run.close().nonfinite_layers == [2]


def test_the_bank_is_placed_at_first_use_so_a_module_the_host_loaded_meanwhile_is_used_in_place():
    """ComfyUI sets a run up (OUTER_SAMPLE) before it loads the registered bank with the receiver: placing
    the bank at construction would keep a second copy on the device. Placed at the first fuse, the run
    finds the module already where the host put it and uses it as it is."""
    b = bundle("gating")
    banks = BankCache(b.bank)
    run = run_of(b, banks=banks, device="cpu", dtype=torch.bfloat16)
    assert banks._placed == {}, "nothing placed while the run is only set up"
    b.bank.to(torch.bfloat16)                       # the host loads the module in the run's dtype
    run.begin_call(0.5)
    k, v = tokens(GRID, 1, torch.bfloat16), tokens(GRID, 2, torch.bfloat16)
    run.fuse(0, k.clone(), v.clone(), k, v)
    assert run.bank is b.bank and banks._placed == {}, "used in place, no copy"
    other = run_of(bundle("gating"), device="cpu", dtype=torch.bfloat16)
    other.begin_call(0.5)
    other.fuse(0, k.clone(), v.clone(), k, v)
    assert other.bank is not other.bundle.bank, "a bank the host did not place is copied at first use"
    assert next(other.bank.parameters()).dtype == torch.bfloat16
