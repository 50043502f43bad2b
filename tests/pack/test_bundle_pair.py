"""Projector bundles in the real ComfyUI host: the architecture tag and the backward bank.

A bundle names the architecture of both models (c2c_core.arch), so a projector for one pair is refused
for another pair of the same shapes; a bundle may carry a backward (receiver -> sharer) bank, which Fuse
Caches / Bridged KSampler use for direction 'bidirectional' when no backward_projector is connected.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridge_helpers import empty_latent, ksample, load_model, pack_nodes

pytestmark = pytest.mark.usefixtures("comfy")


@pytest.fixture(scope="module")
def models(tiny_models):
    import host
    return {"a": load_model(tiny_models.path(host.T2V_A)), "a_again": load_model(tiny_models.path(host.T2V_A)),
            "b": load_model(tiny_models.path(host.T2V_B)), "i2v": load_model(tiny_models.path(host.I2V))}


@pytest.fixture(autouse=True)
def pack():
    return pack_nodes()          # makes dit_cache_bridge importable


@pytest.fixture(scope="module")
def conds():
    from comfy_test_nodes import wan_conditioning
    return {"pos": wan_conditioning(1), "neg": wan_conditioning(2, length=5),
            "sharer_pos": wan_conditioning(3), "sharer_neg": wan_conditioning(4, length=5)}


def create(sharer, receiver, kind="weighted"):
    return pack_nodes().CreateC2CProjector.execute(sharer, receiver, kind, "identity", "all", alpha=0.5,
                                                   hidden_dim=0, seed=0).args[0]


def capture(sharer, conds):
    return pack_nodes().CaptureKVCache.execute(sharer=sharer, positive=conds["sharer_pos"],
                                               negative=conds["sharer_neg"]).args[0]


def fuse(receiver, source, projector, strength=1.0, **extra):
    return pack_nodes().FuseCaches.execute(receiver, source, projector, strength, 0.0, 1.0, "constant", "",
                                           **extra).args[0]


def projector_folder() -> Path:
    import folder_paths
    pack_nodes()
    folder = Path(folder_paths.get_folder_paths("c2c_projectors")[0])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_both(name, forward, backward) -> str:
    """Save forward + backward as one file in models/c2c_projectors and load it with Load C2C Projector."""
    from c2c_core.bundle import save_projector_bundle, with_backward
    save_projector_bundle(projector_folder() / name, with_backward(forward, backward))
    return name


def load(name):
    return pack_nodes().LoadC2CProjector.execute(name).args[0]


# -- the architecture tag --------------------------------------------------------------------------


def test_comfyui_tags_the_tiny_models_by_architecture(models):
    from dit_cache_bridge.c2c_comfy import compat
    a, i2v = compat.wan_signature(models["a"]).arch, compat.wan_signature(models["i2v"]).arch
    assert (a.family, a.variant, a.in_channels, a.image_embedding) == ("wan2.1", "t2v", 16, False)
    assert (i2v.family, i2v.variant, i2v.in_channels, i2v.image_embedding) == ("wan2.1", "i2v", 36, True)
    assert (a.dim, a.num_heads, a.num_layers, a.ffn_dim, a.patch_size) == (256, 2, 2, 512, (1, 2, 2))
    assert compat.wan_signature(models["b"]).arch == a        # another Wan2.1-T2V of that size: one architecture


def test_a_saved_and_loaded_bundle_keeps_the_tags(models):
    from c2c_core import save_bundle
    forward = create(models["b"], models["a"])
    save_bundle(projector_folder() / "tagged_pair.safetensors", forward.bank, forward.layer_map)
    loaded = load("tagged_pair.safetensors")
    assert loaded.tagged and loaded.sharer.arch == forward.sharer.arch and loaded.receiver.arch == forward.receiver.arch


def test_create_c2c_projectors_hidden_width_is_the_scaled_default_or_the_widget_and_a_bundle_keeps_its_own(models):
    """hidden_dim 0: the c2c default for the receiver (tiny models: K/V width 256 -> the floor, 64); a widget value
    wins; a bundle saved at the earlier fixed 512 (every older c2c bundle) loads through Load C2C Projector at 512."""
    from c2c_core import save_bundle
    b, a = models["b"], models["a"]

    def c2c(hidden):
        return pack_nodes().CreateC2CProjector.execute(b, a, "c2c", "identity", "all", alpha=0.5, hidden_dim=hidden,
                                                       seed=0).args[0]
    assert c2c(0).bank.hparams["hidden_dim"] == 64 and c2c(0).receiver.width == 256
    assert c2c(24).bank.projector(0, "k").in_sharer.out_features == 24
    old = c2c(512)
    save_bundle(projector_folder() / "c2c_hidden_512.safetensors", old.bank, old.layer_map)
    loaded = load("c2c_hidden_512.safetensors")
    assert loaded.bank.hparams == old.bank.hparams and loaded.bank.hparams["hidden_dim"] == 512
    state, want = loaded.bank.state_dict(), old.bank.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)


MISMATCH = ("a projector made for a sharer wan2.1 t2v (dim 256, 2 layers, 2 heads, ffn 512, in 16), but the sharer "
            "model is wan2.1 i2v (dim 256, 2 layers, 2 heads, ffn 512, in 36, CLIP image input), which differs in "
            "variant t2v vs i2v, in_channels 16 vs 36, image_embedding no vs yes; expected a projector made for this "
            "sharer's architecture (same shapes are not enough: it learned another network's keys and values). "
            "Fix: load the projector trained for this pair of models, or train one for it with Train C2C Projector "
            "(Create C2C Projector makes a training-free one)")


def test_fuse_caches_refuses_a_projector_for_another_pair_of_the_same_shapes(models, conds):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    t2v_pair = create(models["b"], models["a"])
    with pytest.raises(BridgeInputError) as err:
        fuse(models["a"], capture(models["i2v"], conds), t2v_pair)
    assert str(err.value) == f"Fuse Caches › projector: {MISMATCH}"


def test_bridged_ksampler_refuses_it_too(models, conds):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    with pytest.raises(BridgeInputError) as err:
        pack_nodes().BridgedKSampler.execute(models["a"], conds["pos"], conds["neg"], models["i2v"], conds["sharer_pos"],
                                             conds["sharer_neg"], create(models["b"], models["a"]), 1.0, 0.0, 1.0,
                                             seed=7, steps=2, cfg=4.0, sampler_name="euler", scheduler="simple",
                                             latent_image=empty_latent())
    assert str(err.value) == f"Bridged KSampler › projector: {MISMATCH}"


def untag(name, new_name):
    """An older bundle: the same file without the architecture tags."""
    folder = projector_folder()
    from c2c_core import read_meta
    meta = read_meta(folder / name, "c2c_bundle")
    for role in ("sharer", "receiver"):
        del meta[role]["arch"]
    (folder / new_name).unlink(missing_ok=True)
    save_file(load_file(folder / name), folder / new_name, metadata={"c2c_bundle": json.dumps(meta)})
    return new_name


def test_an_untagged_older_bundle_loads_with_one_warning_and_fuses(models, conds, caplog):
    twin = create(models["a_again"], models["a"], "identity")
    from c2c_core import save_bundle
    save_bundle(projector_folder() / "twin_tagged.safetensors", twin.bank, twin.layer_map)
    with caplog.at_level(logging.WARNING, logger="dit_cache_bridge"):
        old = load(untag("twin_tagged.safetensors", "twin_untagged.safetensors"))
        fused = fuse(models["a"], capture(models["a_again"], {**conds, "sharer_pos": conds["pos"],
                                                             "sharer_neg": conds["neg"]}), old)
    warnings = [r.getMessage() for r in caplog.records if "architectures" in r.getMessage()]
    assert len(warnings) == 1 and "twin_untagged.safetensors" in warnings[0] and "accepted" in warnings[0]
    assert not old.tagged
    assert torch.equal(ksample(fused, conds["pos"], conds["neg"]), ksample(models["a"], conds["pos"], conds["neg"]))
    with caplog.at_level(logging.WARNING, logger="dit_cache_bridge"):
        load("twin_tagged.safetensors")
    assert len([r for r in caplog.records if "architectures" in r.getMessage()]) == 1   # none for a tagged one


# -- both banks in one bundle ----------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_identity_twins_bidirectional_with_a_both_bank_bundle_are_stock(models, conds, cfg):
    a, twin = models["a"], models["a_again"]
    both = load(save_both("twins_both.safetensors", create(twin, a, "identity"), create(a, twin, "identity")))
    assert both.backward is not None and both.backward.bank.kind == "identity"
    src = capture(twin, {**conds, "sharer_pos": conds["pos"], "sharer_neg": conds["neg"]})
    fused = fuse(a, src, both, direction="bidirectional")
    assert torch.equal(ksample(fused, conds["pos"], conds["neg"], cfg=cfg),
                       ksample(a, conds["pos"], conds["neg"], cfg=cfg))


def test_strength_zero_both_ways_with_a_both_bank_bundle_is_stock(models, conds):
    a, b = models["a"], models["b"]
    both = load(save_both("pair_both.safetensors", create(b, a), create(a, b)))
    fused = fuse(a, capture(b, conds), both, strength=0.0, direction="bidirectional", backward_strength=0.0)
    assert torch.equal(ksample(fused, conds["pos"], conds["neg"]), ksample(a, conds["pos"], conds["neg"]))


def test_the_bundles_backward_bank_equals_the_same_bank_connected_and_a_connected_one_wins(models, conds):
    a, b = models["a"], models["b"]
    both = load(save_both("pair_both_c2c.safetensors", create(b, a), create(a, b, "c2c")))
    from_bundle = ksample(fuse(a, capture(b, conds), both, direction="bidirectional"), conds["pos"], conds["neg"])
    one_way = ksample(fuse(a, capture(b, conds), both), conds["pos"], conds["neg"])
    wired = ksample(fuse(a, capture(b, conds), create(b, a), direction="bidirectional",
                         backward_projector=both.backward), conds["pos"], conds["neg"])
    other = ksample(fuse(a, capture(b, conds), both, direction="bidirectional", backward_projector=create(a, b)),
                    conds["pos"], conds["neg"])
    bank_free = ksample(fuse(a, capture(b, conds), create(b, a), direction="bidirectional",
                             backward_projector=create(a, b)), conds["pos"], conds["neg"])
    assert torch.equal(from_bundle, wired) and not torch.equal(from_bundle, one_way)
    assert torch.equal(other, bank_free) and not torch.equal(other, from_bundle)


def test_bridged_ksampler_uses_the_bundles_backward_bank(models, conds):
    a, b = models["a"], models["b"]
    both = load("pair_both_c2c.safetensors") if (projector_folder() / "pair_both_c2c.safetensors").is_file() \
        else load(save_both("pair_both_c2c.safetensors", create(b, a), create(a, b, "c2c")))
    node = pack_nodes().BridgedKSampler.execute(a, conds["pos"], conds["neg"], b, conds["sharer_pos"],
                                                conds["sharer_neg"], both, 1.0, 0.0, 1.0, seed=7, steps=4, cfg=4.0,
                                                sampler_name="euler", scheduler="simple", latent_image=empty_latent(),
                                                direction="bidirectional").args[0]["samples"]
    via_fuse = ksample(fuse(a, capture(b, conds), both, direction="bidirectional"), conds["pos"], conds["neg"])
    assert torch.equal(node, via_fuse)


def test_neither_a_backward_input_nor_bank_is_still_refused(models, conds):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    with pytest.raises(BridgeInputError, match=re.escape("Fuse Caches › backward_projector: nothing connected, and the "
                                                       "projector bundle holds no backward bank")) as e:
        fuse(models["a"], capture(models["b"], conds), create(models["b"], models["a"]), direction="bidirectional")
    assert "load a bundle holding both banks" in str(e.value)


def test_a_connected_backward_projector_for_another_architecture_is_refused(models, conds):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    with pytest.raises(BridgeInputError) as err:
        fuse(models["a"], capture(models["b"], conds), create(models["b"], models["a"]), direction="bidirectional",
             backward_projector=create(models["i2v"], models["b"]))
    assert str(err.value).startswith("Fuse Caches › backward_projector: a projector made for a sharer wan2.1 i2v")


def test_retag_projector_gives_an_old_bundle_the_tags_comfyui_reads(models, tiny_models, conds):
    import host
    retag = host._load_tool("retag_projector")
    folder = projector_folder()
    both = save_both("retag_src.safetensors", create(models["b"], models["a"]), create(models["a"], models["b"], "c2c"))
    meta_edit = untag(both, "retag_old.safetensors")
    from c2c_core import read_meta
    meta = read_meta(folder / meta_edit, "c2c_bundle")
    assert "arch" not in meta["sharer"] and "backward" in meta
    out = folder / "retag_new.safetensors"
    out.unlink(missing_ok=True)
    assert retag.main([str(folder / meta_edit), "--sharer", str(tiny_models.path(host.T2V_B)),
                       "--receiver", str(tiny_models.path(host.T2V_A)), "--out", str(out)]) == 0
    new = load("retag_new.safetensors")
    from dit_cache_bridge.c2c_comfy import compat
    assert new.sharer.arch == compat.wan_signature(models["b"]).arch == new.backward.receiver.arch
    assert new.receiver.arch == compat.wan_signature(models["a"]).arch == new.backward.sharer.arch
    old = load("retag_old.safetensors")
    assert all(torch.equal(t, old.bank.state_dict()[k]) for k, t in new.bank.state_dict().items())
    with pytest.raises(SystemExit, match="exists; choose another --out"):
        retag.main([str(folder / meta_edit), "--sharer", str(tiny_models.path(host.T2V_B)),
                    "--receiver", str(tiny_models.path(host.T2V_A)), "--out", str(out)])
    with pytest.raises(SystemExit, match="a model of 3 layers, dim 512; the bundle's sharer has 2 layers, dim 256"):
        retag.main([str(folder / meta_edit), "--sharer", str(tiny_models.path(host.T2V_WIDE)),
                    "--receiver", str(tiny_models.path(host.T2V_A)), "--out", str(folder / "never.safetensors")])
