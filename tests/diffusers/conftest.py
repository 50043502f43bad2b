"""Tests of c2c_diffusers with tiny random diffusers models (tests/diffusers/tiny.py); no downloads.

diffusers is an optional extra: without it (and without CI set) this folder is skipped; `make test`
installs it (requirements-dev.txt).
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

if importlib.util.find_spec("diffusers") is None and not os.environ.get("CI"):
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
