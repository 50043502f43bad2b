"""Token alignment of two tokenizations of one prompt (c2c_core.tokens) and the align callable FusionRun takes."""

from __future__ import annotations

import random

import pytest
import torch

from c2c_core import (FusionError, FusionRun, FusionSchedule, LayerMap, MRopeSpec, ModelSignature, ProjectorBank,
                      TokenAlignmentError, TokenLayout, VisionGrid, align_tokens, build_text_alignment, mrope_rotate,
                      spans_from_pieces)
from c2c_core.bundle import ProjectorBundle
from c2c_core.mrope import MRopeRerotation


def layout(*pieces, vision=()):
    """Spans of consecutive text pieces; None for a pad token."""
    spans, pos = [], 0
    for p in pieces:
        if p is None:
            spans.append(None)
        else:
            spans.append((pos, pos + len(p)))
            pos += len(p)
    return TokenLayout(tuple(spans), tuple(vision))


def index(receiver, sharer, rule="causal"):
    return align_tokens(receiver, sharer, rule).tolist()


# -- text tokens ---------------------------------------------------------------------------------


def test_identical_tokenizations_align_one_to_one():
    a = layout("<|im_start|>", "user", "\n", "a", " red", " cat", "<|im_end|>")
    assert index(a, a) == list(range(7))
    assert index(a, a, "covering") == list(range(7))


def test_a_receiver_token_split_in_the_sharer_reads_the_last_piece():
    receiver = layout("<s>", " unbelievable", "!")
    sharer = layout("<s>", " un", "belie", "vable", "!")
    assert index(receiver, sharer) == [0, 3, 4]
    assert index(receiver, sharer, "covering") == [0, 3, 4]


def test_merged_sharer_tokens_are_read_only_where_they_end():
    """Causal: receiver 'New' (ends at 8) must not read the sharer's ' New York' (ends at 13): it reads the
    token before; ' York' reads the merged token. Covering reads the merged token one token early."""
    receiver = layout("<s>", " New", " York", " city")
    sharer = layout("<s>", " New York", " city")
    assert index(receiver, sharer) == [0, 0, 1, 2]
    assert index(receiver, sharer, "covering") == [0, 1, 1, 2]


def test_special_tokens_align_by_their_text_whether_one_token_or_several():
    """'<think>' is one special token in one tokenizer and three pieces in the other."""
    receiver = layout("<|im_start|>", "assistant", "\n", "<", "think", ">", "\n\n")
    sharer = layout("<|im_start|>", "assistant", "\n", "<think>", "\n\n")
    assert index(receiver, sharer) == [0, 1, 2, 2, 2, 3, 4]
    assert index(sharer, receiver) == [0, 1, 2, 5, 6]


def test_padding_is_never_read_and_receiver_pads_read_what_the_token_before_reads():
    receiver = layout("<s>", " a", " b", None, None)
    sharer = layout(None, "<s>", " a", None, " b")
    assert index(receiver, sharer) == [1, 2, 4, 4, 4]


def test_an_empty_span_aligns_at_its_position():
    """A BOS that covers no characters reads the sharer's BOS, not the first word."""
    receiver = TokenLayout(((0, 0), (0, 5), (5, 11)))
    sharer = TokenLayout(((0, 0), (0, 2), (2, 5), (5, 11)))
    assert index(receiver, sharer) == [0, 2, 3]


def test_causal_rule_never_reads_a_character_past_the_token_on_random_segmentations():
    """On random splits of one text: each receiver token reads a sharer token ending at or before its own
    end, the index never goes back, and it reads the latest such token (nothing nearer is skipped)."""
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 40)
        cuts_r = sorted(rng.sample(range(1, n), rng.randint(0, n - 1))) if n > 1 else []
        cuts_s = sorted(rng.sample(range(1, n), rng.randint(0, n - 1))) if n > 1 else []
        spans = lambda cuts: tuple(zip([0] + cuts, cuts + [n]))
        bos = ((0, 0),)
        receiver, sharer = TokenLayout(bos + spans(cuts_r)), TokenLayout(bos + spans(cuts_s))
        idx = index(receiver, sharer)
        assert idx == sorted(idx)
        for j, s in enumerate(idx):
            end = receiver.spans[j][1]
            assert sharer.spans[s][1] <= end
            assert s == len(sharer.spans) - 1 or sharer.spans[s + 1][1] > end


def test_spans_from_pieces_count_bytes_of_byte_level_tokens():
    """An emoji split over two byte-level tokens: the first piece ends inside the character."""
    pieces = ["a".encode(), "\xf0\x9f".encode("latin-1"), "\x98\x80".encode("latin-1"), " b".encode()]
    assert spans_from_pieces(pieces) == [(0, 1), (1, 3), (3, 5), (5, 7)]


