"""Align two tokenizations of one prompt, so a causal sharer's K/V can be fused into a receiver token by token.

Why: a text-encoder pair (Qwen3-VL sharer, Qwen2.5-VL receiver) reads the same prompt with two
tokenizers and two vision towers. Fusion needs, for every receiver token, the sharer token whose
K/V it reads. As in Cache-to-Cache (thu-nics/C2C), tokens are matched by the characters they cover
in the shared text: each token carries a character span (start, end), and the result is an index
tensor (receiver token -> sharer token) used as a gather on the sharer's K/V.

The rule (``rule="causal"``, the default): receiver token j reads the LAST sharer token that ends
at or before j's own end. Identical tokens map one to one; a receiver token split into several
sharer tokens reads the last of them (it has read all of j's characters); sharer tokens that merge
several receiver tokens are read only by the receiver token where the merged token ends, the
earlier ones reading the sharer token before it. So the sharer state a receiver token reads has
never seen a character after that token's end, and since the receiver's causal mask lets query i
read only keys j <= i, the fused prefill stays causal: query i sees text up to its own end and no
further. ``rule="covering"`` (the last sharer token overlapping j's characters) reads the merged
token already at its first receiver token: one token of look-ahead, kept for comparison.

Special tokens (chat-template markers) have spans over their text like any token and align by
it; a token with an empty span (a BOS at 0) aligns at its position. Tokens without characters
(``None``: padding) are never read, and a receiver pad reads what the token before it reads (its
keys are masked by the receiver's own attention mask anyway, so nothing padded can leak). Vision
tokens are aligned on their 2-D grids, not by characters: the k-th image of the receiver reads the
k-th image of the sharer at the nearest grid cell by cell centre (Qwen2.5-VL has 28 px tokens,
Qwen3-VL 32 px: both grids cover the whole image). Within an image block causality has no meaning
(the vision tower attends over the whole image); text after an image aligns by its characters.

:func:`build_text_alignment` turns two layouts and the sharer's M-RoPE spec into the ``align``
callable ``FusionRun(align=...)`` takes: gather by the index, then re-rotate the gathered keys
from the sharer's positions to the receiver's (c2c_core.mrope).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .errors import TokenAlignmentError
from .mrope import MRopeRerotation, MRopeSpec, VisionGrid, mrope_positions

__all__ = ["ALIGN_RULES", "TokenLayout", "align_tokens", "spans_from_pieces", "TextAlignment",
           "build_text_alignment"]

ALIGN_RULES = ("causal", "covering")


@dataclass(frozen=True)
class TokenLayout:
    """One model's tokens of a prompt: a character span per token, and its image blocks.

    spans: (start, end) offsets into the prompt text both models read (characters or UTF-8 bytes, the
        same unit on both sides), ``None`` for a token without characters (padding). Spans of vision
        tokens are ignored: those are placed by ``vision``.
    vision: the image blocks in the sequence (c2c_core.mrope.VisionGrid: first token, merged grid).
    """

    spans: tuple
    vision: tuple = ()

    def __post_init__(self) -> None:
        spans = tuple(None if s is None else (int(s[0]), int(s[1])) for s in self.spans)
        for b in self.vision:
            if not isinstance(b, VisionGrid):
                raise TokenAlignmentError(f"TokenLayout: image block {b!r}; expected a c2c_core.mrope.VisionGrid.")
        vision = tuple(sorted(self.vision, key=lambda b: b.start))
        object.__setattr__(self, "spans", spans)
        object.__setattr__(self, "vision", vision)
        if not spans:
            raise TokenAlignmentError("TokenLayout: no tokens; expected the tokens of a prompt (at least one).")
        end = 0
        for b in vision:
            if b.start < end or b.end > len(spans):
                raise TokenAlignmentError(f"TokenLayout: image block {b!r} overlaps another or lies outside the "
                                          f"{len(spans)} tokens; expected VisionGrid blocks inside the sequence.")
            end = b.end
        last = (0, 0)
        for i in self.text_indices():
            s = spans[i]
            if s is None:
                continue
            if s[0] < 0 or s[1] < s[0] or s[0] < last[0] or s[1] < last[1]:
                raise TokenAlignmentError(
                    f"TokenLayout: token {i} spans {s} after a token spanning {last}; expected spans in text order "
                    f"(start <= end, neither going back). Pass the tokenizer's offsets of one text.")
            last = s

    @property
    def num_tokens(self) -> int:
        return len(self.spans)

    def is_vision(self) -> list[bool]:
        flags = [False] * len(self.spans)
        for b in self.vision:
            flags[b.start:b.end] = [True] * b.size
        return flags

    def text_indices(self) -> list[int]:
        return [i for i, v in enumerate(self.is_vision()) if not v]

    def positions(self) -> Tensor:
        """(3, N) M-RoPE positions as the hosts make them for this sequence (no padding inside)."""
        return mrope_positions(len(self.spans), self.vision)


def spans_from_pieces(pieces: Sequence) -> list[tuple[int, int]]:
    """Spans of consecutive token pieces (str or bytes each: a byte-level tokenizer's token bytes), from 0.

    For hosts whose tokenizer gives no offsets: decode each token to its bytes and the spans are in UTF-8
    bytes, which a token split inside a character (CJK, emoji) still covers exactly.
    """
    out, pos = [], 0
    for p in pieces:
        out.append((pos, pos + len(p)))
        pos += len(p)
    return out


def _grid_index(src: int, dst: int) -> list[int]:
    """Source cell of each of ``dst`` cells covering the same extent, by cell centre."""
    return [min(src - 1, int((i + 0.5) * src / dst)) for i in range(dst)]


def align_tokens(receiver: TokenLayout, sharer: TokenLayout, rule: str = "causal") -> Tensor:
    """(N_receiver,) long: the sharer token each receiver token reads (module docstring: the rule)."""
    if rule not in ALIGN_RULES:
        raise TokenAlignmentError(f"align_tokens rule {rule!r}; expected one of {ALIGN_RULES}.")
    if len(receiver.vision) != len(sharer.vision):
        raise TokenAlignmentError(
            f"align_tokens: the receiver's prompt holds {len(receiver.vision)} image(s), the sharer's "
            f"{len(sharer.vision)}; expected the same images in both. Encode the same images with both models.")
    candidates = [i for i in sharer.text_indices() if sharer.spans[i] is not None]
    if not candidates:
        raise TokenAlignmentError("align_tokens: the sharer's tokens cover no characters; expected the sharer's "
                                  "tokens of the same prompt.")
    starts = [sharer.spans[i][0] for i in candidates]
    ends = [sharer.spans[i][1] for i in candidates]
    index = [0] * receiver.num_tokens
    vision = receiver.is_vision()
    previous = candidates[0]
    for j, span in enumerate(receiver.spans):
        if vision[j]:
            continue
        if span is None:
            index[j] = previous
            continue
        if rule == "causal" or span[0] == span[1]:
            k = bisect_right(ends, span[1]) - 1
        else:
            k = bisect_left(starts, span[1]) - 1
        index[j] = previous = candidates[max(k, 0)]     # none before: the first (a prompt's start only)
    for rb, sb in zip(receiver.vision, sharer.vision):
        _, hr, wr = rb.grid
        _, hs, ws = sb.grid
        rows, cols = _grid_index(hs, hr), _grid_index(ws, wr)
        index[rb.start:rb.end] = [sb.start + r * ws + c for r in rows for c in cols]
    return torch.tensor(index, dtype=torch.long)


class TextAlignment:
    """The ``align`` callable of ``FusionRun`` for a text-encoder pair: gather, then M-RoPE re-rotation.

    ``(sk, sv)`` (B, N_sharer, H, D) -> (B, N_receiver, H, D): each receiver token gets the K/V of the
    sharer token ``index`` names; keys are then moved from that sharer token's positions to the
    receiver token's, under the SHARER's M-RoPE (the keys are the sharer's; only their positions
    change). Values carry no RoPE. Built once per prompt; nothing is rebuilt per layer.
    """

    def __init__(self, index: Tensor, sharer_positions: Tensor, receiver_positions: Tensor, sharer_rope: MRopeSpec):
        index = index.detach().to("cpu", torch.long)
        if index.dim() != 1 or receiver_positions.shape != (3, index.numel()) or sharer_positions.dim() != 2 \
                or sharer_positions.shape[0] != 3:
            raise TokenAlignmentError(
                f"TextAlignment: index {tuple(index.shape)}, receiver positions {tuple(receiver_positions.shape)}, "
                f"sharer positions {tuple(sharer_positions.shape)}; expected (N_r,), (3, N_r) and (3, N_s).")
        self.num_sharer, self.num_receiver = sharer_positions.shape[1], index.numel()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_sharer):
            raise TokenAlignmentError(f"TextAlignment: index outside the sharer's {self.num_sharer} tokens.")
        self.index = index
        self.gathers = not (self.num_sharer == self.num_receiver and torch.equal(index, torch.arange(self.num_sharer)))
        self.rerotation = MRopeRerotation(sharer_positions.detach().cpu()[:, index], receiver_positions.detach().cpu(),
                                          sharer_rope)
        self._on_device: dict = {}

    @property
    def is_identity(self) -> bool:
        """True when the sharer's K/V come back as they are (same tokens, same positions)."""
        return not self.gathers and self.rerotation.is_identity

    def __call__(self, sk: Tensor, sv: Tensor) -> tuple[Tensor, Tensor]:
        if sk.dim() != 4 or sk.shape[1] != self.num_sharer or sv.shape[:2] != sk.shape[:2]:
            raise TokenAlignmentError(
                f"TextAlignment: sharer K/V of shapes {tuple(sk.shape)}, {tuple(sv.shape)}; expected (B, "
                f"{self.num_sharer}, H, D) each, the sharer's tokens of the prompt the alignment was built for.")
        if self.gathers:
            idx = self._on_device.get(sk.device)
            if idx is None:
                idx = self._on_device[sk.device] = self.index.to(sk.device)
            sk, sv = sk.index_select(1, idx), sv.index_select(1, idx)
        return self.rerotation.apply(sk), sv


def build_text_alignment(receiver: TokenLayout, sharer: TokenLayout, sharer_rope: MRopeSpec, *,
                         rule: str = "causal", receiver_positions: Optional[Tensor] = None,
                         sharer_positions: Optional[Tensor] = None) -> TextAlignment:
    """What a host calls once per prompt: the ``align`` callable for ``FusionRun(align=...)``.

    Positions default to the hosts' M-RoPE positions of each layout (c2c_core.mrope.mrope_positions);
    a host that pads inside a prompt passes the positions its model used.
    """
    index = align_tokens(receiver, sharer, rule)
    rpos = receiver.positions() if receiver_positions is None else receiver_positions
    spos = sharer.positions() if sharer_positions is None else sharer_positions
    if rpos.shape != (3, receiver.num_tokens) or spos.shape != (3, sharer.num_tokens):
        raise TokenAlignmentError(
            f"build_text_alignment: positions {tuple(rpos.shape)} (receiver) and {tuple(spos.shape)} (sharer); "
            f"expected (3, {receiver.num_tokens}) and (3, {sharer.num_tokens}), one column per token.")
    return TextAlignment(index, spos, rpos, sharer_rope)
