"""Projector contracts: shapes, dtypes, bit-exact special cases, the c2c gate, the bank, errors."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from c2c_core import KVShapeError, LayerMap, MissingLayerError, ProjectorBank, ProjectorConfigError, UnknownProjectorError, build_projector
from c2c_core import ModelSignature, load_bundle, read_meta, save_bundle
from c2c_core.projectors import PROJECTORS, C2CProjector, c2c_default_hidden, register_projector
from core_helpers import PROPERTY, dtypes, kv, signature

SAME_SHAPE_KINDS = ("identity", "weighted", "gating", "full", "c2c", "auto")
ANY_SHAPE_KINDS = ("full", "c2c", "auto")
SMALL = {"gating": {"hidden_dim": 4}, "full": {"hidden_dim": 8}, "c2c": {"hidden_dim": 8, "num_layers": 1}, "auto": {"hidden_dim": 8}}


def make(kind, sharer, receiver, **extra):
    torch.manual_seed(0)
    return build_projector(kind, sharer, receiver, **{**SMALL.get(kind, {}), **extra}).eval()


heads = st.integers(1, 3)
head_dims = st.sampled_from([2, 4, 8])


@PROPERTY
@given(kind=st.sampled_from(SAME_SHAPE_KINDS), h=heads, d=head_dims, b=st.integers(1, 2), n=st.integers(1, 6), dtype=dtypes)
def test_every_kind_keeps_receiver_shape_and_dtype_for_equal_shapes(kind, h, d, b, n, dtype):
    sig = signature(heads=h, head_dim=d)
    out = make(kind, sig, sig)(kv(b, n, sig, dtype, 1), kv(b, n, sig, dtype, 2))
    assert out.shape == (b, n, h, d) and out.dtype == dtype and torch.isfinite(out.float()).all()


@PROPERTY
@given(kind=st.sampled_from(ANY_SHAPE_KINDS), hs=heads, ds=head_dims, ht=heads, dt=head_dims, n=st.integers(1, 5), sdtype=dtypes, rdtype=dtypes)
def test_learned_kinds_map_any_sharer_shape_onto_the_receiver(kind, hs, ds, ht, dt, n, sdtype, rdtype):
    sharer, receiver = signature(heads=hs, head_dim=ds), signature(heads=ht, head_dim=dt)
    out = make(kind, sharer, receiver)(kv(2, n, sharer, sdtype), kv(2, n, receiver, rdtype))
    assert out.shape == (2, n, ht, dt) and out.dtype == rdtype


@PROPERTY
@given(dtype=dtypes, n=st.integers(1, 6))
def test_identity_returns_the_sharer_bit_for_bit(dtype, n):
    sig = signature()
    sharer = kv(1, n, sig, dtype, 1)
    assert torch.equal(make("identity", sig, sig)(sharer, kv(1, n, sig, dtype, 2)), sharer)


@pytest.mark.parametrize("alpha, expect", [(0.0, "receiver"), (1.0, "sharer")])
def test_weighted_endpoints_are_bit_exact(alpha, expect):
    sig = signature()
    s, r = kv(1, 4, sig, torch.bfloat16, 1), kv(1, 4, sig, torch.bfloat16, 2)
    out = make("weighted", sig, sig, alpha=alpha)(s, r)
    assert torch.equal(out, r if expect == "receiver" else s)


def test_weighted_blends_by_alpha():
    sig = signature()
    s, r = kv(1, 4, sig, seed=1), kv(1, 4, sig, seed=2)
    torch.testing.assert_close(make("weighted", sig, sig, alpha=0.25)(s, r), 0.25 * s + 0.75 * r)


def test_learnable_weighted_has_one_trainable_alpha_starting_at_alpha():
    sig = signature()
    p = make("weighted", sig, sig, alpha=0.3, learnable=True)
    (param,) = list(p.parameters())
    assert torch.sigmoid(param).item() == pytest.approx(0.3)


@pytest.mark.parametrize("granularity, shape", [("head", (2, 1, 3, 1)), ("token", (2, 5, 1, 1)), ("value", (2, 5, 3, 4))])
def test_gating_gate_shape_follows_granularity(granularity, shape):
    sig = signature(heads=3, head_dim=4)
    p = make("gating", sig, sig, granularity=granularity)
    with torch.no_grad():
        p.out.weight.normal_()
    gate = p.gate(kv(2, 5, sig, seed=1), kv(2, 5, sig, seed=2))
    assert gate.shape == shape and (gate >= 0).all() and (gate <= 1).all()


@pytest.mark.parametrize("granularity", ["head", "token", "value"])
def test_fresh_gating_gates_by_gate_init(granularity):
    sig = signature()
    s, r = kv(1, 4, sig, seed=1), kv(1, 4, sig, seed=2)
    out = make("gating", sig, sig, granularity=granularity, gate_init=0.25)(s, r)
    torch.testing.assert_close(out, r + 0.25 * (s - r))


def test_full_adds_gated_mlp_of_the_sharer():
    sharer, receiver = signature(heads=1, head_dim=4), signature(heads=2, head_dim=2)
    p = make("full", sharer, receiver, gate_init=0.2)
    s, r = kv(1, 3, sharer, seed=1), kv(1, 3, receiver, seed=2)
    expected = r + 0.2 * p.mlp(s.reshape(1, 3, 4)).view(1, 3, 2, 2)
    torch.testing.assert_close(p(s, r), expected)


def test_fresh_c2c_fuser_is_open_at_inference():
    sig = signature()
    p = make("c2c", sig, sig)
    r = kv(1, 4, sig, seed=2)
    assert p.gate_open and not torch.equal(p(kv(1, 4, sig, seed=1), r), r)


@PROPERTY
@given(dtype=dtypes, n=st.integers(1, 5))
def test_closed_c2c_gate_returns_the_receiver_object(dtype, n):
    sharer, receiver = signature(heads=1, head_dim=4), signature()
    p = make("c2c", sharer, receiver, gate_init=-1.0)
    r = kv(1, n, receiver, dtype, 2)
    out = p(kv(1, n, sharer, dtype, 1), r)
    assert out is r and torch.equal(out, kv(1, n, receiver, dtype, 2))


def test_c2c_gate_follows_set_gate_logit():
    sig = signature()
    p = make("c2c", sig, sig)
    r = kv(1, 4, sig, seed=2)
    p.set_gate_logit(-0.5)
    assert p(kv(1, 4, sig, seed=1), r) is r
    p.set_gate_logit(0.5)
    assert p(kv(1, 4, sig, seed=1), r) is not r


def test_c2c_gate_follows_load_state_dict():
    sig = signature()
    closed = make("c2c", sig, sig, gate_init=-2.0)
    opened = make("c2c", sig, sig)
    opened.load_state_dict(closed.state_dict())
    r = kv(1, 4, sig, seed=2)
    assert opened(kv(1, 4, sig, seed=1), r) is r


def test_c2c_gate_follows_in_place_optimizer_updates():
    sig = signature()
    p = make("c2c", sig, sig, gate_init=0.01)
    assert p.gate_open
    with torch.no_grad():
        p.gate_logit.sub_(1.0)  # what an optimizer step does: an in-place update
    assert not p.gate_open


def test_c2c_gate_survives_a_dtype_change():
    sig = signature()
    p = make("c2c", sig, sig, gate_init=-1.0).to(torch.bfloat16)
    r = kv(1, 4, sig, torch.bfloat16, 2)
    assert p(kv(1, 4, sig, torch.bfloat16, 1), r) is r


def test_c2c_training_gate_is_a_gumbel_sample_that_hardens_as_temperature_falls():
    sig = signature()
    p = make("c2c", sig, sig, gate_init=5.0)
    s, r = kv(1, 4, sig, seed=1), kv(1, 4, sig, seed=2)
    hard = p(s, r)
    p.train()
    p.set_temperature(1.0)
    torch.manual_seed(1)
    soft_a = p(s, r)
    soft_b = p(s, r)
    assert not torch.equal(soft_a, soft_b)  # a fresh Gumbel sample per call
    p.set_temperature(1e-3)
    torch.testing.assert_close(p(s, r), hard)


@pytest.mark.parametrize("heads, head_dim, hidden", [
    (2, 8, 64),       # tiny models: the floor
    (4, 128, 64),     # K/V width 512 (dim 512; Qwen2.5-VL-7B's 4 K/V heads): 512 / 8
    (8, 128, 128),    # dim 1024, the CPU benchmark
    (12, 128, 192),   # Wan2.1-1.3B
    (24, 128, 384),   # Wan2.2-5B (dim 3072)
    (40, 128, 512),   # Wan2.1-14B: the ceiling (5120 / 8 = 640)
])
def test_c2c_default_hidden_width_is_an_eighth_of_the_receivers_kv_width_clamped(heads, head_dim, hidden):
    receiver = ModelSignature(num_layers=2, num_heads=heads, head_dim=head_dim)
    sharer = signature(heads=2, head_dim=8)            # the sharer's width does not enter the rule
    assert c2c_default_hidden(receiver) == hidden
    with torch.device("meta"):
        p = build_projector("c2c", sharer, receiver)
    assert p.hparams["hidden_dim"] == hidden            # the resolved width is what a bundle saves
    assert (p.in_sharer.out_features, p.in_receiver.out_features, p.proj.in_features) == (hidden, hidden, hidden)


def test_an_explicit_c2c_hidden_width_wins_over_the_default():
    receiver = ModelSignature(num_layers=2, num_heads=12, head_dim=128)
    with torch.device("meta"):
        assert build_projector("c2c", receiver, receiver, hidden_dim=512).hparams["hidden_dim"] == 512
        assert build_projector("c2c", receiver, receiver, hidden_dim=16).in_sharer.out_features == 16
    with pytest.raises(ProjectorConfigError, match="hidden_dim=0; expected an integer >= 1"):
        build_projector("c2c", receiver, receiver, hidden_dim=0)


def test_a_bundle_saved_with_the_earlier_fixed_width_loads_unchanged(tmp_path):
    """Bundles written before the default scaled carry hidden_dim 512 in their hparams (defaults were always
    saved): they rebuild at 512 where today's default would be 64, and project bit for bit as before."""
    sharer, receiver = signature(heads=2, head_dim=8), signature(heads=3, head_dim=8)
    layer_map = LayerMap.build("terminal", sharer.num_layers, receiver.num_layers, layers=[3])
    torch.manual_seed(0)
    old = ProjectorBank.build("c2c", sharer, receiver, layer_map.layers, hidden_dim=512).eval()
    assert c2c_default_hidden(receiver) == 64
    save_bundle(tmp_path / "old.safetensors", old, layer_map)
    assert read_meta(tmp_path / "old.safetensors", "c2c_bundle")["projector"]["hparams"] == {
        "hidden_dim": 512, "num_layers": 2, "gate_init": 1.0, "eps": 1e-6}
    loaded = load_bundle(tmp_path / "old.safetensors").bank
    assert loaded.hparams == old.hparams and loaded.projector(3, "k").in_sharer.out_features == 512
    s, r = kv(1, 5, sharer, seed=1), kv(1, 5, receiver, seed=2)
    with torch.no_grad():
        for which in ("k", "v"):
            assert torch.equal(loaded.project(3, which, s, r), old.project(3, which, s, r))


