"""Wan weights between diffusers' key layout and ComfyUI's, without a ComfyUI host."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from c2c_diffusers import BridgeSetupError, convert

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("make", [tiny.wan, tiny.chronoedit])
def test_diffusers_to_comfy_and_back_is_exact(make):
    model = make(5)
    comfy = convert.to_comfy(model.state_dict())
    assert "blocks.0.self_attn.k.weight" in comfy and "head.modulation" in comfy
    back = convert.to_diffusers(comfy)
    assert sorted(back) == sorted(model.state_dict())
    assert all(torch.equal(back[k], t) for k, t in model.state_dict().items())


def test_config_read_from_comfy_weights_rebuilds_the_model():
    model = tiny.chronoedit(5)
    rebuilt = convert.from_comfy(convert.to_comfy(model.state_dict()), cls=type(model))
    x = torch.cat([tiny.latent(0), tiny.latent(1, channels=20)], dim=1)
    inputs = dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=tiny.embeds(3, tokens=512),
                  encoder_hidden_states_image=tiny.embeds(4, tokens=3, dim=1280), return_dict=False)
    with torch.no_grad():
        assert torch.equal(rebuilt(**inputs)[0], model(**inputs)[0])


def test_keys_of_other_wan_variants_are_refused_by_name():
    weights = dict(tiny.wan(5).state_dict(), **{"vace_blocks.0.proj_out.weight": torch.zeros(1)})
    with pytest.raises(BridgeSetupError, match=r"'vace_blocks.0.proj_out.weight' has no ComfyUI Wan counterpart"):
        convert.to_comfy(weights)


def test_cli_converts_a_file_both_ways(tmp_path):
    model = tiny.wan(5)
    src = tmp_path / "diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src)
    run = lambda *a: subprocess.run([sys.executable, "tools/convert_wan_weights.py", *map(str, a)], cwd=ROOT,
                                    capture_output=True, text=True)
    out = run(src, tmp_path / "comfy.safetensors")
    assert out.returncode == 0, out.stderr
    assert "to ComfyUI layout" in out.stdout
    comfy = load_file(tmp_path / "comfy.safetensors")
    assert "blocks.1.cross_attn.o.weight" in comfy
    out = run(tmp_path / "comfy.safetensors", tmp_path / "again.safetensors")
    assert out.returncode == 0 and "to diffusers layout" in out.stdout, out.stderr
    again = load_file(tmp_path / "again.safetensors")
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
    bad = run(tmp_path / "missing.safetensors", tmp_path / "x.safetensors")
    assert bad.returncode == 2 and "missing.safetensors" in bad.stderr
