"""K/V descriptions: model signatures, token grids, head views."""

import pytest
import torch

from c2c_core import KVShapeError, ModelSignature, SignatureError, TokenGrid, from_heads, to_heads

SIG = ModelSignature(num_layers=4, num_heads=2, head_dim=8, name="tiny")
GRID = TokenGrid(frames=2, height=3, width=4)


def test_signature_width_is_heads_times_head_dim():
    assert ModelSignature(40, 40, 128).width == 5120


def test_signature_roundtrips_through_dict():
    assert ModelSignature.from_dict(SIG.to_dict()) == SIG


def test_signature_equality_includes_name_but_same_shape_does_not():
    other = ModelSignature(4, 2, 8, name="other")
    assert other != SIG and other.same_shape(SIG)
    assert not ModelSignature(5, 2, 8).same_shape(SIG)


def test_signature_rejects_non_positive_numbers():
    with pytest.raises(SignatureError, match="num_heads is 0"):
        ModelSignature(4, 0, 8)


def test_signature_from_dict_names_missing_keys():
    with pytest.raises(SignatureError, match=r"missing \['head_dim'\]"):
        ModelSignature.from_dict({"num_layers": 4, "num_heads": 2})


def test_grid_numel_and_dict_roundtrip():
    assert GRID.numel == 24
    assert TokenGrid.from_dict(GRID.to_dict()) == GRID


def test_to_heads_and_from_heads_are_views():
    flat = torch.randn(2, 5, 12)
    heads = to_heads(flat, 3)
    assert heads.shape == (2, 5, 3, 4) and heads.data_ptr() == flat.data_ptr()
    heads[0, 0, 0, 0] = 42.0
    assert flat[0, 0, 0] == 42.0
    back = from_heads(heads)
    assert back.shape == flat.shape and back.data_ptr() == flat.data_ptr()


def test_to_heads_rejects_width_not_divisible_by_heads():
    with pytest.raises(KVShapeError, match="not divisible by heads=5"):
        to_heads(torch.zeros(1, 2, 12), 5)


def test_from_heads_refuses_to_copy_non_contiguous_heads():
    with pytest.raises(KVShapeError, match=r"\.contiguous\(\)"):
        from_heads(torch.zeros(1, 2, 8, 3).transpose(2, 3))
