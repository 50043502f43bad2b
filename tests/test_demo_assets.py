"""The demo's trained default, made in the --quick setting: files load, the stamp makes a second call
instant, and the demo graph runs on them end to end (the full-size training is `make demo`'s job).

The quick assets are trained once into .models/demo-quick (or DCB_DEMO_QUICK_ROOT) and stamped: later
runs, and the run on the next host, find the stamp and only re-link them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import host

demo = host._load_tool("demo")
assets = host._load_tool("make_demo_assets")

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def quick_root(tiny_models):
    root = Path(os.environ.get("DCB_DEMO_QUICK_ROOT", assets.QUICK_ROOT))
    result = subprocess.run([sys.executable, str(host.TOOLS_DIR / "make_demo_assets.py"), "--root", str(root),
                             "--quick"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    stamp = json.loads(result.stdout.strip().splitlines()[-1])
    return root, stamp


def test_assets_are_linked_into_the_servers_model_folders(quick_root):
    root, stamp = quick_root
    assert stamp["links"] == {role: str(path) for role, path in assets.linked_paths(root).items()}
    for path in assets.linked_paths(root).values():
        assert path.is_symlink() and path.resolve().parent == (root / assets.SUBFOLDER).resolve()
        assert path.resolve().is_file()


def test_second_call_finds_the_stamp_and_trains_nothing(quick_root):
    root, stamp = quick_root
    assert assets.up_to_date(root, quick=True)["made"] == stamp["made"]
    assert assets.up_to_date(root, quick=False) is None        # the full recipe is another stamp


def test_trained_models_load_as_unet_loader_loads_them(comfy, quick_root):
    import comfy.sd

    root, _ = quick_root
    links = assets.linked_paths(root)
    for role, start in (("receiver", host.T2V_A), ("sharer", host.I2V)):
        spec = host.TinyModels.spec(start)
        model = comfy.sd.load_diffusion_model(str(links[role])).model.diffusion_model   # UNETLoader's call
        assert (model.dim, len(model.blocks), model.in_dim) == (spec["dim"], spec["num_layers"], spec["in_dim"])


def test_trained_projector_bundle_loads_for_every_receiver_layer(comfy, quick_root):
    host.load_pack()
    from c2c_core import load_bundle

    root, _ = quick_root
    bundle = load_bundle(assets.linked_paths(root)["projector"])
    assert list(bundle.layer_map.layers) == list(range(host.TinyModels.spec(host.T2V_A)["num_layers"]))


def test_demo_runs_on_the_trained_default_with_a_ground_truth_row(quick_root, tmp_path):
    root, stamp = quick_root
    trained = demo.TrainedDefault.from_stamp(stamp)
    settings = demo.DemoSettings(**{**demo.DemoSettings.trained().__dict__, "steps": 2, "videos": (0, 1)})
    result = demo.run_demo(tmp_path / "demo", settings, log=lambda message: None, trained=trained, models_root=root)
    assert all(run.latent.shape == (2, 16, 3, 8, 8) for run in result.runs)
    assert set(result.row_boxes) == {"truth", "receiver", "sharer", "bridged", "difference"}
    assert set(result.psnr) == {"receiver", "sharer", "bridged"} and all(len(v) == 2 for v in result.psnr.values())
    text = result.report.read_text(encoding="utf-8")
    assert "first-frame PSNR" in text and trained.projector in text
