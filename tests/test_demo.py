"""`make demo` as the tests run it (`--no-train` with nothing made): the untrained fallback, fast settings,
a temporary output folder. The trained default is tested in test_demo_assets.py."""
from __future__ import annotations

import pytest

import host

pytestmark = [pytest.mark.server, pytest.mark.slow]

demo = host._load_tool("demo")


@pytest.fixture(scope="module")
def demo_result(tiny_models, tmp_path_factory):
    return demo.run_demo(tmp_path_factory.mktemp("demo"), demo.DemoSettings.fast(), log=lambda message: None)


def test_demo_writes_the_comparison_the_layer_plot_and_the_report(demo_result):
    for path in (demo_result.comparison, demo_result.layers, demo_result.report):
        assert path.is_file() and path.stat().st_size > 0, path


def test_demo_pictures_decode(demo_result):
    from PIL import Image

    for path in (demo_result.comparison, demo_result.layers):
        with Image.open(path) as picture:
            picture.load()
            assert picture.width > 100 and picture.height > 100


def test_demo_runs_receiver_alone_sharer_alone_and_bridged(demo_result):
    assert [run.key for run in demo_result.runs] == ["receiver", "sharer", "bridged"]
    assert all(run.latent.shape == (1, 16, 2, 8, 8) for run in demo_result.runs)


def test_bridged_row_differs_from_receiver_row(demo_result):
    import numpy as np
    from PIL import Image

    with Image.open(demo_result.comparison) as picture:
        rows = {key: np.asarray(picture.convert("RGB").crop(box), dtype=np.int16)
                for key, box in demo_result.row_boxes.items()}
    assert rows["bridged"].shape == rows["receiver"].shape
    assert np.abs(rows["bridged"] - rows["receiver"]).mean() > 1.0   # grey levels out of 255
    assert rows["difference"].max() > 0


def test_bridged_latent_differs_from_receiver_latent(demo_result):
    import torch

    runs = {run.key: run for run in demo_result.runs}
    assert not torch.equal(runs["bridged"].latent, runs["receiver"].latent)


def test_report_names_the_runs_timings_and_files(demo_result):
    text = demo_result.report.read_text(encoding="utf-8")
    for needle in ("receiver alone", "sharer alone", "bridged", "comparison.png", "layers.png", " s "):
        assert needle in text, needle


def test_report_says_the_fallback_is_untrained(demo_result):
    text = demo_result.report.read_text(encoding="utf-8")
    assert "UNTRAINED" in text and "--no-train" in text and "weighted" in text
    assert demo_result.psnr is None and "truth" not in demo_result.row_boxes