def test_c2c_weight_branch_is_per_head():
    sig = signature(heads=3)
    p = make("c2c", sig, sig)
    assert p.head_weight.out_features == 3


def test_bank_parameters_follow_the_bank_dtype_and_accept_other_input_dtypes():
    sig = signature()
    bank = ProjectorBank.build("c2c", sig, sig, [0], hidden_dim=4).to(torch.bfloat16).eval()
    out = bank.project(0, "k", kv(1, 3, sig, torch.float16, 1), kv(1, 3, sig, torch.float32, 2))
    assert out.dtype == torch.float32


def test_hparams_are_json_with_defaults_included():
    sig = signature()
    for kind in ("identity", "weighted", "gating", "full", "c2c"):
        p = make(kind, sig, sig)
        assert json.loads(json.dumps(p.hparams)) == p.hparams
    assert make("c2c", sig, sig).hparams == {"hidden_dim": 8, "num_layers": 1, "gate_init": 1.0, "eps": 1e-6}


def test_auto_picks_gating_for_equal_shapes_and_full_otherwise():
    a, b = signature(), signature(heads=3)
    assert ProjectorBank.build("auto", a, a, [0]).kind == "gating"
    assert ProjectorBank.build("auto", a, b, [0], hidden_dim=4).kind == "full"


