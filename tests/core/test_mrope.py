"""M-RoPE of the Qwen text encoders (c2c_core.mrope): axis layouts, positions, rotation and re-rotation,
against the definition (host-free) and against the host's own functions (subprocess; host-marked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from c2c_core import (QWEN3_VL_MROPE, QWEN25_VL_MROPE, KVShapeError, MRopeRerotation, MRopeSpec, VisionGrid,
                      mrope_positions, mrope_rotate)

ROOT = Path(__file__).resolve().parents[2]


def keys(n, seed, dtype=torch.float32, heads=2, dim=128):
    return torch.randn(1, n, heads, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_qwen25_sections_are_contiguous_and_qwen3_sections_interleave():
    """As transformers' ``recomposition_frequencies`` lays them out (modeling_qwen2_5_vl: split by sections;
    modeling_qwen3_vl: h and w overwrite every third pair of t within 3 * section)."""
    axes25 = QWEN25_VL_MROPE.pair_axes().tolist()
    assert axes25 == [0] * 16 + [1] * 24 + [2] * 24
    axes3 = QWEN3_VL_MROPE.pair_axes().tolist()
    assert axes3[:9] == [0, 1, 2] * 3 and axes3[57:] == [0, 1, 2, 0, 0, 0, 0]
    assert [axes3.count(a) for a in range(3)] == [24, 20, 20]


def test_a_spec_whose_sections_do_not_fill_the_head_is_refused():
    with pytest.raises(KVShapeError, match=r"summing to head_dim / 2 = 64"):
        MRopeSpec(head_dim=128, theta=1e6, sections=(16, 24, 20))


def test_text_positions_are_the_token_index_on_every_axis():
    assert torch.equal(mrope_positions(5), torch.arange(5).expand(3, 5))


def test_image_positions_take_row_and_column_and_text_resumes_after_the_longer_side():
    """Two text tokens, a 2x3 image, one text token: the image sits at p = 2 (t), 2 + row (h), 2 + col (w);
    the next text token is at 2 + max(2, 3) = 5."""
    pos = mrope_positions(9, [VisionGrid(2, (1, 2, 3))])
    assert pos.tolist() == [[0, 1, 2, 2, 2, 2, 2, 2, 5],
                            [0, 1, 2, 2, 2, 3, 3, 3, 5],
                            [0, 1, 2, 3, 4, 2, 3, 4, 5]]


def test_a_vision_grid_from_the_towers_patch_grid_is_merged_two_by_two():
    """ComfyUI hands the grid as a (1, 3) tensor of patches before the merge (a 448x336 image at 14 px: 32x24)."""
    assert VisionGrid.from_patch_grid(5, torch.tensor([[1, 32, 24]])) == VisionGrid(5, (1, 16, 12))
    assert VisionGrid.from_patch_grid(0, (1, 4, 6)).size == 6
    with pytest.raises(KVShapeError, match=r"patch grid \[1, 5, 6\] is not \(t, h, w\)"):
        VisionGrid.from_patch_grid(0, (1, 5, 6))
    with pytest.raises(KVShapeError, match="take images"):
        VisionGrid.from_patch_grid(0, (2, 4, 4))


def reference_rotation(x, positions, spec):
    """The definition, in float64: pair (i, i + D/2) rotated by positions[axis(i)] * inv_freq(i)."""
    axes, inv = spec.pair_axes(), spec.inv_freq().double()
    angle = positions.double()[axes].T * inv                   # (N, D/2)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    half = spec.head_dim // 2
    a, b = x.double()[..., :half], x.double()[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


@pytest.mark.parametrize("spec", [QWEN25_VL_MROPE, QWEN3_VL_MROPE], ids=["qwen2.5-vl", "qwen3-vl"])
def test_rotation_matches_the_definition(spec):
    pos = mrope_positions(40, [VisionGrid(3, (1, 4, 5))])
    x = keys(40, 1)
    torch.testing.assert_close(mrope_rotate(x, pos, spec).double(), reference_rotation(x, pos, spec), atol=2e-5, rtol=0)


def test_rotation_keeps_only_relative_positions_in_attention_scores():
    """Shifting every token of a text by the same amount on all axes leaves q.k unchanged (RoPE's point)."""
    pos = mrope_positions(12, [VisionGrid(2, (1, 2, 3))])
    q, k = keys(12, 3).double(), keys(12, 4).double()
    spec = QWEN3_VL_MROPE
    scores = lambda p: torch.einsum("bnhd,bmhd->bhnm", mrope_rotate(q, p, spec), mrope_rotate(k, p, spec))
    torch.testing.assert_close(scores(pos), scores(pos + 37), atol=1e-4, rtol=0)   # float32 angles, as the host


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", [QWEN25_VL_MROPE, QWEN3_VL_MROPE], ids=["qwen2.5-vl", "qwen3-vl"])
def test_rerotation_moves_keys_as_rotating_at_the_target_does(spec, dtype):
    """Float tolerance, not bits: one rotation by the difference vs the host's rotation at the target.
    Positions up to ~600 (long prompts with an image): float32 angles of the host differ by ~pos * 1e-7."""
    src = mrope_positions(64, [VisionGrid(5, (1, 6, 7))]) + 500
    dst = mrope_positions(64, [VisionGrid(5, (1, 7, 6))])
    x = keys(64, 5)
    moved = MRopeRerotation(src, dst, spec).apply(mrope_rotate(x.to(dtype), src, spec))
    assert moved.dtype == dtype
    atol = 2e-4 if dtype is torch.float32 else 5e-2
    torch.testing.assert_close(moved.float(), mrope_rotate(x.to(dtype), dst, spec).float(), atol=atol, rtol=0)


def test_rerotation_refuses_keys_of_another_length():
    pos = mrope_positions(4)
    with pytest.raises(KVShapeError, match=r"expected \(B, 4, H, 128\)"):
        MRopeRerotation(pos, pos + 1, QWEN25_VL_MROPE).apply(keys(5, 1))


def test_rotation_refuses_positions_of_another_sequence():
    with pytest.raises(KVShapeError, match=r"positions have shape \(3, 4\); expected \(3, 5\)"):
        mrope_rotate(keys(5, 1), mrope_positions(4), QWEN25_VL_MROPE)


HOST_CHECK = """
import inspect, sys, torch
sys.path[:0] = [{comfy!r}, {root!r}]
import comfy.cli_args; comfy.cli_args.args.cpu = True
import comfy.text_encoders.llama as llama
import c2c_core as c

# 1. positions: Qwen2.5-VL's forward (both hosts) computes them inline; capture what it hands to the base class
captured = {{}}
llama.BaseLlama.forward = lambda self, x, **kw: captured.setdefault("pos", kw["position_ids"])
te = llama.Qwen25_7BVLI.__new__(llama.Qwen25_7BVLI)
torch.nn.Module.__init__(te)
n = 60
info = [dict(type="image", index=4, size=20, extra=torch.tensor([[1, 8, 10]])),
        dict(type="image", index=30, size=12, extra=torch.tensor([[1, 6, 8]]))]
te.forward(None, embeds=torch.zeros(1, n, 8), embeds_info=info)
ours = c.mrope_positions(n, [c.VisionGrid(4, (1, 4, 5)), c.VisionGrid(30, (1, 3, 4))])
assert torch.equal(captured["pos"].long(), ours), (captured["pos"], ours)
try:
    from comfy.text_encoders.qwen_vl import qwen2vl_mrope_position_ids      # Qwen3-VL's (0.33.0 on)
    assert torch.equal(qwen2vl_mrope_position_ids(info, n, "cpu").long(), ours)
    checked = "positions of Qwen2.5-VL and Qwen3-VL"
except ImportError:
    checked = "positions of Qwen2.5-VL"

# 2. rotation: the host's precompute_freqs_cis + apply_rope on those positions
fused = "addcmul_" in inspect.getsource(llama.apply_rope)
specs = [(c.QWEN25_VL_MROPE, {{}})]
if "interleaved_mrope" in inspect.signature(llama.precompute_freqs_cis).parameters:
    specs.append((c.QWEN3_VL_MROPE, dict(interleaved_mrope=True)))
for spec, extra in specs:
    freqs = llama.precompute_freqs_cis(128, ours, spec.theta, None, list(spec.sections), **extra)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        k = torch.randn(1, n, 4, 128).to(dtype)
        _, host_k = llama.apply_rope(k.transpose(1, 2).clone(), k.transpose(1, 2), freqs)
        mine = c.mrope_rotate(k, ours, spec)
        host_k = host_k.transpose(1, 2)
        if fused:
            assert torch.equal(host_k, mine), (spec, dtype)
        else:      # 0.3.75 adds two products instead of addcmul_: one float32 rounding apart before the cast
            tol = 1e-6 if dtype is torch.float32 else 2 ** -7 if dtype is torch.bfloat16 else 2 ** -10
            assert (host_k.float() - mine.float()).abs().max() <= tol * 8, (spec, dtype)
    # 3. re-rotation: sharer keys rotated by the host at its positions, moved to the receiver's, against the
    # host rotating the same keys at the receiver's positions
    dst = c.mrope_positions(n, [c.VisionGrid(4, (1, 5, 4)), c.VisionGrid(30, (1, 4, 3))])
    k = torch.randn(1, n, 4, 128)
    _, at_src = llama.apply_rope(k.transpose(1, 2).clone(), k.transpose(1, 2), freqs)
    dfreqs = llama.precompute_freqs_cis(128, dst, spec.theta, None, list(spec.sections), **extra)
    _, at_dst = llama.apply_rope(k.transpose(1, 2).clone(), k.transpose(1, 2), dfreqs)
    moved = c.MRopeRerotation(ours, dst, spec).apply(at_src.transpose(1, 2))
    err = (moved - at_dst.transpose(1, 2)).abs().max().item()
    assert err < 1e-4, err
print("checked", checked, "; rotation", "bit-identical" if fused else "within one float32 rounding",
      "for", len(specs), "spec(s)")
"""


def test_positions_and_rotation_agree_with_the_hosts_own_functions(comfyui_root):
    """Runs ComfyUI's llama.py (and qwen_vl.py where the host has Qwen3-VL) in a subprocess, keeping comfy out of
    this process. Positions: equal. Rotation: bit-identical where the host rotates with addcmul_ (0.33.0), within
    one float32 rounding where it adds two products (0.3.75). Re-rotation: float tolerance (1e-4)."""
    code = HOST_CHECK.format(comfy=str(comfyui_root), root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "checked" in out.stdout, out.stderr[-3000:]
