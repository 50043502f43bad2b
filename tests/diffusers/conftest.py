"""Tests of c2c_diffusers with tiny random diffusers models (tests/diffusers/tiny.py); no downloads.

diffusers is an optional extra that `make test` installs (requirements-dev.txt). Without it this folder
is skipped as one visible skip, and under CI it is a collection error: CI must never pass without it.
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
for path in (str(HERE.parents[1]), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

if importlib.util.find_spec("diffusers") is None:
    FIX = "diffusers is not installed: .venv/bin/pip install -r requirements-dev.txt (or make venv)"
    if os.environ.get("CI"):
        pytest.fail(f"tests/diffusers cannot run under CI: {FIX}", pytrace=False)
    pytest.skip(f"every test in tests/diffusers: {FIX}", allow_module_level=True)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