def test_registry_holds_every_kind():
    assert {"identity", "weighted", "gating", "full", "c2c", "auto"} <= set(PROJECTORS)


def test_registering_a_kind_twice_is_refused():
    with pytest.raises(ProjectorConfigError, match="registered twice"):
        register_projector("c2c")(C2CProjector)


# -- the bank ------------------------------------------------------------------------------------


def test_bank_state_dict_names_are_readable_and_k_v_separate():
    sharer, receiver = signature(layers=20), signature(layers=20, heads=3)
    bank = ProjectorBank.build("full", sharer, receiver, [12, 3], hidden_dim=4)
    keys = set(bank.state_dict())
    assert {"k.12.mlp.0.weight", "v.12.mlp.0.weight", "k.3.gate_logit"} <= keys
    assert bank.projector(12, "k").mlp[0].weight.data_ptr() != bank.projector(12, "v").mlp[0].weight.data_ptr()
    assert bank.layers == [3, 12] and bank.kind == "full" and bank.hparams["hidden_dim"] == 4


def test_bank_project_uses_the_layers_projector():
    sig = signature()
    bank = ProjectorBank.build("weighted", sig, sig, [1, 2], alpha=1.0)
    s = kv(1, 2, sig, seed=1)
    assert torch.equal(bank.project(2, "v", s, kv(1, 2, sig, seed=2)), s)