def test_spans_out_of_order_are_refused():
    with pytest.raises(TokenAlignmentError, match=r"token 2 spans \(1, 3\) after a token spanning \(2, 4\)"):
        TokenLayout(((0, 2), (2, 4), (1, 3)))


def test_an_unknown_rule_is_refused():
    a = layout("x")
    with pytest.raises(TokenAlignmentError, match=r"rule 'first'; expected one of \('causal', 'covering'\)"):
        align_tokens(a, a, "first")


# -- vision tokens --------------------------------------------------------------------------------


def test_vision_tokens_align_on_their_grids_by_cell_centre_and_text_after_them_by_characters():
    """A receiver 4x4 grid (28 px tokens) reads a sharer 3x3 grid (32 px) of the same image: cell centres
    (i + 0.5) * 3 / 4 -> rows and columns 0, 1, 1, 2. The template text around the image aligns by characters."""
    receiver = layout("A:", "<vs>", *[None] * 16, "<ve>", " cat", vision=[VisionGrid(2, (1, 4, 4))])
    sharer = layout("A", ":", "<vs>", *[None] * 9, "<ve>", " cat", vision=[VisionGrid(3, (1, 3, 3))])
    idx = index(receiver, sharer)
    rows = cols = [0, 1, 1, 2]
    assert idx[2:18] == [3 + r * 3 + c for r in rows for c in cols]
    assert idx[:2] == [1, 2] and idx[18:] == [12, 13]


def test_a_different_number_of_images_is_refused():
    receiver = TokenLayout(((0, 1),) + (None,) * 4, (VisionGrid(1, (1, 2, 2)),))
    sharer = TokenLayout(((0, 1),))
    with pytest.raises(TokenAlignmentError, match=r"receiver's prompt holds 1 image\(s\), the sharer's 0"):
        align_tokens(receiver, sharer)


def test_vision_blocks_outside_the_sequence_are_refused():
    with pytest.raises(TokenAlignmentError, match="lies outside the 3 tokens"):
        TokenLayout(((0, 1),) * 3, (VisionGrid(1, (1, 2, 2)),))


# -- the align callable and FusionRun(align=) -----------------------------------------------------

SPEC = MRopeSpec(head_dim=8, theta=10000.0, sections=(2, 1, 1), interleaved=True)
SIG = ModelSignature(2, 2, 8, "tiny-text")


def keys(n, seed, batch=1):
    return torch.randn(batch, n, SIG.num_heads, SIG.head_dim, generator=torch.Generator().manual_seed(seed))


def text_pair():
    receiver = layout("<s>", " New", " York", " is", " big")
    sharer = layout("<s>", " New York", " is", " big", None)
    return receiver, sharer


def test_alignment_gathers_values_and_moves_keys_to_the_receivers_positions():
    receiver, sharer = text_pair()
    align = build_text_alignment(receiver, sharer, SPEC)
    raw_k, sv = keys(5, 1), keys(5, 2)
    sk = mrope_rotate(raw_k, sharer.positions(), SPEC)           # the sharer's keys as its attention has them
    k2, v2 = align(sk, sv)
    idx = [0, 0, 1, 2, 3]
    assert torch.equal(v2, sv[:, idx])
    expected = mrope_rotate(raw_k[:, idx], receiver.positions(), SPEC)   # as if made at the receiver's positions
    torch.testing.assert_close(k2, expected, atol=1e-5, rtol=0)
    assert not align.is_identity


def test_image_keys_move_from_the_sharers_grid_positions_to_the_receivers():
    """Vision tokens: gathered on the grid, keys re-rotated from the sharer's (t, h, w) to the receiver's; with
    positions the host passes (padding inside a prompt) those are the ones used."""
    receiver = layout("A:", "<vs>", *[None] * 16, "<ve>", " cat", vision=[VisionGrid(2, (1, 4, 4))])
    sharer = layout("A:", "<vs>", *[None] * 9, "<ve>", " cat", vision=[VisionGrid(2, (1, 3, 3))])
    raw_k, sv = keys(13, 21), keys(13, 22)
    sk = mrope_rotate(raw_k, sharer.positions(), SPEC)
    align = build_text_alignment(receiver, sharer, SPEC)
    idx = align.index
    assert idx[2:18].tolist() == [2 + r * 3 + c for r in (0, 1, 1, 2) for c in (0, 1, 1, 2)]
    k2, v2 = align(sk, sv)
    torch.testing.assert_close(k2, mrope_rotate(raw_k[:, idx], receiver.positions(), SPEC), atol=1e-5, rtol=0)
    assert torch.equal(v2, sv[:, idx])
    padded = receiver.positions() + torch.tensor([0] * 18 + [3, 3])        # the host skipped 3 pad positions
    k3, _ = build_text_alignment(receiver, sharer, SPEC, receiver_positions=padded)(sk, sv)
    torch.testing.assert_close(k3, mrope_rotate(raw_k[:, idx], padded, SPEC), atol=1e-5, rtol=0)
    assert torch.equal(k3[:, :18], k2[:, :18]) and not torch.equal(k3[:, 18:], k2[:, 18:])


