"""fuse and FusionRun's per-layer fusion: strengths, schedules, bit-exact endpoints, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from c2c_core import FusionError, FusionSchedule, LayerMap, ProjectorBank, TokenGrid, fuse
from c2c_core.bundle import ProjectorBundle
from c2c_core.fusion import check_fusion
from c2c_core.runtime import FusionRun
from core_helpers import PROPERTY, dtypes, kv, signature

SIG = signature(layers=4)
GRID = TokenGrid(1, 1, 3)      # the 3 tokens of pair()


def pair(dtype=torch.float32, n=3):
    return kv(1, n, SIG, dtype, 1), kv(1, n, SIG, dtype, 2)


@PROPERTY
@given(dtype=dtypes)
def test_strength_zero_returns_the_receiver_object_untouched(dtype):
    p, r = pair(dtype)
    before = r.clone()
    out = fuse(p, r, 0.0)
    assert out is r and torch.equal(r, before)


@PROPERTY
@given(dtype=dtypes)
def test_strength_one_returns_the_projected_tensor(dtype):
    p, r = pair(dtype)
    assert fuse(p, r, 1.0) is p


@PROPERTY
@given(s=st.floats(0.01, 0.99), dtype=dtypes)
def test_intermediate_strength_lerps(s, dtype):
    p, r = pair(dtype)
    out = fuse(p, r, s)
    assert out.dtype == dtype
    torch.testing.assert_close(out, torch.lerp(r, p, s))


def test_inplace_fuse_writes_into_the_projected_buffer_bit_for_bit():
    p, r = pair()
    r_before, expected = r.clone(), torch.lerp(r, p, 0.3)
    out = fuse(p, r, 0.3, inplace=True)
    assert out is p and torch.equal(out, expected) and torch.equal(r, r_before)


def test_inplace_fuse_never_overwrites_the_receiver_or_a_protected_tensor():
    p, r = pair()
    p_before = p.clone()
    assert fuse(p, r, 0.3, inplace=True, protect=(p.view(-1),)) is not p and torch.equal(p, p_before)
    assert fuse(r.view(r.shape), r, 0.3, inplace=True) is not r
    p.requires_grad_(True)
    assert fuse(p, r, 0.3, inplace=True) is not p


def test_tensor_strength_is_refused_to_avoid_gpu_reads():
    p, r = pair()
    with pytest.raises(FusionError, match="expected a finite Python float.*float\\(\\)"):
        fuse(p, r, torch.tensor(0.5))


def test_fuse_rejects_shape_mismatch():
    with pytest.raises(FusionError, match="expected equal shapes"):
        fuse(torch.zeros(1, 3, 2, 8), torch.zeros(1, 4, 2, 8), 0.5)


# -- FusionRun's per-layer fusion (the reference formula, what it checks) ---------------------------


def run_of(kind="weighted", strength=1.0, schedule=FusionSchedule(), strengths=None, **hparams):
    """A FusionRun fusing receiver layers 1 and 3 of two 4-layer models on one token grid (no alignment)."""
    layer_map = LayerMap.build("identity", 4, 4, layers=[1, 3], strengths=strengths)
    bank = ProjectorBank.build(kind, SIG, SIG, layer_map.layers, **hparams).eval()
    bundle = ProjectorBundle(bank=bank, layer_map=layer_map, sharer=SIG, receiver=SIG)
    return FusionRun(bundle, schedule, strength, sharer_grid=GRID, receiver_grid=GRID)


@pytest.mark.parametrize("kind, hparams", [("identity", {}), ("weighted", {"alpha": 0.3}), ("gating", {}),
                                           ("full", {"hidden_dim": 4}), ("c2c", {"hidden_dim": 4})])
def test_fusion_run_fast_path_equals_the_simple_path_and_leaves_inputs_untouched(kind, hparams):
    run = run_of(kind=kind, strength=0.7, **hparams)
    s, r = pair()
    s_before, r_before = s.clone(), r.clone()
    with torch.no_grad():
        simple_k = torch.lerp(r, run.bank.project(1, "k", s, r).to(r.dtype), 0.7)
        simple_v = torch.lerp(r, run.bank.project(1, "v", s, r).to(r.dtype), 0.7)
        run.begin_call(0.5)
        fast_k, fast_v = run.fuse(1, r, r, s, s)
    assert torch.equal(fast_k, simple_k) and torch.equal(fast_v, simple_v)
    assert torch.equal(s, s_before) and torch.equal(r, r_before)


def test_fusion_run_multiplies_strength_layer_strength_and_schedule():
    run = run_of(strength=0.8, strengths={3: 0.5}, schedule=FusionSchedule(ramp="linear_down"))
    run.begin_call(0.5)
    assert run.strength(3) == pytest.approx(0.8 * 0.5 * 0.5)
    run.begin_call(0.0)
    assert run.strength(1) == pytest.approx(0.8)


def test_fusion_run_applies_projector_then_strength():
    run = run_of(alpha=1.0, strength=0.5)  # weighted alpha=1: projected == sharer
    s, r = pair()
    run.begin_call(0.3)
    torch.testing.assert_close(run.fuse(1, r, r, s, s)[0], torch.lerp(r, s, 0.5))


def test_fusion_run_outside_the_window_skips_the_projector():
    run = run_of(kind="c2c", schedule=FusionSchedule(start=0.5), hidden_dim=4)
    calls = []
    run.bank.projector(1, "v").register_forward_hook(lambda *a: calls.append(1))
    s, r = pair()
    run.begin_call(0.25)
    k, v = run.fuse(1, r, r, s, s)
    assert k is r and v is r and not calls


def test_fusion_run_knows_layers_and_sharer_layers():
    run = run_of()
    assert run.layers == [1, 3] and run.sharer_layer(3) == 3


def test_fusion_run_rejects_unfused_layer():
    s, r = pair()
    run = run_of()
    run.begin_call(0.0)
    with pytest.raises(FusionError, match=r"receiver layer 0 is not fused; fused layers are \[1, 3\]"):
        run.fuse(0, r, r, s, s)


def test_fusion_run_rejects_a_map_wider_than_the_bank():
    bank = ProjectorBank.build("identity", SIG, SIG, [1])
    with pytest.raises(FusionError, match=r"receiver layers \[3\] but the projector bank has no projectors"):
        check_fusion(bank, LayerMap.build("identity", 4, 4, layers=[1, 3]), 1.0)


def test_fusion_run_rejects_a_map_for_other_models():
    bank = ProjectorBank.build("identity", SIG, SIG, [1])
    with pytest.raises(FusionError, match="layer map does not fit the projector bank"):
        check_fusion(bank, LayerMap.build("identity", 5, 5, layers=[1]), 1.0)


def test_fusion_run_rejects_negative_strength():
    with pytest.raises(FusionError, match="strength=-1.0; expected >= 0"):
        run_of(strength=-1.0)
