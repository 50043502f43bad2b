"""Fusion window, strength ramps and the sharer refresh interval."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from c2c_core import FusionSchedule, ScheduleError
from core_helpers import PROPERTY

unit = st.floats(0.0, 1.0)


def test_constant_ramp_gives_base_inside_and_zero_outside():
    s = FusionSchedule(start=0.2, end=0.6)
    assert [s.strength_at(p, 0.8) for p in (0.0, 0.2, 0.4, 0.6, 0.61, 1.0)] == [0.0, 0.8, 0.8, 0.8, 0.0, 0.0]


@pytest.mark.parametrize(
    "ramp, values",
    [("linear_up", [0.0, 0.5, 1.0]), ("linear_down", [1.0, 0.5, 0.0]), ("cosine_down", [1.0, 0.5, 0.0])],
)
def test_ramps_at_window_start_middle_end(ramp, values):
    s = FusionSchedule(start=0.5, end=1.0, ramp=ramp)
    got = [s.strength_at(p, 2.0) for p in (0.5, 0.75, 1.0)]
    assert got == pytest.approx([2.0 * v for v in values], abs=1e-12)


def test_cosine_down_is_above_linear_down_early_in_the_window():
    cos, lin = FusionSchedule(ramp="cosine_down"), FusionSchedule(ramp="linear_down")
    value = cos.strength_at(0.25, 1.0)
    assert value == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert value > lin.strength_at(0.25, 1.0)


@PROPERTY
@given(a=unit, b=unit, p=unit, base=st.floats(0.0, 2.0), ramp=st.sampled_from(["constant", "linear_up", "linear_down", "cosine_down"]))
def test_strength_stays_between_zero_and_base(a, b, p, base, ramp):
    s = FusionSchedule(min(a, b), max(a, b), ramp)
    value = s.strength_at(p, base)
    assert isinstance(value, float) and 0.0 <= value <= base + 1e-12
    assert (value == 0.0) or s.active(p)


def test_zero_width_window_is_active_only_at_its_point():
    s = FusionSchedule(start=0.5, end=0.5, ramp="linear_down")
    assert s.strength_at(0.5, 1.0) == 1.0 and s.strength_at(0.49, 1.0) == 0.0


def test_dict_roundtrip():
    s = FusionSchedule(0.1, 0.9, "cosine_down")
    assert FusionSchedule.from_dict(s.to_dict()) == s


def test_refresh_every_is_no_schedule_field_any_more():
    with pytest.raises(ScheduleError, match=r"unknown keys \['refresh_every'\] \(refresh_every moved to "
                                            r"c2c_core.refresh.RefreshPolicy\(every=k\)\)"):
        FusionSchedule.from_dict({"refresh_every": 2})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"start": 0.7, "end": 0.3}, "starts at 0.7 after it ends at 0.3"),
        ({"start": -0.1}, r"start=-0.1; expected a number in \[0, 1\]"),
        ({"end": 1.5}, r"end=1.5; expected a number in \[0, 1\]"),
        ({"ramp": "exp"}, "ramp='exp'; expected one of"),
    ],
)
def test_bad_schedules_are_rejected(kwargs, message):
    with pytest.raises(ScheduleError, match=message):
        FusionSchedule(**kwargs)


def test_progress_outside_the_run_is_rejected():
    with pytest.raises(ScheduleError, match=r"progress=1.2; expected a number in \[0, 1\]"):
        FusionSchedule().strength_at(1.2, 1.0)