def test_identical_layouts_give_the_sharers_tensors_back():
    a = layout("<s>", " a", " b")
    align = build_text_alignment(a, a, SPEC)
    sk, sv = keys(3, 3), keys(3, 4)
    k2, v2 = align(sk, sv)
    assert align.is_identity and k2 is sk and v2 is sv


def test_alignment_refuses_kv_of_another_prompt():
    receiver, sharer = text_pair()
    align = build_text_alignment(receiver, sharer, SPEC)
    with pytest.raises(TokenAlignmentError, match=r"expected \(B, 5, H, D\) each"):
        align(keys(7, 1), keys(7, 2))


def text_bundle():
    layer_map = LayerMap.build("identity", 2, 2, layers=[0, 1])
    bank = ProjectorBank.build("identity", SIG, SIG, layer_map.layers).eval()
    return ProjectorBundle(bank=bank, layer_map=layer_map, sharer=SIG, receiver=SIG)


def test_fusion_run_fuses_through_the_hosts_alignment():
    receiver, sharer = text_pair()
    align = build_text_alignment(receiver, sharer, SPEC)
    k, v = keys(5, 5), keys(5, 6)
    sk, sv = keys(5, 7), keys(5, 8)
    run = FusionRun(text_bundle(), FusionSchedule(), 1.0, align=align)
    assert run.begin_call(0.0)
    k2, v2 = run.fuse(0, k, v, sk, sv)
    ak, av = align(sk, sv)
    assert torch.equal(k2, ak) and torch.equal(v2, av)          # identity projector at strength 1: the aligned sharer
    half = FusionRun(text_bundle(), FusionSchedule(), 0.5, align=align)
    half.begin_call(0.0)
    k3, _ = half.fuse(1, k.clone(), v.clone(), sk, sv)
    assert torch.equal(k3, torch.lerp(k, ak, 0.5))
    off = FusionRun(text_bundle(), FusionSchedule(), 0.0, align=align)
    off.begin_call(0.0)
    assert off.fuse(0, k, v, sk, sv) == (k, v)


def test_fusion_respects_the_receivers_causal_mask():
    """Receiver query i attends over fused keys j <= i only; with the causal rule those keys hold sharer
    tokens that ended by token i's end, so the attention output at i is unchanged by any sharer text after
    it: fuse two sharer prompts that differ only after receiver token 2, compare outputs at 0..2."""
    receiver = layout("<s>", " New", " York", " is", " big")
    sharer = layout("<s>", " New York", " is", " big")
    align = build_text_alignment(receiver, sharer, SPEC)
    run = FusionRun(text_bundle(), FusionSchedule(), 0.7, align=align)
    run.begin_call(0.0)
    q, k, v = keys(5, 9), keys(5, 10), keys(5, 11)
    sk, sv = keys(4, 12), keys(4, 13)
    sk2, sv2 = sk.clone(), sv.clone()
    sk2[:, 2:], sv2[:, 2:] = 5.0, -5.0                           # the sharer read something else after ' York'
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    outs = []
    for a, b in ((sk, sv), (sk2, sv2)):
        fk, fv = run.fuse(0, k.clone(), v.clone(), a, b)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), fk.transpose(1, 2), fv.transpose(1, 2), attn_mask=mask).transpose(1, 2))
    assert torch.equal(outs[0][:, :3], outs[1][:, :3])
    assert not torch.equal(outs[0][:, 3:], outs[1][:, 3:])


def test_fusion_run_takes_either_grids_or_align():
    from c2c_core import TokenGrid
    receiver, sharer = text_pair()
    align = build_text_alignment(receiver, sharer, SPEC)
    with pytest.raises(FusionError, match=r"not both; got align= and a grid\."):
        FusionRun(text_bundle(), FusionSchedule(), 1.0, align=align, sharer_grid=TokenGrid(1, 1, 5))
    with pytest.raises(FusionError, match=r"got 0 grid\(s\) and no align=\."):
        FusionRun(text_bundle(), FusionSchedule(), 1.0)


def test_rerotation_of_equal_positions_is_a_no_op():
    pos = TokenLayout(((0, 1), (1, 2))).positions()
    k = keys(2, 1)
    assert MRopeRerotation(pos, pos.clone(), SPEC).apply(k) is k


def test_docs_text_encoders_example_runs():
    """docs/text_encoders.md's example runs as written."""
    import re
    from pathlib import Path
    doc = Path(__file__).resolve().parents[2] / "docs" / "text_encoders.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks, "docs/text_encoders.md lost its python example"
    exec(compile("\n".join(blocks), str(doc), "exec"), {"__name__": "text_encoders_example"})
