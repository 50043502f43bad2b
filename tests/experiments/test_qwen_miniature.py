"""The text-encoder miniature (experiments/qwen_miniature.py, run_qwen_miniature.py) stays runnable and measures
what it says: a dry run writes the report and the plot, the receiver it builds is colour-blind while the
seeing receiver and the sharer are not, the K/V oracle hands the blind receiver every row a bridge can reach,
and the shuffled-sharer control really hands each prompt another prompt's sharer K/V."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from host import require_comfyui

pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def load(name):
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qm(monkeypatch_module):
    monkeypatch_module.setenv("COMFYUI_PATH", str(require_comfyui()))
    return load("qwen_miniature")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def models(qm):
    tok = qm.tokenizer()
    seeing = qm.qwen25(100, unit_norms=True)                    # the run's encoders, untaught (teaching takes a minute)
    return tok, seeing, qm.colour_blind(seeing, tok), qm.qwen3(200, unit_norms=True), qm.dit(300)


PAIR = ["a red square on a blue background", "a green square on a yellow background"]


def test_dry_run_writes_the_report_and_the_plot(qm, tmp_path):
    run = load("run_qwen_miniature")
    results = tmp_path / "QWEN_RESULTS.md"
    assert run.main(["--quick", "--seeds", "1", "--workers", "1", "--out", str(tmp_path / "out"),
                     "--results", str(results)]) == 0
    text = results.read_text()
    for method in (qm.RECEIVER, qm.UPPER, qm.WEIGHTED, qm.ORACLE, "c2c projector (trained)", qm.SHUFFLED):
        assert f"| {method} |" in text
    assert "## Verdict" in text and "Quick mode" in text
    assert "receiver probe" in text                             # the seeing receiver was taught before the DiT
    assert (tmp_path / "qwen_results.png").stat().st_size > 10_000
    from c2c_core import load_bundle
    bundle = load_bundle(tmp_path / "out" / "qwen_seed0" / "projector_c2c.safetensors")
    assert bundle.bank.kind == "c2c"


def test_the_receiver_is_colour_blind_and_the_sharer_is_not(qm, models):
    tok, seeing, blind, sharer, transformer = models
    blind_embeds = qm.encode(qm.pipeline(blind, tok, transformer), PAIR)
    seeing_embeds = qm.encode(qm.pipeline(seeing, tok, transformer), PAIR)
    assert torch.equal(blind_embeds[0], blind_embeds[1])          # two colour pairs, one conditioning
    assert not torch.allclose(seeing_embeds[0], seeing_embeds[1], atol=1e-3)
    ids = tok(PAIR, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = sharer.model.language_model(input_ids=ids).last_hidden_state
    assert not torch.allclose(hidden[0], hidden[1], atol=1e-3)
    # only the colour words went blind: a shape word still changes the blind receiver's conditioning
    other = qm.encode(qm.pipeline(blind, tok, transformer), ["a red ring on a blue background"])
    assert not torch.allclose(other[0], blind_embeds[0], atol=1e-3)


def test_the_kv_oracle_gives_the_seeing_rows_everywhere_but_the_colour_words(qm, models):
    """The ceiling the miniature is built on: handing the blind receiver the seeing receiver's own K/V restores every
    row the DiT reads exactly, except the two colour words' own rows (their residual stream keeps the blind
    embedding). So a receiver whose later rows carry the colours, as the taught one does, can get them back."""
    tok, seeing, blind, sharer, transformer = models
    pipe = qm.pipeline(blind, tok, transformer)
    oracle = qm.bridged_encode(pipe, seeing, tok, qm.bundle("identity", seeing, blind, 0), PAIR)
    truth = qm.encode(qm.pipeline(seeing, tok, transformer), PAIR)
    alone = qm.encode(pipe, PAIR)
    colour_rows = [1, 5]                                        # "a red square on a blue background ..."
    others = [i for i in range(truth.shape[1]) if i not in colour_rows]
    torch.testing.assert_close(oracle[:, others], truth[:, others], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone[:, others], truth[:, others], atol=1e-3)
    assert not torch.allclose(oracle[:, colour_rows], truth[:, colour_rows], atol=1e-3)


def test_the_shuffled_control_reads_another_prompts_sharer(qm, models):
    tok, seeing, blind, sharer, transformer = models
    pipe = qm.pipeline(blind, tok, transformer)
    bundle = qm.bundle("c2c", sharer, blind, 0, hidden_dim=16)
    fused = qm.bridged_encode(pipe, sharer, tok, bundle, PAIR)
    shuffled = qm.bridged_encode(pipe, sharer, tok, bundle, PAIR, shuffled=True)
    swapped = qm.bridged_encode(pipe, sharer, tok, bundle, PAIR[::-1])
    assert not torch.allclose(fused, shuffled, atol=1e-4)
    # the blind receiver reads both prompts alike, so row 0 shuffled is row 0 of the swapped batch
    torch.testing.assert_close(shuffled, swapped, rtol=1e-5, atol=1e-5)
