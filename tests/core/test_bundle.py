"""Bundles: bit-exact round trip for every kind, and every way a stranger's file can be refused."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import c2c_core.tensorfile as tensorfile
from c2c_core import (
    BundleError,
    BundleNotFoundError,
    FormatVersionError,
    InvalidMetadataError,
    LayerMap,
    MissingMetadataError,
    MissingTensorError,
    NotSafetensorsError,
    ProjectorBank,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnknownProjectorError,
    UnsafeFormatError,
    load_bundle,
    read_meta,
    save_bundle,
    save_tensors_with_meta,
)
from core_helpers import kv, signature

SHARER, RECEIVER = signature(layers=3, heads=2, head_dim=4, name="sharer"), signature(layers=4, heads=2, head_dim=4, name="receiver")
WIDE = signature(layers=4, heads=3, head_dim=4, name="wide")

CASES = {
    "identity": ("identity", RECEIVER, {}),
    "weighted": ("weighted", RECEIVER, {"alpha": 0.3}),
    "weighted-learnable": ("weighted", RECEIVER, {"alpha": 0.3, "learnable": True}),
    "gating-head": ("gating", RECEIVER, {"granularity": "head", "hidden_dim": 4}),
    "gating-token": ("gating", RECEIVER, {"granularity": "token", "hidden_dim": 4}),
    "gating-value": ("gating", RECEIVER, {"granularity": "value", "hidden_dim": 4}),
    "full": ("full", WIDE, {"hidden_dim": 6}),
    "c2c-open": ("c2c", WIDE, {"hidden_dim": 6, "num_layers": 2}),
    "c2c-closed": ("c2c", WIDE, {"hidden_dim": 6, "gate_init": -1.0}),
}


def build(kind="c2c", receiver=WIDE, hparams=None, seed=0):
    torch.manual_seed(seed)
    layer_map = LayerMap.build("terminal", SHARER.num_layers, receiver.num_layers)
    bank = ProjectorBank.build(kind, SHARER, receiver, layer_map.layers, **(hparams if hparams is not None else {"hidden_dim": 6}))
    with torch.no_grad():  # make every parameter matter (gates start at fixed values)
        for p in bank.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return bank.eval(), layer_map


@pytest.fixture
def good(tmp_path):
    bank, layer_map = build()
    path = tmp_path / "good.safetensors"
    save_bundle(path, bank, layer_map, {"steps": 10})
    return path


def forward_all(bank, layer_map, receiver):
    out = []
    for layer in layer_map.layers:
        for which in ("k", "v"):
            s, r = kv(2, 5, SHARER, seed=layer), kv(2, 5, receiver, seed=100 + layer)
            out.append(bank.project(layer, which, s, r))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_forward_is_bit_identical(case, tmp_path):
    kind, receiver, hparams = CASES[case]
    bank, layer_map = build(kind, receiver, hparams)
    path = tmp_path / f"{case}.safetensors"
    save_bundle(path, bank, layer_map)
    loaded = load_bundle(path)
    assert not loaded.bank.training
    for a, b in zip(forward_all(bank, layer_map, receiver), forward_all(loaded.bank, layer_map, receiver)):
        assert torch.equal(a, b)


def test_load_restores_kind_hparams_map_signatures_and_provenance(good):
    loaded = load_bundle(good)
    assert loaded.bank.kind == "c2c" and loaded.bank.hparams["hidden_dim"] == 6
    assert loaded.layer_map == LayerMap.build("terminal", 3, 4)
    assert loaded.sharer == SHARER and loaded.receiver == WIDE
    assert loaded.provenance == {"steps": 10} and loaded.metadata["format_version"] == 1


def test_metadata_is_json_under_the_c2c_bundle_key(good):
    meta = read_meta(good, "c2c_bundle")
    assert set(meta) == {"format_version", "projector", "sharer", "receiver", "layer_map", "provenance"}
    assert meta["projector"] == {"kind": "c2c", "hparams": {"hidden_dim": 6, "num_layers": 2, "gate_init": 1.0, "eps": 1e-6}}


def test_tensor_names_are_the_bank_state_dict(good):
    assert set(load_file(good)) == set(build()[0].state_dict())


def test_load_keeps_stored_dtype_or_casts_on_request(tmp_path):
    bank, layer_map = build()
    path = tmp_path / "half.safetensors"
    save_bundle(path, bank.to(torch.bfloat16), layer_map)
    assert {p.dtype for p in load_bundle(path).bank.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_bundle(path, dtype=torch.float32).bank.parameters()} == {torch.float32}


def test_loaded_c2c_closed_gate_still_returns_the_receiver(tmp_path):
    bank, layer_map = build(hparams={"hidden_dim": 6, "gate_init": -1.0})
    path = tmp_path / "closed.safetensors"
    save_bundle(path, bank, layer_map)
    r = kv(1, 3, WIDE, seed=1)
    assert load_bundle(path).bank.project(3, "k", kv(1, 3, SHARER), r) is r


def test_save_tensors_with_meta_accepts_views_of_one_tensor(tmp_path):
    whole = torch.arange(12.0).view(2, 6)
    path = tmp_path / "views.safetensors"
    save_tensors_with_meta(path, {"a": whole[0], "b": whole[1], "all": whole}, {}, "c2c_kv")
    loaded = load_file(path)
    assert torch.equal(loaded["b"], whole[1]) and torch.equal(loaded["all"], whole)


def test_save_tensors_with_meta_roundtrips_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "rec" / "kv.safetensors"
    save_tensors_with_meta(path, {"k.0": torch.arange(6.0).view(2, 3).t()}, {"grid": [1, 2, 3]}, "c2c_kv")
    assert read_meta(path, "c2c_kv") == {"grid": [1, 2, 3]}
    assert torch.equal(load_file(path)["k.0"], torch.arange(6.0).view(2, 3).t())
    assert [p.name for p in path.parent.iterdir()] == ["kv.safetensors"]


# -- refusing files ------------------------------------------------------------------------------


def rewrite(src, dst, meta_edit=None, tensors_edit=None, raw_meta=None):
    """Copy a good bundle to dst with edited metadata and/or tensors (written with plain safetensors)."""
    tensors = load_file(src)
    meta = read_meta(src, "c2c_bundle")
    if meta_edit:
        meta_edit(meta)
    if tensors_edit:
        tensors_edit(tensors)
    save_file(tensors, dst, metadata={"c2c_bundle": raw_meta if raw_meta is not None else json.dumps(meta)})
    return dst


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin"])
def test_pickle_suffixes_are_refused(tmp_path, suffix):
    path = tmp_path / f"bank{suffix}"
    path.write_bytes(b"anything")
    with pytest.raises(UnsafeFormatError, match="refused: pickle files can run code.*convert to .safetensors"):
        load_bundle(path)


def test_pickle_bytes_are_refused_whatever_the_name(tmp_path):
    path = tmp_path / "sneaky.safetensors"
    path.write_bytes(pickle.dumps({"weights": [1, 2]}))
    with pytest.raises(UnsafeFormatError, match="starts with pickle bytes"):
        load_bundle(path)


def test_torch_zip_checkpoints_are_refused(tmp_path):
    path = tmp_path / "zip.safetensors"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(UnsafeFormatError, match="zip archive"):
        load_bundle(path)


def test_garbage_is_not_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(NotSafetensorsError, match="not a readable safetensors file"):
        load_bundle(path)


def test_truncated_file_is_not_safetensors(good, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good.read_bytes()[:200])
    with pytest.raises(NotSafetensorsError):
        load_bundle(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(BundleNotFoundError, match="no such file") as info:
        load_bundle(tmp_path / "nope.safetensors")
    assert isinstance(info.value, FileNotFoundError)


def test_safetensors_without_bundle_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={"format": "pt"})
    with pytest.raises(MissingMetadataError, match=r"no 'c2c_bundle' entry \(found keys: \['format'\]\)"):
        load_bundle(path)


def test_bad_json_metadata_is_refused(good, tmp_path):
    with pytest.raises(InvalidMetadataError, match="not valid JSON"):
        load_bundle(rewrite(good, tmp_path / "x.safetensors", raw_meta="{oops"))


def test_newer_format_version_asks_to_update(good, tmp_path):
    path = rewrite(good, tmp_path / "x.safetensors", meta_edit=lambda m: m.update(format_version=3))
    with pytest.raises(FormatVersionError, match="format version 3 is newer.*update DiT Cache Bridge"):
        load_bundle(path)


def test_unknown_projector_kind_is_both_a_bundle_and_a_projector_error(good, tmp_path):
    path = rewrite(good, tmp_path / "x.safetensors", meta_edit=lambda m: m["projector"].update(kind="mlp9"))
    with pytest.raises(UnknownProjectorError, match="'mlp9' is unknown.*known: auto, c2c") as info:
        load_bundle(path)
    assert isinstance(info.value, BundleError)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("layer_map"), "lacks 'layer_map'"),
        (lambda m: m["sharer"].pop("head_dim"), r"missing \['head_dim'\]"),
        (lambda m: m["projector"]["hparams"].update(hidden_dim=0), "projector settings are invalid.*hidden_dim=0"),
        (lambda m: m["layer_map"].update(receiver_layers=9), "layer map was built for 9 receiver"),
        (lambda m: m.update(format_version="1"), "format_version' is '1'; expected an integer"),
    ],
)
def test_inconsistent_metadata_is_refused(good, tmp_path, edit, message):
    with pytest.raises(InvalidMetadataError, match=message):
        load_bundle(rewrite(good, tmp_path / "x.safetensors", meta_edit=edit))


def test_missing_tensor_is_named(good, tmp_path):
    path = rewrite(good, tmp_path / "x.safetensors", tensors_edit=lambda t: t.pop("v.3.proj.weight"))
    with pytest.raises(MissingTensorError, match=r"missing tensors \['v.3.proj.weight'\]"):
        load_bundle(path)


def test_unexpected_tensor_is_named(good, tmp_path):
    path = rewrite(good, tmp_path / "x.safetensors", tensors_edit=lambda t: t.update({"k.0.extra": torch.zeros(1)}))
    with pytest.raises(UnexpectedTensorError, match=r"unexpected tensors \['k.0.extra'\]"):
        load_bundle(path)


def test_wrong_shape_is_named_with_expected_shape(good, tmp_path):
    path = rewrite(good, tmp_path / "x.safetensors", tensors_edit=lambda t: t.update({"k.1.proj.weight": torch.zeros(12, 5)}))
    with pytest.raises(ShapeMismatchError, match=r"'k.1.proj.weight' has shape \[12, 5\]; expected \[12, 6\]"):
        load_bundle(path)


def test_integer_tensor_is_refused(good, tmp_path):
    path = rewrite(good, tmp_path / "x.safetensors", tensors_edit=lambda t: t.update({"k.1.gate_logit": torch.tensor(1)}))
    with pytest.raises(ShapeMismatchError, match="'k.1.gate_logit' has dtype I64; expected a float type"):
        load_bundle(path)


def test_validation_happens_before_any_tensor_is_read(good, tmp_path, monkeypatch):
    path = rewrite(good, tmp_path / "x.safetensors", tensors_edit=lambda t: t.update({"k.1.proj.weight": torch.zeros(12, 5)}))
    reads = []
    real_read = tensorfile.Snapshot.read

    def spy(self, names, *args, **kwargs):
        reads.extend(names)
        return real_read(self, names, *args, **kwargs)

    monkeypatch.setattr(tensorfile.Snapshot, "read", spy)
    with pytest.raises(ShapeMismatchError):
        load_bundle(path)
    assert reads == []
    load_bundle(good)
    assert reads  # the spy does see reads of a valid file


# -- refusing to write ---------------------------------------------------------------------------


def test_save_refuses_other_suffixes(tmp_path):
    bank, layer_map = build()
    with pytest.raises(BundleError, match="expected a '.safetensors' file name"):
        save_bundle(tmp_path / "bank.pt", bank, layer_map)


def test_save_refuses_a_map_that_does_not_match_the_bank(tmp_path):
    bank, _ = build()
    other = LayerMap.build("position", SHARER.num_layers, WIDE.num_layers)
    with pytest.raises(BundleError, match=r"bank covers receiver layers \[1, 2, 3\] but the layer map fuses \[0, 1, 2, 3\]"):
        save_bundle(tmp_path / "b.safetensors", bank, other)


def test_save_refuses_provenance_that_is_not_json(tmp_path):
    bank, layer_map = build()
    with pytest.raises(BundleError, match="not JSON-serialisable"):
        save_bundle(tmp_path / "b.safetensors", bank, layer_map, {"when": object()})


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os
    import stat
    import torch
    from c2c_core import save_tensors_with_meta
    path = tmp_path / "x.safetensors"
    save_tensors_with_meta(path, {"t": torch.zeros(2)}, {"a": 1}, "meta")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


# -- architecture tags -----------------------------------------------------------------------------

from dataclasses import replace as _replace  # noqa: E402

from c2c_core.arch import ArchTag  # noqa: E402
from c2c_core.bundle import arch_mismatches, save_projector_bundle, with_backward  # noqa: E402


def tag(sig, in_channels=16, image_embedding=False):
    return ArchTag.from_config(dim=sig.width, ffn_dim=4 * sig.width, num_heads=sig.num_heads, num_layers=sig.num_layers,
                               in_channels=in_channels, out_channels=16, text_dim=32, image_embedding=image_embedding,
                               patch_size=(1, 2, 2), rope_axes=(4, 2, 2))


T_SHARER = _replace(SHARER, arch=tag(SHARER))
T_WIDE = _replace(WIDE, arch=tag(WIDE))


def tagged_bank(kind="c2c", sharer=T_SHARER, receiver=T_WIDE, hparams=None, seed=0):
    torch.manual_seed(seed)
    layer_map = LayerMap.build("terminal", sharer.num_layers, receiver.num_layers)
    bank = ProjectorBank.build(kind, sharer, receiver, layer_map.layers, **(hparams or {"hidden_dim": 6}))
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return bank.eval(), layer_map


def test_the_tag_is_saved_with_each_side_and_restored(tmp_path):
    bank, layer_map = tagged_bank()
    save_bundle(tmp_path / "t.safetensors", bank, layer_map)
    meta = read_meta(tmp_path / "t.safetensors", "c2c_bundle")
    assert meta["sharer"]["arch"] == tag(SHARER).to_dict() and meta["sharer"]["arch"]["family"] == "wan2.1"
    loaded = load_bundle(tmp_path / "t.safetensors")
    assert loaded.tagged and loaded.sharer.arch == tag(SHARER) and loaded.receiver.arch == tag(WIDE)
    assert arch_mismatches(loaded, T_SHARER, T_WIDE) == []


def test_a_bundle_for_another_architecture_of_the_same_shapes_is_named():
    bank, layer_map = tagged_bank()
    bundle = load_bundle_like(bank, layer_map)
    i2v = _replace(SHARER, arch=tag(SHARER, in_channels=36, image_embedding=True))
    (bad,) = arch_mismatches(bundle, i2v, T_WIDE)
    assert bad.role == "sharer" and bad.differences == ("variant t2v vs i2v", "in_channels 16 vs 36",
                                                       "image_embedding no vs yes")
    assert bad.describe() == ("a projector made for a sharer wan2.1 t2v (dim 8, 3 layers, 2 heads, ffn 32, in 16), but "
                              "the sharer model is wan2.1 i2v (dim 8, 3 layers, 2 heads, ffn 32, in 36, CLIP image "
                              "input), which differs in variant t2v vs i2v, in_channels 16 vs 36, image_embedding no vs yes")


def load_bundle_like(bank, layer_map):
    from c2c_core import ProjectorBundle
    return ProjectorBundle(bank=bank, layer_map=layer_map, sharer=bank.sharer, receiver=bank.receiver)


def test_an_untagged_bundle_or_model_is_judged_by_shapes_alone(good):
    old = load_bundle(good)
    assert not old.tagged and "arch" not in read_meta(good, "c2c_bundle")["sharer"]
    assert arch_mismatches(old, T_SHARER, T_WIDE) == []
    bank, layer_map = tagged_bank()
    assert arch_mismatches(load_bundle_like(bank, layer_map), SHARER, WIDE) == []


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["sharer"]["arch"].update(num_heads=3), "sharer's architecture tag .* contradicts its signature"),
    (lambda m: m["receiver"]["arch"].update(family=7), "architecture tag family is 7"),
    (lambda m: m["receiver"]["arch"].update(dim=2 ** 40), "architecture tag dim is"),
    (lambda m: m["receiver"]["arch"].pop("rope_axes"), r"architecture tag lacks \['rope_axes'\]"),
    (lambda m: m["sharer"]["arch"].update(patch_size=[1, 2]), "architecture tag patch_size"),
])
def test_a_damaged_tag_is_refused_before_any_tensor(tmp_path, edit, message):
    bank, layer_map = tagged_bank()
    save_bundle(tmp_path / "t.safetensors", bank, layer_map)
    path = rewrite(tmp_path / "t.safetensors", tmp_path / "x.safetensors", meta_edit=edit)
    with pytest.raises(InvalidMetadataError, match=message):
        load_bundle(path)


# -- both banks in one bundle ----------------------------------------------------------------------


def both_banks(tmp_path, back_kind="full", back_hparams=None):
    bank, layer_map = tagged_bank()
    back, back_map = tagged_bank(back_kind, T_WIDE, T_SHARER, back_hparams or {"hidden_dim": 5}, seed=1)
    path = tmp_path / "both.safetensors"
    save_bundle(path, bank, layer_map, {"trainer": "test"}, backward=(back, back_map))
    return path, (bank, layer_map), (back, back_map)


def test_both_banks_round_trip_bit_for_bit(tmp_path):
    path, (bank, layer_map), (back, back_map) = both_banks(tmp_path)
    meta = read_meta(path, "c2c_bundle")
    assert meta["format_version"] == 2 and set(meta["backward"]) == {"projector", "layer_map"}
    assert {n for n in load_file(path) if n.startswith("backward.")} == {f"backward.{n}" for n in back.state_dict()}
    loaded = load_bundle(path)
    assert loaded.backward.sharer.arch == tag(WIDE) and loaded.backward.receiver.arch == tag(SHARER)
    assert loaded.backward.layer_map == back_map and not loaded.backward.bank.training
    for a, b in zip(forward_all(bank, layer_map, WIDE), forward_all(loaded.bank, layer_map, WIDE)):
        assert torch.equal(a, b)
    for layer in back_map.layers:
        s, r = kv(2, 5, WIDE, seed=layer), kv(2, 5, SHARER, seed=50 + layer)
        for which in ("k", "v"):
            assert torch.equal(back.project(layer, which, s, r), loaded.backward.bank.project(layer, which, s, r))
    save_projector_bundle(tmp_path / "again.safetensors", loaded)
    assert load_file(tmp_path / "again.safetensors").keys() == load_file(path).keys()


def test_a_bundle_without_a_backward_bank_stays_format_1(good):
    assert read_meta(good, "c2c_bundle")["format_version"] == 1 and load_bundle(good).backward is None


def test_with_backward_and_save_refuse_a_bank_that_does_not_map_back(tmp_path):
    bank, layer_map = tagged_bank()
    same_way, same_map = tagged_bank(seed=1)
    with pytest.raises(BundleError, match=r"backward bank maps wan2.1 t2v 3×2×4 -> wan2.1 t2v 4×3×4; expected the "
                                          r"forward bank's receiver -> its sharer \(wan2.1 t2v 4×3×4 -> wan2.1 t2v 3×2×4\)"):
        save_bundle(tmp_path / "b.safetensors", bank, layer_map, backward=(same_way, same_map))
    other_arch = _replace(SHARER, arch=tag(SHARER, in_channels=36))
    back, back_map = tagged_bank("full", T_WIDE, other_arch, {"hidden_dim": 5})
    with pytest.raises(BundleError, match="Build the backward bank with the two models swapped"):
        with_backward(load_bundle_like(bank, layer_map), load_bundle_like(back, back_map))
    good_back, good_map = tagged_bank("full", T_WIDE, T_SHARER, {"hidden_dim": 5})
    both = with_backward(load_bundle_like(bank, layer_map), load_bundle_like(good_back, good_map))
    assert both.backward.bank is good_back and both.bank is bank


@pytest.mark.parametrize("edit, error, message", [
    (lambda m, t: t.pop("backward.k.0.mlp.0.weight"), MissingTensorError, r"missing tensors \['backward.k.0.mlp.0.weight'\]"),
    (lambda m, t: t.update({"backward.k.9.proj.weight": torch.zeros(1)}), UnexpectedTensorError, "backward.k.9"),
    (lambda m, t: t.update({"backward.k.0.mlp.0.weight": torch.zeros(8, 3)}), ShapeMismatchError,
     r"tensor 'backward.k.0.mlp.0.weight' has shape \[8, 3\]; expected \[5, 12\]"),
    (lambda m, t: m["backward"]["projector"].update(kind="teleport"), UnknownProjectorError,
     "backward projector kind 'teleport' is unknown"),
    (lambda m, t: m["backward"]["projector"]["hparams"].update(hidden_dim=10 ** 9), InvalidMetadataError,
     "hidden_dim=1000000000; expected at most 65536"),
    (lambda m, t: m["backward"]["layer_map"].update(sharer_layers=3), InvalidMetadataError,
     "backward bundle metadata is inconsistent"),
    (lambda m, t: m.update(backward=[]), InvalidMetadataError, "bundle metadata 'backward' is"),
])
def test_the_backward_bank_is_validated_before_any_tensor_is_read(tmp_path, monkeypatch, edit, error, message):
    path, _, _ = both_banks(tmp_path)
    tensors = load_file(path)
    meta = read_meta(path, "c2c_bundle")
    edit(meta, tensors)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata={"c2c_bundle": json.dumps(meta)})
    reads = []
    real_read = tensorfile.Snapshot.read
    monkeypatch.setattr(tensorfile.Snapshot, "read", lambda self, names, *a, **k: reads.extend(names) or
                        real_read(self, names, *a, **k))
    with pytest.raises(error, match=message):
        load_bundle(bad)
    assert reads == []


def test_a_backward_layer_count_beyond_the_limit_builds_nothing(tmp_path):
    path, _, _ = both_banks(tmp_path, back_kind="c2c", back_hparams={"hidden_dim": 5, "num_layers": 2})
    meta = read_meta(path, "c2c_bundle")
    meta["backward"]["projector"]["hparams"]["num_layers"] = 100_000
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(path), bad, metadata={"c2c_bundle": json.dumps(meta)})
    with pytest.raises(InvalidMetadataError, match="num_layers=100000; expected at most 64"):
        load_bundle(bad)


def test_the_tag_read_from_a_comfyui_checkpoint_header_under_a_prefix():
    from c2c_core.arch import arch_from_weights
    from c2c_core.errors import SignatureError
    p = "model.diffusion_model."
    shapes = {f"{p}patch_embedding.weight": (5120, 36, 1, 2, 2), f"{p}blocks.0.ffn.0.weight": (13824, 5120),
              f"{p}text_embedding.0.weight": (5120, 4096), f"{p}head.head.weight": (64, 5120),
              f"{p}img_emb.proj.1.weight": (1280, 1280), **{f"{p}blocks.{i}.norm3.weight": (5120,) for i in range(40)}}
    arch = arch_from_weights(shapes, 40)
    assert arch.describe() == "wan2.1 i2v (dim 5120, 40 layers, 40 heads, ffn 13824, in 36, CLIP image input)"
    assert (arch.rope_axes, arch.out_channels, arch.text_dim) == ((44, 42, 42), 16, 4096)
    with pytest.raises(SignatureError, match="expected one patch_embedding.weight"):
        arch_from_weights({"x.weight": (1,)}, 40)
    with pytest.raises(SignatureError, match="neither in the original/ComfyUI Wan key layout nor in diffusers'"):
        arch_from_weights({"patch_embedding.weight": (5120, 16, 1, 2, 2)}, 40)


def test_a_signature_carries_its_tag_without_changing_equality():
    from c2c_core import ModelSignature
    from c2c_core.errors import SignatureError
    assert T_SHARER == SHARER and hash(T_SHARER) == hash(SHARER)        # the tag is compared where it matters
    assert "arch" not in SHARER.to_dict() and ModelSignature.from_dict(T_SHARER.to_dict()).arch == tag(SHARER)
    with pytest.raises(SignatureError, match="ModelSignature.arch is dict; expected an ArchTag, a TextEncoderArch or None"):
        ModelSignature(3, 2, 4, arch=tag(SHARER).to_dict())


def test_tag_bank_gives_an_untagged_bank_its_models_tags():
    from c2c_core.bundle import tag_bank
    bank, layer_map = build()
    assert bank.sharer.arch is None
    assert tag_bank(bank, T_SHARER, T_WIDE) is bank and bank.sharer.arch == tag(SHARER) and bank.receiver.arch == tag(WIDE)
    with pytest.raises(BundleError, match=r"tag_bank: the bank maps wan2.1 t2v 3×2×4 -> wan2.1 t2v 4×3×4; the models "
                                          r"are wan2.1 t2v 4×3×4 -> wan2.1 t2v 3×2×4"):
        tag_bank(bank, T_WIDE, T_SHARER)
