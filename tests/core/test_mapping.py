"""Layer maps between models of different depths, and the user's layer-selection syntax."""

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from c2c_core import LayerMap, LayerMapError, ModelSignature, parse_layer_spec
from core_helpers import LAYER_COUNTS, PROPERTY

counts = st.one_of(st.sampled_from(LAYER_COUNTS), st.tuples(st.integers(1, 12), st.integers(1, 12)))
auto_kinds = st.sampled_from(["terminal", "position", "uniform"])


@PROPERTY
@given(sr=counts, kind=auto_kinds)
def test_every_kind_maps_within_both_models(sr, kind):
    s, r = sr
    m = LayerMap.build(kind, s, r)
    assert all(0 <= rl < r and 0 <= sl < s for rl, sl in m.pairs.items())
    assert m.layers == sorted(m.pairs)


@PROPERTY
@given(sr=counts, kind=auto_kinds)
def test_every_kind_is_monotone(sr, kind):
    s, r = sr
    sharers = list(LayerMap.build(kind, s, r).pairs.values())
    assert sharers == sorted(sharers)


@PROPERTY
@given(sr=counts)
def test_terminal_aligns_the_last_layers_one_to_one(sr):
    s, r = sr
    m = LayerMap.build("terminal", s, r)
    assert m.pairs[r - 1] == s - 1
    assert len(m.pairs) == min(r, s)
    assert all(sl - rl == s - r for rl, sl in m.pairs.items())


def test_terminal_for_deeper_receiver_leaves_its_first_layers_unfused():
    m = LayerMap.build("terminal", sharer_layers=30, receiver_layers=40)
    assert m.layers == list(range(10, 40)) and m.pairs[10] == 0


def test_terminal_for_deeper_sharer_skips_the_sharers_first_layers():
    m = LayerMap.build("terminal", sharer_layers=40, receiver_layers=30)
    assert m.layers == list(range(30)) and m.pairs[0] == 10


@PROPERTY
@given(sr=counts)
def test_position_maps_every_receiver_layer_to_the_nearest_relative_depth(sr):
    s, r = sr
    m = LayerMap.build("position", s, r)
    assert m.layers == list(range(r))
    for rl, sl in m.pairs.items():
        depth = rl / (r - 1) if r > 1 else 0.0
        assert abs(sl - depth * (s - 1)) <= 0.5 + 1e-9


def test_position_rounds_half_up_exactly():
    # receiver 3 layers onto sharer 4: depths 0, 1.5, 3 -> 0, 2, 3 (half rounds up, not to even)
    assert LayerMap.build("position", 4, 3).pairs == {0: 0, 1: 2, 2: 3}


@PROPERTY
@given(sr=counts)
def test_uniform_is_one_to_one_over_min_layers_and_spans_both_ends(sr):
    s, r = sr
    m = LayerMap.build("uniform", s, r)
    assert len(m.pairs) == min(r, s) == len(set(m.pairs.values()))
    if min(r, s) > 1:
        assert m.pairs[0] == 0 and m.pairs[max(m.pairs)] == s - 1 and max(m.pairs) == r - 1


def test_uniform_deeper_receiver_uses_each_sharer_layer_once():
    m = LayerMap.build("uniform", sharer_layers=30, receiver_layers=40)
    assert sorted(m.pairs.values()) == list(range(30))


def test_identity_maps_i_to_i():
    assert LayerMap.build("identity", 40, 40).pairs == {i: i for i in range(40)}


def test_identity_refuses_different_depths():
    with pytest.raises(LayerMapError, match="needs equal depths; receiver has 40 layers, sharer 30.*terminal"):
        LayerMap.build("identity", 30, 40)


@PROPERTY
@given(sr=counts, kind=auto_kinds, data=st.data())
def test_layers_restricts_to_the_intersection(sr, kind, data):
    s, r = sr
    full = LayerMap.build(kind, s, r)
    wanted = data.draw(st.sets(st.sampled_from(full.layers), min_size=1))
    assert LayerMap.build(kind, s, r, layers=wanted).pairs == {i: full.pairs[i] for i in sorted(wanted)}


def test_layers_outside_the_receiver_are_an_error():
    with pytest.raises(LayerMapError, match="receiver layer 40 is out of range; the receiver has 40 layers"):
        LayerMap.build("position", 30, 40, layers=[39, 40])


def test_layers_the_kind_leaves_unfused_are_an_error_when_nothing_remains():
    with pytest.raises(LayerMapError, match=r"fuses none of the selected layers \[0, 1\]"):
        LayerMap.build("terminal", 30, 40, layers=[0, 1])


def test_custom_keeps_given_pairs():
    m = LayerMap.build("custom", 30, 40, custom={5: 1, 0: 29})
    assert m.pairs == {0: 29, 5: 1} and m.layers == [0, 5]


