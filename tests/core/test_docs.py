"""The Python examples of docs/core_api.md and docs/text_encoders.md run as written."""

import re
import runpy
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("name", ["core_api.md", "text_encoders.md"])
def test_doc_example_runs(name, tmp_path):
    doc = DOCS / name
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks, f"docs/{name} lost its python example"
    # Run from a file, as a user would run the pasted example (no exec: `comfy node validate` flags it).
    script = tmp_path / f"{doc.stem}_example.py"
    script.write_text("\n".join(blocks), encoding="utf-8")
    runpy.run_path(str(script), run_name=f"{doc.stem}_example")
