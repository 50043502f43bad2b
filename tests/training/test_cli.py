"""tools/train_projector.py: the command-line trainer (same implementation as the node)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow(seconds=45)

CLI = Path(__file__).resolve().parents[2] / "tools" / "train_projector.py"


@pytest.fixture(scope="module")
def samples(training, helpers, tmp_path_factory):
    return helpers.t2v_samples(training, tmp_path_factory.mktemp("cli_samples"), count=3)


def cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=180)


def common(tiny_models, samples, out):
    import host
    return ["--sharer", tiny_models.path(host.T2V_B), "--receiver", tiny_models.path(host.T2V_A), "--dataset", samples,
            "--kind", "full", "--mapping", "identity", "--hidden-dim", "32", "--steps", "4", "--batch-size", "2",
            "--lr", "1e-3", "--checkpoint-every", "2", "--loss", "velocity", "--out", out, "--threads", "1"]


def digest(result):
    found = re.search(r"weights sha256 ([0-9a-f]{16})", result.stdout)
    assert found, result.stdout + result.stderr
    return found.group(1)


def test_cli_trains_writes_a_bundle_and_resumes(tiny_models, samples, tmp_path):
    from c2c_core import load_bundle
    out = tmp_path / "pair.safetensors"
    first = cli(*common(tiny_models, samples, out))
    assert first.returncode == 0, first.stdout + first.stderr
    bundle = load_bundle(out)
    assert bundle.bank.kind == "full" and bundle.provenance["steps"] == 4 and bundle.provenance["loss"] == "velocity"
    assert (tmp_path / "pair_loss.png").is_file()
    assert sorted(p.name for p in (tmp_path / "pair_checkpoints").iterdir())[-1] == "step_000004.state.safetensors"

    refused = cli(*common(tiny_models, samples, out))
    assert refused.returncode != 0 and "pass --resume to continue it or --restart" in refused.stderr

    resumed = cli(*common(tiny_models, samples, out), "--resume")
    assert resumed.returncode == 0 and "resumed at step 4" in resumed.stdout
    restarted = cli(*common(tiny_models, samples, out), "--restart")
    assert restarted.returncode == 0
    assert digest(first) == digest(resumed) == digest(restarted)


def test_cli_refuses_a_folder_without_samples(tiny_models, tmp_path):
    result = cli(*common(tiny_models, tmp_path, tmp_path / "x.safetensors"))
    assert result.returncode != 0 and "--dataset: training-sample folder" in result.stderr
    assert "holds no .safetensors samples" in result.stderr