def test_custom_rejects_sharer_layer_out_of_range():
    with pytest.raises(LayerMapError, match="sharer layer 30 is out of range"):
        LayerMap.build("custom", 30, 40, custom={0: 30})


def test_custom_without_pairs_is_an_error():
    with pytest.raises(LayerMapError, match="needs custom="):
        LayerMap.build("custom", 30, 40)


def test_unknown_kind_is_an_error():
    with pytest.raises(LayerMapError, match="unknown layer map kind 'middle'"):
        LayerMap.build("middle", 30, 40)


def test_strength_defaults_to_one_and_can_be_set_per_layer():
    m = LayerMap.build("identity", 4, 4, strengths={2: 0.5})
    assert m.strength(2) == 0.5 and m.strength(1) == 1.0


@pytest.mark.parametrize(
    "strengths, message",
    [({2: -0.1}, "expected a finite number >= 0"), ({2: math.nan}, "expected a finite number >= 0"), ({9: 1.0}, "out of range")],
)
def test_bad_strengths_are_rejected(strengths, message):
    with pytest.raises(LayerMapError, match=message):
        LayerMap.build("identity", 4, 4, strengths=strengths)


def test_strength_for_an_unfused_layer_is_rejected():
    with pytest.raises(LayerMapError, match="strength given for receiver layer 0, which the map does not fuse"):
        LayerMap.build("terminal", 30, 40, strengths={0: 0.5})


@PROPERTY
@given(sr=counts, kind=auto_kinds)
def test_dict_roundtrip_through_json(sr, kind):
    first = LayerMap.build(kind, *sr).layers[0]
    m = LayerMap.build(kind, *sr, strengths={first: 0.5})
    assert LayerMap.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_validate_accepts_matching_depths_whatever_the_heads():
    m = LayerMap.build("terminal", 30, 40)
    for heads, head_dim in ((12, 128), (1, 8), (40, 64)):
        assert m.validate(ModelSignature(30, heads, head_dim), ModelSignature(40, heads, head_dim)) is None


def test_validate_rejects_other_depths():
    with pytest.raises(LayerMapError, match="built for 40 receiver / 30 sharer layers; the models have 30 / 40"):
        LayerMap.build("terminal", 30, 40).validate(ModelSignature(40, 1, 8), ModelSignature(30, 1, 8))


def test_sharer_layer_of_unfused_layer_names_fused_layers():
    with pytest.raises(LayerMapError, match="receiver layer 0 is not fused"):
        LayerMap.build("terminal", 2, 3).sharer_layer(0)


# -- parse_layer_spec ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("all", list(range(10))),
        ("ALL", list(range(10))),
        ("0-3,7", [0, 1, 2, 3, 7]),
        (" 7 , 0 - 1 ", [0, 1, 7]),
        ("-1", [9]),
        ("-10", [0]),
        ("last4", [6, 7, 8, 9]),
        ("first2,last1", [0, 1, 9]),
        ("3,3,2-3", [2, 3]),
    ],
)
def test_layer_spec_examples(text, expected):
    assert parse_layer_spec(text, 10) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "layer selection is empty"),
        ("0,,2", "empty item between commas"),
        ("10", "out of range for a 10-layer model"),
        ("-11", "out of range for a 10-layer model"),
        ("5-3", "runs backwards; write 3-5"),
        ("8-12", "goes past the last layer 9"),
        ("last0", "count must be 1..10"),
        ("last11", "count must be 1..10"),
        ("odd", "'odd' in 'odd' is not understood; accepted: 'all'"),
    ],
)
def test_layer_spec_errors_say_what_is_accepted(text, message):
    with pytest.raises(LayerMapError, match=message):
        parse_layer_spec(text, 10)


@PROPERTY
@given(n=st.integers(1, 40), data=st.data())
def test_layer_spec_of_listed_indices_returns_them_sorted(n, data):
    chosen = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=6))
    assert parse_layer_spec(",".join(map(str, chosen)), n) == sorted(set(chosen))


@PROPERTY
@given(n=st.sampled_from([30, 40]), data=st.data())
def test_identity_maps_equal_depths_one_to_one(n, data):
    chosen = data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=5))
    assert LayerMap.build("identity", n, n, layers=chosen).pairs == {i: i for i in sorted(chosen)}


@PROPERTY
@given(sr=st.sampled_from(LAYER_COUNTS), data=st.data())
def test_custom_keeps_any_in_range_pairs(sr, data):
    s, r = sr
    custom = data.draw(st.dictionaries(st.integers(0, r - 1), st.integers(0, s - 1), min_size=1, max_size=6))
    assert LayerMap.build("custom", s, r, custom=custom).pairs == dict(sorted(custom.items()))
