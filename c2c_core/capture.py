"""The captured-K/V store of a live sharer: its K/V by layer and CFG branch, with byte accounting.

One sharer forward yields, per captured layer, (rows, N, …) tensors covering one or more branches (a
batched cond+uncond call). They are kept whole, by reference (the model's own tensors, never copied),
and handed back whole when the receiver asks for the same branches in the same order. Any other
request is assembled from slices; ``copied_bytes`` counts what that copied, ``peak_bytes`` the most
held at once (both end up in the run's report).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CapturedKV"]


def _nbytes(k: Tensor, v: Tensor) -> int:
    return k.numel() * k.element_size() + v.numel() * v.element_size()


class CapturedKV:
    """Sharer K/V of the current refresh window, by sharer layer and branch."""

    def __init__(self):
        self.batches: dict[int, list] = {}     # layer -> [(k, v, branches)]
        self.window: dict = {}                 # branch -> refresh window its K/V were made for
        self.peak_bytes = 0
        self.copied_bytes = 0

    def put(self, layer: int, k: Tensor, v: Tensor, branches) -> None:
        """Keep ``k, v`` of ``layer`` for ``branches`` (their rows in that order); replaces older K/V of those branches."""
        entries = [e for e in self.batches.get(layer, []) if not set(e[2]) & set(branches)]
        entries.append((k, v, tuple(branches)))
        self.batches[layer] = entries
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def has(self, layer: int, branch) -> bool:
        return any(branch in have for _, _, have in self.batches.get(layer, ()))

    def drop(self, branches) -> None:
        """Forget every layer's K/V of ``branches``, with whatever was batched with them (before the sharer runs
        for them again)."""
        for layer, entries in list(self.batches.items()):
            self.batches[layer] = [e for e in entries if not set(e[2]) & set(branches)]

    def drop_below(self, layer: int) -> None:
        """Forget the layers below ``layer`` (streaming: the receiver is past every layer that read them)."""
        for old in [m for m in self.batches if m < layer]:
            del self.batches[old]

    def clear(self) -> None:
        self.batches, self.window = {}, {}

    @property
    def nbytes(self) -> int:
        """Bytes of K/V held (tensor sizes; they are the model's own tensors, referenced, not copied)."""
        return sum(_nbytes(k, v) for entries in self.batches.values() for k, v, _ in entries)

    def get(self, layer: int, branches) -> tuple[Tensor, Tensor]:
        """K/V of ``layer`` for ``branches`` in that order: the captured tensors themselves when they match."""
        branches = tuple(branches)
        entries = self.batches.get(layer, [])
        for k, v, have in entries:
            if have == branches:
                return k, v
        parts_k, parts_v = [], []
        for branch in branches:
            for k, v, have in entries:
                if branch in have:
                    rows = k.shape[0] // len(have)
                    i = have.index(branch)
                    parts_k.append(k[i * rows:(i + 1) * rows])
                    parts_v.append(v[i * rows:(i + 1) * rows])
                    break
            else:
                raise KeyError((layer, branch))
        if len(parts_k) == 1:
            return parts_k[0], parts_v[0]
        k, v = torch.cat(parts_k), torch.cat(parts_v)
        self.copied_bytes += _nbytes(k, v)
        return k, v