def test_bank_set_temperature_reaches_every_c2c_projector():
    sig = signature()
    bank = ProjectorBank.build("c2c", sig, sig, [0, 1], hidden_dim=4)
    bank.set_temperature(0.125)
    assert {float(p.temperature) for p in bank.projectors()} == {0.125}


def test_bank_names_missing_layer():
    sig = signature()
    bank = ProjectorBank.build("identity", sig, sig, [1])
    with pytest.raises(MissingLayerError, match=r"receiver layer 2; it covers \[1\]"):
        bank.projector(2, "k")


def test_bank_rejects_which_other_than_k_or_v():
    sig = signature()
    with pytest.raises(ProjectorConfigError, match="expected 'k' or 'v'"):
        ProjectorBank.build("identity", sig, sig, [1]).projector(1, "q")


def test_bank_rejects_layers_outside_the_receiver():
    sig = signature(layers=4)
    with pytest.raises(ProjectorConfigError, match=r"\[4\] are invalid.*0..3"):
        ProjectorBank.build("identity", sig, sig, [0, 4])


# -- errors --------------------------------------------------------------------------------------


def test_unknown_kind_lists_known_kinds():
    sig = signature()
    with pytest.raises(UnknownProjectorError, match="'mlp'; known kinds: auto, c2c, full, gating, identity, weighted"):
        build_projector("mlp", sig, sig)


@pytest.mark.parametrize("kind", ["identity", "weighted", "gating"])
def test_equal_shape_kinds_reject_different_shapes(kind):
    with pytest.raises(ProjectorConfigError, match="needs equal attention shapes.*Use 'full' or 'c2c'"):
        build_projector(kind, signature(heads=2), signature(heads=3))


def test_unknown_hyper_parameter_is_named_with_the_accepted_ones():
    sig = signature()
    with pytest.raises(ProjectorConfigError, match=r"unknown hyper-parameters \['hiden'\]; accepted: \['hidden_dim'"):
        build_projector("full", sig, sig, hiden=4)


