"""Architecture tags of text encoders (c2c_core.arch.TextEncoderArch): GQA signatures, the bundle round trip,
and a Wan bundle refused for a text-encoder pair (and the reverse) by kind."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from c2c_core import (QWEN3_VL_MROPE, QWEN25_VL_MROPE, InvalidMetadataError, LayerMap, ModelSignature, ProjectorBank,
                      SignatureError, TextEncoderArch, load_bundle, read_meta, save_bundle, text_encoder_signature)
from c2c_core.arch import ArchTag, arch_from_dict
from c2c_core.bundle import ProjectorBundle, arch_mismatches

# as ComfyUI's configs give them (comfy/text_encoders/llama.py: Qwen25_7BVLI_Config, Qwen3VL_8BConfig, Qwen3VL_4BConfig)
QWEN25_VL_7B = TextEncoderArch.from_config("qwen2.5-vl", "7b", hidden_size=3584, intermediate_size=18944, num_layers=28,
                                           num_heads=28, num_kv_heads=4, head_dim=128, vocab_size=152064,
                                           rope_theta=1_000_000, vision_patch=14)
QWEN3_VL_8B = TextEncoderArch.from_config("qwen3-vl", "8b", hidden_size=4096, intermediate_size=12288, num_layers=36,
                                          num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=151936,
                                          rope_theta=5_000_000, vision_patch=16)
QWEN3_VL_4B = TextEncoderArch.from_config("qwen3-vl", "4b", hidden_size=2560, intermediate_size=9728, num_layers=36,
                                          num_heads=32, num_kv_heads=8, head_dim=128, vocab_size=151936,
                                          rope_theta=5_000_000, vision_patch=16)
WAN = ArchTag.from_config(dim=16, ffn_dim=64, num_heads=2, num_layers=2, in_channels=16, out_channels=16, text_dim=32,
                          image_embedding=False, patch_size=(1, 2, 2), rope_axes=(4, 2, 2))


def test_signatures_of_gqa_models_count_kv_heads():
    assert text_encoder_signature(QWEN25_VL_7B).to_dict() | {"arch": None} == \
        {"num_layers": 28, "num_heads": 4, "head_dim": 128, "name": "", "arch": None}
    assert (text_encoder_signature(QWEN3_VL_8B).num_heads, text_encoder_signature(QWEN3_VL_8B).width) == (8, 1024)
    assert text_encoder_signature(QWEN3_VL_4B).same_shape(text_encoder_signature(QWEN3_VL_8B))
    assert QWEN3_VL_4B.differences(QWEN3_VL_8B) == ["variant 4b vs 8b", "hidden_size 2560 vs 4096",
                                                    "intermediate_size 9728 vs 12288"]


def test_the_tag_knows_its_families_m_rope():
    assert QWEN25_VL_7B.mrope() == QWEN25_VL_MROPE
    assert QWEN3_VL_8B.mrope() == QWEN3_VL_MROPE
    with pytest.raises(SignatureError, match=r"family 'qwen9' is unknown; expected one of \['qwen2.5-vl', 'qwen3-vl'\]"):
        TextEncoderArch.from_config("qwen9", "1b", hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                                    num_kv_heads=1, head_dim=128, vocab_size=8, rope_theta=10000, vision_patch=14)


def test_the_tag_survives_json_and_is_told_apart_from_a_wan_tag():
    d = json.loads(json.dumps(QWEN3_VL_8B.to_dict()))
    assert d["kind"] == "text-encoder" and arch_from_dict(d) == QWEN3_VL_8B
    assert arch_from_dict(WAN.to_dict()) == WAN and "kind" not in WAN.to_dict()      # Wan tags as before
    with pytest.raises(SignatureError, match="architecture tag kind 'audio' is unknown"):
        arch_from_dict({**d, "kind": "audio"})
    with pytest.raises(SignatureError, match=r"lacks \['vision_patch'\]"):
        arch_from_dict({k: v for k, v in d.items() if k != "vision_patch"})
    with pytest.raises(SignatureError, match="query heads a multiple of K/V heads"):
        arch_from_dict({**d, "num_kv_heads": 5})


def bundle_of(sharer: ModelSignature, receiver: ModelSignature) -> tuple[ProjectorBank, LayerMap]:
    layer_map = LayerMap.build("terminal", sharer.num_layers, receiver.num_layers)
    return ProjectorBank.build("identity", sharer, receiver, layer_map.layers).eval(), layer_map


# tiny shapes, real tags: a 2-layer Qwen pair of 2 K/V heads × 128
TINY25 = TextEncoderArch.from_config("qwen2.5-vl", "tiny", hidden_size=64, intermediate_size=128, num_layers=2,
                                     num_heads=4, num_kv_heads=2, head_dim=128, vocab_size=151936,
                                     rope_theta=1_000_000, vision_patch=14)
TINY3 = TextEncoderArch.from_config("qwen3-vl", "tiny", hidden_size=64, intermediate_size=128, num_layers=2,
                                    num_heads=4, num_kv_heads=2, head_dim=128, vocab_size=151936,
                                    rope_theta=5_000_000, vision_patch=16)


def test_a_text_encoder_bundle_round_trips_with_its_tags(tmp_path):
    sharer, receiver = text_encoder_signature(TINY3), text_encoder_signature(TINY25)
    bank, layer_map = bundle_of(sharer, receiver)
    save_bundle(tmp_path / "qwen.safetensors", bank, layer_map)
    loaded = load_bundle(tmp_path / "qwen.safetensors")
    assert loaded.sharer.arch == TINY3 and loaded.receiver.arch == TINY25
    assert arch_mismatches(loaded, sharer, receiver) == []


def test_a_wan_bundle_is_refused_for_a_qwen_pair_of_the_same_shapes_and_the_reverse():
    wan_sig = ModelSignature(2, 2, 128, arch=ArchTag.from_config(
        dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_channels=16, out_channels=16, text_dim=64,
        image_embedding=False, patch_size=(1, 2, 2), rope_axes=(44, 42, 42)))
    qwen3, qwen25 = text_encoder_signature(TINY3), text_encoder_signature(TINY25)
    assert wan_sig.same_shape(qwen3)                                     # shapes alone would let it through
    wan_bundle = ProjectorBundle(*bundle_of(wan_sig, wan_sig), sharer=wan_sig, receiver=wan_sig)
    found = arch_mismatches(wan_bundle, qwen3, qwen25)
    assert [m.role for m in found] == ["sharer", "receiver"]
    assert found[0].describe() == (
        "a projector made for a sharer wan2.1 t2v (dim 256, 2 layers, 2 heads, ffn 512, in 16), but the sharer model "
        "is qwen3-vl tiny text encoder (hidden 64, 2 layers, 4 heads / 2 K/V heads), which differs in kind: a Wan DiT "
        "vs a text encoder (a projector for one kind of model cannot fuse another)")
    qwen_bundle = ProjectorBundle(*bundle_of(qwen3, qwen25), sharer=qwen3, receiver=qwen25)
    back = arch_mismatches(qwen_bundle, wan_sig, wan_sig)
    assert [m.differences for m in back] == [("kind: a text encoder vs a Wan DiT (a projector for one kind of model "
                                              "cannot fuse another)",)] * 2
    swapped = arch_mismatches(qwen_bundle, qwen25, qwen3)                # a pair the other way round
    assert [m.role for m in swapped] == ["sharer", "receiver"] and "family qwen3-vl vs qwen2.5-vl" in swapped[0].differences


def test_a_text_tag_contradicting_its_signature_is_refused(tmp_path):
    bank, layer_map = bundle_of(text_encoder_signature(TINY3), text_encoder_signature(TINY25))
    path = tmp_path / "qwen.safetensors"
    save_bundle(path, bank, layer_map)
    meta = read_meta(path, "c2c_bundle")
    meta["receiver"]["arch"].update(num_kv_heads=4)                      # the signature still says 2 K/V heads
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(path), bad, metadata={"c2c_bundle": json.dumps(meta)})
    with pytest.raises(InvalidMetadataError, match=r"receiver's architecture tag \(2 layers, 4 K/V heads, K/V width "
                                                   r"512\) contradicts its signature \(2 layers, 2 heads × 128\)"):
        load_bundle(bad)
