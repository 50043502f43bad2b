"""The README's core API example runs as written (so the front page cannot rot)."""
import re
import runpy
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_core_example_runs(tmp_path):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README lost its core API example"
    # Each block from its own file with fresh globals, as a user would run it (no exec: `comfy node validate`
    # flags it).
    for index, block in enumerate(blocks):
        script = tmp_path / f"readme_block_{index}.py"
        script.write_text(block, encoding="utf-8")
        runpy.run_path(str(script))


def test_readme_names_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert "make test" in text and "make demo" in text


def test_readme_install_section_names_the_projects_git_url_and_the_managers_setting():
    """Until the registry has the pack, the Manager installs it from the git URL pyproject.toml names."""
    import tomllib

    url = tomllib.loads((README.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]["urls"]["Repository"]
    install = README.read_text(encoding="utf-8").split("## Install in ComfyUI", 1)[1].split("\n## ", 1)[0]
    for needed in (f"git clone {url}", f"cm-cli install {url}", f"comfy node install {url}",
                   "allow_git_url_install = true", "--listen 127.0.0.1", "greenlet"):
        assert needed in install, f"README's install section lost {needed!r}"
