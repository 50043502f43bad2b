"""Token-grid resampling and Wan RoPE: positions, rotation, re-rotation between position sets.

Tolerances of re-rotation vs. direct rotation (unit-normal keys, head_dim 128): float32 1e-5
absolute (measured ~1e-6); bfloat16 / float16 4 ulps of the largest key (2^-8 resp. 2^-11
relative precision, two roundings: the rotated input and the output).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from c2c_core import KVShapeError, RopeRerotation, RopeSpec, TokenGrid, align_kv, rerotate_keys, resample_tokens, rope_positions, rope_rotate
from c2c_core.arch import wan_rope_axes
from core_helpers import PROPERTY, dtypes

ROOT = Path(__file__).resolve().parents[2]
GRID = TokenGrid(3, 4, 5)


def keys(grid=GRID, heads=2, dim=128, dtype=torch.float32, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, grid.numel, heads, dim, generator=g).to(dtype)


# -- positions -----------------------------------------------------------------------------------


def test_wan_axes_split_128_into_44_42_42():
    assert wan_rope_axes(128) == (44, 42, 42)


def test_wan_axes_reject_odd_head_dim():
    with pytest.raises(KVShapeError, match="even head_dim >= 6; got 7"):
        wan_rope_axes(7)


def test_positions_follow_comfyui_formula_for_scale_t_7():
    # ComfyUI rope_encode: t_len = (T - 1) * 7 + 1; linspace(0, t_len - 1, steps=T); frames-major order.
    grid = TokenGrid(3, 2, 2)
    expected = torch.tensor(
        [[t, y, x] for t in (0.0, 7.0, 14.0) for y in (0.0, 1.0) for x in (0.0, 1.0)], dtype=torch.float32
    )
    assert torch.equal(rope_positions(grid, scale=(7.0, 1.0, 1.0)), expected)


def test_positions_apply_shift_as_start_of_linspace():
    pos = rope_positions(TokenGrid(2, 1, 3), scale=(1.0, 1.0, 0.5), shift=(2.0, 0.0, 1.0))
    assert pos[:, 0].tolist() == [2.0, 2.0, 2.0, 3.0, 3.0, 3.0]
    assert pos[:3, 2].tolist() == [1.0, 1.5, 2.0]


def test_rope_spec_reads_comfyui_rope_options():
    spec = RopeSpec.from_rope_options({"scale_t": 7.0, "shift_y": 3.0, "scale_x": 0.5})
    assert spec.scale == (7.0, 1.0, 0.5) and spec.shift == (0.0, 3.0, 0.0)
    assert RopeSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# -- rotation ------------------------------------------------------------------------------------


def reference_rotation(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Independent formula: complex multiply of pairs (x[2i], x[2i+1]) by exp(i p omega), float64."""
    d = x.shape[-1]
    omegas, pos_cols = [], []
    for axis, width in enumerate(wan_rope_axes(d)):
        j = torch.arange(width // 2, dtype=torch.float64)
        omegas.append(theta ** (-2.0 * j / width))
        pos_cols.append(positions[:, axis : axis + 1].double().expand(-1, width // 2))
    angle = torch.cat(pos_cols, 1) * torch.cat(omegas)
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    rotated = pairs * torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    return torch.view_as_real(rotated).reshape(x.shape)


def test_rotation_matches_independent_complex_formula():
    pos = rope_positions(GRID, scale=(7.0, 1.0, 1.0))
    k = keys()
    torch.testing.assert_close(rope_rotate(k, pos).double(), reference_rotation(k, pos), atol=1e-5, rtol=0)


@PROPERTY
@given(dtype=dtypes, seed=st.integers(0, 100))
def test_rotation_keeps_dtype_and_pair_norms(dtype, seed):
    k = keys(dtype=dtype, seed=seed)
    out = rope_rotate(k, rope_positions(GRID))
    assert out.dtype == dtype
    norms = lambda t: t.float().reshape(*t.shape[:-1], -1, 2).norm(dim=-1)
    torch.testing.assert_close(norms(out), norms(k), atol=0.05, rtol=0.02)


TOLERANCE = {torch.float32: None, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rerotating_scaled_keys_equals_rotating_at_plain_positions(dtype):
    grid = TokenGrid(8, 6, 10)
    plain, scaled = rope_positions(grid), rope_positions(grid, scale=(7.0, 1.0, 1.0))
    k0 = keys(grid, dtype=dtype, seed=3)
    k_scaled = rope_rotate(k0, scaled)
    atol = 1e-5 if dtype is torch.float32 else 4 * TOLERANCE[dtype] * k0.float().abs().max().item()
    rerotated = rerotate_keys(k_scaled, scaled, plain)
    torch.testing.assert_close(rerotated.float(), rope_rotate(k0, plain).float(), atol=atol, rtol=0)
    assert rerotated.dtype == dtype
    assert not torch.allclose(k_scaled.float(), rope_rotate(k0, plain).float(), atol=0.1)  # the fix is needed


def test_rerotating_to_identical_positions_returns_the_key_object():
    k, pos = keys(), rope_positions(GRID)
    assert rerotate_keys(k, pos, pos) is k
    assert rerotate_keys(k, pos, pos.clone()) is k


def test_rerotation_object_reuses_its_table_and_checks_shapes():
    a, b = rope_positions(GRID), rope_positions(GRID, scale=(7.0, 1.0, 1.0))
    rot = RopeRerotation(a, b, head_dim=128)
    k = rope_rotate(keys(), a)
    torch.testing.assert_close(rot.apply(k), rope_rotate(keys(), b), atol=1e-5, rtol=0)
    with pytest.raises(KVShapeError, match=r"expected \(B, 60, H, 128\)"):
        rot.apply(keys(dim=64))


def _one_pass_rotation(k, table):
    """The simple path: the whole key upcast to float32, rotated, cast back (what chunking must equal)."""
    t = table.unsqueeze(1)
    pairs = k.float().reshape(*k.shape[:-1], -1, 1, 2)
    out = t[..., 0] * pairs[..., 0]
    return out.addcmul_(t[..., 1], pairs[..., 1]).reshape(k.shape).to(k.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_keys_rotate_in_token_chunks_bit_for_bit(monkeypatch, dtype):
    from c2c_core import align

    a, b = rope_positions(GRID), rope_positions(GRID, scale=(7.0, 1.0, 1.0), shift=(0.0, 2.0, 1.0))
    rot = RopeRerotation(a, b, head_dim=128)
    k = keys(dtype=dtype, seed=5, batch=2)
    expected = _one_pass_rotation(k, rot._table)
    sizes = []
    real = align._rotate_f32
    monkeypatch.setattr(align, "_rotate_f32", lambda x, t: sizes.append(x.shape[1]) or real(x, t))
    monkeypatch.setattr(align, "ROTATE_CHUNK_BYTES", 7 * 2 * 2 * 128 * 4)      # 7 tokens of float32 per chunk
    out = rot.apply(k)
    assert out.dtype == dtype and torch.equal(out, expected)
    if dtype is torch.float32:
        assert sizes == [GRID.numel]                    # float32 keys: one pass, no copy to chunk
    else:
        assert sizes == [7] * 8 + [4]                   # never a float32 copy of the whole key
    sizes.clear()
    strided = keys(dtype=dtype, seed=6, batch=2, heads=4)[:, :, ::2]          # a non-contiguous view
    assert torch.equal(rot.apply(strided), _one_pass_rotation(strided, rot._table))


def test_rotate_rejects_positions_of_another_grid():
    with pytest.raises(KVShapeError, match=r"positions have shape \(24, 3\); expected \(60, 3\)"):
        rope_rotate(keys(), rope_positions(TokenGrid(2, 3, 4)))


def test_rotation_is_bit_identical_to_comfyui_wan_rope(comfyui_root):
    """Runs ComfyUI's own rope_encode + apply_rope1 in a subprocess (keeps comfy out of this process); the
    host fixture skips it without a host, and fails it under CI."""
    code = f"""
import sys, types, torch
sys.path[:0] = [{str(comfyui_root)!r}, {str(ROOT)!r}]
import comfy.cli_args; comfy.cli_args.args.cpu = True
from comfy.ldm.wan.model import WanModel
from comfy.ldm.flux.layers import EmbedND
from comfy.ldm.flux.math import apply_rope1
import c2c_core as c
d = 128
host = types.SimpleNamespace(patch_size=(1, 2, 2), rope_embedder=EmbedND(dim=d, theta=10000.0, axes_dim=list(c.wan_rope_axes(d))))
for dtype in (torch.float32, torch.bfloat16):
    for options in (None, {{"scale_t": 7.0}}, {{"scale_t": 7.0, "shift_y": 3.0, "scale_x": 0.5}}):
        freqs = WanModel.rope_encode(host, 3, 8, 10, device="cpu", dtype=dtype, transformer_options={{"rope_options": options}} if options else {{}})
        grid = c.TokenGrid(3, 4, 5)
        k = torch.randn(2, grid.numel, 2, d).to(dtype)
        ours = c.rope_rotate(k, c.RopeSpec.from_rope_options(options).positions(grid, dtype=dtype))
        assert torch.equal(apply_rope1(k, freqs), ours), (dtype, options)
print("identical")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("identical"), out.stderr[-2000:]


# -- resampling ----------------------------------------------------------------------------------


def test_resample_equal_grids_returns_the_same_object():
    x = keys(dim=4)
    assert resample_tokens(x, GRID, TokenGrid(3, 4, 5)) is x


@PROPERTY
@given(dtype=dtypes, t=st.integers(1, 3), h=st.integers(1, 3), w=st.integers(1, 3), f=st.integers(2, 3))
def test_nearest_upsample_then_downsample_recovers_exactly(dtype, t, h, w, f):
    src, big = TokenGrid(t, h, w), TokenGrid(t * f, h * f, w * f)
    x = keys(src, dim=4, dtype=dtype)
    up = resample_tokens(x, src, big, "nearest")
    assert up.shape == (1, big.numel, 2, 4)
    assert torch.equal(resample_tokens(up, big, src, "nearest"), x)


def ramp(grid: TokenGrid, coords=None) -> torch.Tensor:
    """f(t, y, x) = 3t - 2y + 0.5x + 1 at every token, as (1, N, 1, 1)."""
    t, y, x = coords if coords is not None else torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid.shape), indexing="ij")
    return (3 * t - 2 * y + 0.5 * x + 1).reshape(1, -1, 1, 1)


def test_trilinear_resampling_of_a_linear_ramp_is_exact():
    src, dst = TokenGrid(2, 3, 4), TokenGrid(3, 5, 7)
    out = resample_tokens(ramp(src).float(), src, dst, "trilinear")
    # aligned corners: destination index i sits at source coordinate i * (S - 1) / (D - 1)
    coords = torch.meshgrid(*(torch.arange(d, dtype=torch.float64) * (s - 1) / (d - 1) for s, d in zip(src.shape, dst.shape)), indexing="ij")
    torch.testing.assert_close(out.double(), ramp(dst, coords), atol=1e-5, rtol=0)


def test_resampling_works_on_the_grid_not_the_flat_sequence():
    src, dst = TokenGrid(1, 2, 4), TokenGrid(1, 2, 2)
    x = torch.arange(8.0).reshape(1, 8, 1, 1)  # rows [0 1 2 3], [4 5 6 7]
    assert resample_tokens(x, src, dst, "nearest").flatten().tolist() == [0.0, 2.0, 4.0, 6.0]


def test_resample_keeps_dtype_for_trilinear():
    out = resample_tokens(keys(dim=4, dtype=torch.bfloat16), GRID, TokenGrid(2, 2, 2), "trilinear")
    assert out.dtype == torch.bfloat16 and out.shape == (1, 8, 2, 4)


def test_resample_rejects_token_count_not_matching_grid():
    with pytest.raises(KVShapeError, match=r"N=60 tokens but grid \(2, 2, 2\) has 8"):
        resample_tokens(keys(dim=4), TokenGrid(2, 2, 2), GRID)


def test_resample_rejects_unknown_mode():
    with pytest.raises(KVShapeError, match="mode='bicubic'"):
        resample_tokens(keys(dim=4), GRID, GRID, "bicubic")


# -- align_kv ------------------------------------------------------------------------------------


def test_align_kv_with_nothing_to_do_returns_the_same_objects():
    k, v = keys(), keys(seed=1)
    assert align_kv(k, v, GRID, GRID) == (k, v)


def test_align_kv_on_another_grid_unrotates_resamples_and_rotates():
    src, dst = TokenGrid(2, 2, 3), TokenGrid(4, 4, 6)
    sharer_rope = RopeSpec(scale=(7.0, 1.0, 1.0))
    k0, v = keys(src, seed=4), keys(src, seed=5)
    k_src = rope_rotate(k0, sharer_rope.positions(src))
    k_out, v_out = align_kv(k_src, v, src, dst, sharer_rope, RopeSpec(), "nearest")
    expected = rope_rotate(resample_tokens(k0, src, dst, "nearest"), rope_positions(dst))
    torch.testing.assert_close(k_out, expected, atol=1e-5, rtol=0)
    assert torch.equal(v_out, resample_tokens(v, src, dst, "nearest"))
