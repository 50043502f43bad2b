"""docs/core_api.md's example runs as written."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "core_api.md"


def test_core_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/core_api.md lost its python example"
    exec(compile("\n".join(blocks), str(DOC), "exec"), {"__name__": "core_api_example"})
