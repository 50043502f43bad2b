"""docs/core_api.md's example runs as written."""

import re
import runpy
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "core_api.md"


def test_core_api_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/core_api.md lost its python example"
    # Run from a file, as a user would run the pasted example (no exec: `comfy node validate` flags it).
    script = tmp_path / "core_api_example.py"
    script.write_text("\n".join(blocks), encoding="utf-8")
    runpy.run_path(str(script), run_name="core_api_example")
