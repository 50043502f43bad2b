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
