"""The README's core API example runs as written (so the front page cannot rot)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_core_example_runs():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README lost its core API example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_names_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert "make test" in text and "make demo" in text
