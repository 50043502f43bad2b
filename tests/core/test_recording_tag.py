"""A saved recording keeps its sharer's architecture tag, so a recording loaded from a file is held to a
projector's tag as a freshly recorded one is; a tag that contradicts the signature is refused."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from c2c_core import RopeSpec, TokenGrid
from c2c_core.arch import ArchTag
from c2c_core.errors import InvalidMetadataError
from c2c_core.signature import ModelSignature
from c2c_core.recording import KVRecording, RamStore, load_recording, save_recording

TAG = ArchTag.from_config(dim=16, ffn_dim=64, num_heads=2, num_layers=4, in_channels=16, out_channels=16,
                          text_dim=32, image_embedding=False, patch_size=(1, 2, 2), rope_axes=(4, 2, 2))
GRID = TokenGrid(1, 2, 3)


def saved(tmp_path, signature):
    rec = KVRecording(signature=signature, grid=GRID, rope=RopeSpec(), sigmas=[1.0, 0.5, 0.0], layers=(0, 3),
                      kinds=(0,), storage_dtype="fp32", store=RamStore())
    for slot in range(2):
        for layer in (0, 3):
            rec.put(slot, 0, layer, torch.randn(1, GRID.numel, 16), torch.randn(1, GRID.numel, 16))
    rec.finish()
    path = tmp_path / "rec.safetensors"
    save_recording(path, rec)
    return path


def test_the_tag_survives_save_and_load(tmp_path):
    loaded = load_recording(saved(tmp_path, ModelSignature(4, 2, 8, "sharer", arch=TAG)))
    assert loaded.signature.arch == TAG


def test_an_untagged_recording_loads_untagged(tmp_path):
    assert load_recording(saved(tmp_path, ModelSignature(4, 2, 8, "sharer"))).signature.arch is None


def rewrite_tag(path, tag_dict):
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in meta if meta[k].startswith("{"))
    body = json.loads(meta[key])
    body["signature"]["arch"] = tag_dict
    meta[key] = json.dumps(body)
    save_file(tensors, str(path), metadata=meta)


def test_a_tag_contradicting_the_signature_is_refused(tmp_path):
    path = saved(tmp_path, ModelSignature(4, 2, 8, "sharer", arch=TAG))
    rewrite_tag(path, dataclasses.replace(TAG, num_layers=40).to_dict())
    with pytest.raises(InvalidMetadataError, match=r"recording metadata signature\.arch is .*expected a tag matching "
                                                   r"the signature \(4 layers, 2 heads × 8\)"):
        load_recording(path)


def test_a_malformed_tag_is_refused(tmp_path):
    path = saved(tmp_path, ModelSignature(4, 2, 8, "sharer", arch=TAG))
    rewrite_tag(path, {"family": "wan2.1"})
    with pytest.raises(InvalidMetadataError, match=r"signature\.arch is .*expected a valid architecture tag "
                                                   r"\(architecture tag lacks"):
        load_recording(path)
