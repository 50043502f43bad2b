"""Make the repository root (for ``import c2c_core``) and this folder (for ``core_helpers``) importable.

The suite runs with ``--import-mode=importlib``, where test folders are not put on sys.path.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (str(ROOT), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine the thread
    barriers made a 300-step training test 15x slower; restored afterwards for other suites."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
