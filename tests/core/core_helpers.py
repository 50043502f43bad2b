"""Shared strategies and small builders for the c2c_core tests (tiny shapes: CPU, 2 cores)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from c2c_core import ModelSignature

#: every property test: few examples, no deadline (first torch calls are slow to warm up).
PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYER_COUNTS = ((30, 40), (40, 30), (40, 40))  # (sharer, receiver) as in Wan 1.3B <-> 14B

dtypes = st.sampled_from(DTYPES)
small = st.integers(min_value=1, max_value=3)


def signature(layers: int = 4, heads: int = 2, head_dim: int = 8, name: str = "") -> ModelSignature:
    return ModelSignature(layers, heads, head_dim, name)


def kv(batch: int, tokens: int, sig: ModelSignature, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, sig.num_heads, sig.head_dim, generator=g).to(dtype)
