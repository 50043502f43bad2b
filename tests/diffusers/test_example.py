"""examples/wan_chronoedit_diffusers.py runs offline with the repository's tiny models (--tiny)."""
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow      # the example script, twice, in subprocesses

ROOT = Path(__file__).resolve().parents[2]


def test_example_runs_with_tiny_models(tiny_models, tmp_path):
    out = subprocess.run([sys.executable, "examples/wan_chronoedit_diffusers.py", "--tiny", "--steps", "2",
                          "--out", str(tmp_path / "fused.mp4")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sharer forwards 4, receiver calls 4" in out.stdout
    latents = load_file(tmp_path / "fused.safetensors")["latents"]
    assert latents.shape == (1, 16, 2, 4, 4)


def test_example_without_an_image_says_what_is_missing():
    out = subprocess.run([sys.executable, "examples/wan_chronoedit_diffusers.py"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--image is required (or use --tiny)" in out.stderr