@pytest.mark.parametrize(
    "kind, hparams, message",
    [
        ("weighted", {"alpha": 1.5}, r"alpha=1.5; expected a number in \[0.0, 1.0\]"),
        ("weighted", {"alpha": 0.0, "learnable": True}, r"alpha=0.0; expected a number in \(0.0, 1.0\)"),
        ("weighted", {"learnable": "yes"}, "learnable='yes'; expected true or false"),
        ("gating", {"granularity": "channel"}, "granularity='channel'; expected one of"),
        ("gating", {"gate_init": 1.0}, r"gate_init=1.0; expected a number in \(0.0, 1.0\)"),
        ("full", {"hidden_dim": 0}, "hidden_dim=0; expected an integer >= 1"),
        ("c2c", {"num_layers": -1}, "num_layers=-1; expected an integer >= 0"),
    ],
)
def test_bad_hyper_parameter_values_are_rejected(kind, hparams, message):
    sig = signature()
    with pytest.raises(ProjectorConfigError, match=message):
        build_projector(kind, sig, sig, **hparams)


def test_forward_rejects_sharer_with_wrong_heads():
    sig = signature()
    with pytest.raises(KVShapeError, match=r"sharer has \(H, D\)=\(3, 8\); expected \(2, 8\)"):
        make("c2c", sig, sig)(torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 2, 8))


def test_forward_rejects_token_count_mismatch():
    sig = signature()
    with pytest.raises(KVShapeError, match=r"sharer has \(B, N\)=\(1, 5\), receiver \(1, 4\).*resample_tokens"):
        make("identity", sig, sig)(torch.zeros(1, 5, 2, 8), torch.zeros(1, 4, 2, 8))


def test_forward_rejects_flat_inputs():
    sig = signature()
    with pytest.raises(KVShapeError, match="expected 4-D"):
        make("identity", sig, sig)(torch.zeros(1, 4, 16), torch.zeros(1, 4, 16))



@PROPERTY
@given(
    counts=st.sampled_from([(30, 40), (40, 30), (40, 40)]),
    kind=st.sampled_from(SAME_SHAPE_KINDS),
    mapping=st.sampled_from(["terminal", "position", "uniform"]),
    dtype=dtypes,
    data=st.data(),
)
def test_banks_over_wan_depths_project_every_fused_layer(counts, kind, mapping, dtype, data):
    s_layers, r_layers = counts
    sharer, receiver = signature(layers=s_layers), signature(layers=r_layers)
    full_map = LayerMap.build(mapping, s_layers, r_layers)
    chosen = data.draw(st.sets(st.sampled_from(full_map.layers), min_size=1, max_size=3))
    layer_map = LayerMap.build(mapping, s_layers, r_layers, layers=chosen)
    bank = ProjectorBank.build(kind, sharer, receiver, layer_map.layers, **SMALL.get(kind, {})).eval()
    for layer in layer_map.layers:
        assert 0 <= layer_map.sharer_layer(layer) < s_layers
        for which in ("k", "v"):
            out = bank.project(layer, which, kv(1, 3, sharer, dtype, 1), kv(1, 3, receiver, dtype, 2))
            assert out.shape == (1, 3, 2, 8) and out.dtype == dtype


def test_static_gate_reports_the_data_independent_gate():
    from c2c_core import ModelSignature, build_projector, static_gate
    sig = ModelSignature(num_layers=2, num_heads=2, head_dim=8)
    wide = ModelSignature(num_layers=2, num_heads=4, head_dim=8)
    assert static_gate(build_projector("identity", sig, sig)) == 1.0
    assert static_gate(build_projector("weighted", sig, sig, alpha=0.25)) == 0.25
    c2c = build_projector("c2c", sig, sig, hidden_dim=16)
    assert static_gate(c2c) == 1.0
    c2c.set_gate_logit(-1.0)
    assert static_gate(c2c) == 0.0
    assert 0.0 < static_gate(build_projector("full", wide, sig, hidden_dim=16)) < 1.0
    assert static_gate(build_projector("gating", sig, sig, granularity="head")) is None
