"""K/V containers: signatures, grids, layer K/V, caches, head views."""

import pytest
import torch

from c2c_core import KVCache, KVShapeError, LayerKV, MissingLayerError, ModelSignature, SignatureError, TokenGrid, from_heads, to_heads

SIG = ModelSignature(num_layers=4, num_heads=2, head_dim=8, name="tiny")
GRID = TokenGrid(frames=2, height=3, width=4)


def layer(tokens=GRID.numel, heads=2, dim=8, batch=1, dtype=torch.float32):
    return LayerKV(torch.randn(batch, tokens, heads, dim, dtype=dtype), torch.randn(batch, tokens, heads, dim, dtype=dtype))


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


def test_layer_kv_nbytes_counts_k_and_v():
    kv = layer(dtype=torch.bfloat16)
    assert kv.nbytes == 2 * 24 * 2 * 8 * 2


def test_layer_kv_rejects_k_v_shape_mismatch():
    with pytest.raises(KVShapeError, match="expected equal"):
        LayerKV(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 4))


def test_layer_kv_to_casts_both():
    kv = layer().to(dtype=torch.float16)
    assert kv.k.dtype == kv.v.dtype == torch.float16


def test_cache_rejects_tokens_not_matching_grid():
    with pytest.raises(KVShapeError, match="N=23 tokens"):
        KVCache(SIG, GRID, {0: layer(tokens=23)})


def test_cache_rejects_heads_not_matching_signature():
    with pytest.raises(KVShapeError, match="H=3, D=8"):
        KVCache(SIG, GRID, {0: layer(heads=3)})


def test_cache_rejects_layer_index_out_of_range():
    with pytest.raises(KVShapeError, match="outside 0..3"):
        KVCache(SIG, GRID, {4: layer()})


def test_cache_rejects_mixed_batch_sizes():
    with pytest.raises(KVShapeError, match="batch 2"):
        KVCache(SIG, GRID, {0: layer(batch=1), 1: layer(batch=2)})


def test_cache_lists_sorted_layers_and_sums_bytes():
    cache = KVCache(SIG, GRID, {3: layer(), 1: layer()})
    assert cache.layer_indices == [1, 3]
    assert cache.nbytes == 2 * layer().nbytes
    assert 3 in cache and 2 not in cache


def test_cache_select_shares_tensors_without_copy():
    kv1 = layer()
    picked = KVCache(SIG, GRID, {1: kv1, 2: layer()}).select([1])
    assert picked.layer_indices == [1] and picked[1].k is kv1.k


def test_cache_select_names_missing_layers():
    with pytest.raises(MissingLayerError, match=r"layers \[0, 2\] are not captured.*holds \[1\]"):
        KVCache(SIG, GRID, {1: layer()}).select([0, 1, 2])


def test_cache_getitem_names_held_layers():
    with pytest.raises(MissingLayerError, match=r"no layer 0; it holds layers \[1\]"):
        KVCache(SIG, GRID, {1: layer()})[0]


def test_cache_to_changes_dtype_of_every_layer():
    cache = KVCache(SIG, GRID, {0: layer(), 1: layer()}).to(dtype=torch.bfloat16)
    assert {cache[i].v.dtype for i in cache.layer_indices} == {torch.bfloat16}


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
