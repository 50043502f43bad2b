"""The test harness itself: the ComfyUI host, the tiny models, in-process sampling and the server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import host

pytestmark = pytest.mark.slow      # servers, the tiny model maker in a subprocess

TINY_SHAPE = dict(width=64, height=64, length=5)  # latent (1, 16, 2, 8, 8): 32 tokens
EXPECTED_CLASS = {
    host.T2V_A: "WAN21_T2V",
    host.T2V_B: "WAN21_T2V",
    host.I2V: "WAN21_I2V",
    host.T2V_WIDE: "WAN21_T2V",
}


def empty_latent(batch: int = 1) -> dict:
    frames = (TINY_SHAPE["length"] - 1) // 4 + 1
    return {"samples": torch.zeros(batch, 16, frames, TINY_SHAPE["height"] // 8, TINY_SHAPE["width"] // 8)}


def sample_in_process(model_file: str, positive, negative, seed: int = 7, steps: int = 3, cfg: float = 2.0):
    import nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    model = nodes.UNETLoader().load_unet(model_file, "default")[0]
    model = ModelSamplingSD3().patch(model, 8.0)[0]
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", positive, negative, empty_latent())[0]["samples"]


def i2v_inputs(seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(empty_latent()["samples"].shape, generator=gen)
    clip_fea = host.clip_vision_features(seed)
    positive = host.i2v_conditioning(host.wan_conditioning(1), start, clip_fea)
    negative = host.i2v_conditioning(host.wan_conditioning(2), start, clip_fea)
    return positive, negative


def sampling_graph(model_file: str, seed: int = 7, steps: int = 3, cfg: float = 2.0) -> dict:
    """UNETLoader -> ModelSamplingSD3 -> KSampler (test-node conditioning, empty video latent) -> SaveLatent."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": model_file, "weight_dtype": "default"}},
        "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 8.0}},
        "3": {"class_type": "DCBTestWanConditioning", "inputs": {"seed": 1, "length": 8, "batch_size": 1}},
        "4": {"class_type": "DCBTestWanConditioning", "inputs": {"seed": 2, "length": 8, "batch_size": 1}},
        "5": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {**TINY_SHAPE, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"host_test/{model_file}"}},
    }


# --- host lookup and server lifecycle (no real ComfyUI needed) ----------------------------------

FAKE_SERVER = """
import http.server, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Type", "application/json"); self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
print("fake ComfyUI listening", flush=True)
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def fake_comfyui(root: Path, main_py: str) -> Path:
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text(main_py)
    return root


def test_comfyui_path_prefers_comfyui_path_env(monkeypatch, tmp_path):
    tree = fake_comfyui(tmp_path / "MyComfy", "")
    monkeypatch.setenv("COMFYUI_PATH", str(tree))
    assert host.comfyui_path() == tree.resolve()


def test_missing_host_skips_outside_ci(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(host.install_host, "INSTALLED_COMFYUI", tmp_path / "absent")
    with pytest.raises(pytest.skip.Exception, match="make host"):
        host.require_comfyui()


def test_missing_host_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(host.install_host, "INSTALLED_COMFYUI", tmp_path / "absent")
    with pytest.raises(pytest.fail.Exception):
        host.require_comfyui()


def test_comfyui_path_that_is_no_comfyui_tree_fails(monkeypatch, tmp_path):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="not a ComfyUI tree"):
        host.require_comfyui()


def test_server_that_exits_at_startup_reports_its_log(tmp_path):
    tree = fake_comfyui(tmp_path / "Comfy", "import sys\nprint('boom: no such node', flush=True)\nsys.exit(3)\n")
    server = host.ComfyServer(tmp_path / "run", tmp_path / "models", comfyui=tree, install_pack=False)
    with pytest.raises(RuntimeError, match="boom: no such node"):
        server.__enter__()
    assert not server.running


def test_server_is_stopped_when_the_with_block_raises(tmp_path):
    tree = fake_comfyui(tmp_path / "Comfy", FAKE_SERVER)
    with pytest.raises(ValueError):
        with host.ComfyServer(tmp_path / "run", tmp_path / "models", comfyui=tree, install_pack=False) as server:
            pid = server._process.pid
            assert (server.custom_nodes_dir / "dit_cache_bridge_test_nodes.py").resolve() == host.TEST_NODES_FILE
            raise ValueError("test body failed")
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_server_folder_links_the_pack_and_names_the_models_root(tmp_path):
    server = host.ComfyServer(tmp_path / "run", tmp_path / "models", comfyui=tmp_path)
    yaml_text = server._prepare_folders().read_text()
    assert (server.custom_nodes_dir / host.PACK_NAME).resolve() == host.REPO_ROOT
    assert f"base_path: {(tmp_path / 'models').resolve()}" in yaml_text
    assert "    diffusion_models: diffusion_models" in yaml_text
    assert f"custom_nodes: {server.custom_nodes_dir}" in yaml_text


# --- tools ----------------------------------------------------------------------------------------

def test_host_requirements_leave_out_the_venvs_torch_and_the_template_media(comfyui_root):
    kept, dropped = host.install_host.filtered_requirements(comfyui_root / "requirements.txt", with_templates=False)
    names = {host.install_host.requirement_name(line) for line in kept}
    assert {"torch", "torchvision", "comfyui-workflow-templates"} <= set(dropped)
    assert not names & {"torch", "torchvision", "comfyui-workflow-templates"}
    assert {"torchaudio", "comfyui-frontend-package", "transformers", "safetensors", "aiohttp"} <= names


def test_host_sees_the_frontend_and_torch_it_was_installed_with(comfy):
    """An extra host's own pins (site folder) shadow the venv's; torch stays the venv's."""
    from importlib import metadata

    import torch as venv_torch

    pins = {host.install_host.requirement_name(line): line.split("==", 1)[1]
            for line in (comfy.path / "requirements.txt").read_text().splitlines() if "==" in line}
    assert metadata.version("comfyui-frontend-package") == pins["comfyui-frontend-package"]
    assert Path(venv_torch.__file__).resolve().is_relative_to(Path(sys.prefix).resolve())


def test_split_requirements_adds_missing_and_isolates_other_versions():
    missing, other = host.install_host.split_requirements(
        ["torch", "no-such-package-dcb==1.0", f"torch=={host.install_host.installed_version('torch')}", "torch==0.0.1", "pytest>=1",
         'no-such-package-dcb-2; python_version < "3"'])
    assert missing == ["no-such-package-dcb==1.0"]
    assert other == ["torch==0.0.1"]


def test_extra_hosts_are_found_by_tarball_name_and_unpacked_whole(tmp_path, monkeypatch):
    import tarfile

    source = fake_comfyui(tmp_path / "comfy-9.1.0", "")
    (source / "comfyui_version.py").write_text('__version__ = "9.1.0"\n')
    with tarfile.open(tmp_path / "comfyui-9.1.0.tar.gz", "w:gz") as tf:
        tf.add(source, arcname="comfy-9.1.0")
    (tmp_path / "comfyui-latest.tar.gz").write_bytes(b"")           # no version in the name: ignored
    assert host.install_host.extra_tarballs(tmp_path) == {"9.1.0": tmp_path / "comfyui-9.1.0.tar.gz"}
    assert host.install_host.extra_tarballs(tmp_path / "absent") == {}
    monkeypatch.setattr(host.install_host, "HOST_DIR", tmp_path / "hostdir")
    monkeypatch.setattr(host.install_host, "REPO_ROOT", tmp_path)
    tree = tmp_path / "hostdir" / "ComfyUI-9.1.0"
    host.install_host.extract_tarball(tmp_path / "comfyui-9.1.0.tar.gz", tree)
    assert host.install_host.comfyui_version(tree) == "9.1.0" and host.install_host.is_comfyui_tree(tree)
    assert host.install_host.host_paths(tree) == [str(tree)]
    (tree / host.install_host.SITE_FOLDER).mkdir()
    assert host.install_host.host_paths(tree) == [str(tree), str(tree / host.install_host.SITE_FOLDER)]
    assert [p.name for p in (tmp_path / "hostdir").iterdir()] == ["ComfyUI-9.1.0"]   # no partial folder left


def test_trees_to_test_is_comfyui_path_alone_when_set(monkeypatch, tmp_path):
    tree = fake_comfyui(tmp_path / "MyComfy", "")
    monkeypatch.setenv("COMFYUI_PATH", str(tree))
    assert host.install_host.trees_to_test() == [tree.resolve()]


def test_tiny_model_maker_is_deterministic(tiny_models, tmp_path):
    subprocess.run([sys.executable, str(host.TOOLS_DIR / "make_tiny_models.py"), "--out", str(tmp_path),
                    "--only", "tiny_wan_t2v_a", "tiny_wan_i2v"], check=True, capture_output=True)
    for name in (host.T2V_A, host.I2V):
        made_again = (tmp_path / "diffusion_models" / name).read_bytes()
        assert made_again == tiny_models.path(name).read_bytes(), f"{name}: same seed gave different bytes"


def test_tiny_model_maker_skips_up_to_date_files_quickly(tiny_models):
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(host.TOOLS_DIR / "make_tiny_models.py"), "--out", str(tiny_models.root)],
                            check=True, capture_output=True, text=True)
    assert time.monotonic() - started < 2.0
    assert result.stdout.count("[make_tiny_models] up to date") == len(host.TINY_MODEL_FILES)
    assert "wrote" not in result.stdout, result.stdout     # the GGUF and Qwen makers skip theirs too


def test_tiny_models_with_different_seeds_share_keys_and_shapes_but_not_weights(tiny_models):
    a, b = load_file(tiny_models.path(host.T2V_A)), load_file(tiny_models.path(host.T2V_B))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert not torch.equal(a["blocks.0.self_attn.k.weight"], b["blocks.0.self_attn.k.weight"])
    assert all(torch.isfinite(t).all() for t in a.values())


# --- conditioning helpers -------------------------------------------------------------------------

def test_wan_conditioning_is_a_seeded_umt5_shaped_context():
    cond = host.wan_conditioning(3, length=5, batch=2)
    assert len(cond) == 1 and cond[0][1] == {}
    assert cond[0][0].shape == (2, 5, 4096) and cond[0][0].dtype == torch.float32
    assert torch.equal(cond[0][0], host.wan_conditioning(3, length=5, batch=2)[0][0])
    assert not torch.equal(cond[0][0], host.wan_conditioning(4, length=5, batch=2)[0][0])


def test_i2v_conditioning_sets_what_wan_image_to_video_sets(comfy):
    latent = torch.randn(1, 16, 3, 8, 8)
    clip_fea = host.clip_vision_features(0)
    base = host.wan_conditioning(0)
    cond = host.i2v_conditioning(base, latent, clip_fea, known_frames=1)
    extra = cond[0][1]
    assert base[0][1] == {}, "the input conditioning must not be modified"
    assert extra["concat_latent_image"] is latent
    assert extra["concat_mask"].shape == (1, 1, 3, 8, 8)
    assert extra["concat_mask"][:, :, 0].eq(0).all() and extra["concat_mask"][:, :, 1:].eq(1).all()
    assert extra["clip_vision_output"].penultimate_hidden_states.shape == (1, 257, 1280)


# --- in-process ComfyUI ---------------------------------------------------------------------------

def test_in_process_nodes_module_is_comfyuis_not_the_packs(comfy):
    import nodes

    assert Path(nodes.__file__).resolve() == comfy.path / "nodes.py"
    # what the pack itself uses, whatever other tests later put in front of sys.path
    from bridge_helpers import pack_nodes
    pack_nodes()
    from dit_cache_bridge.c2c_comfy import compat
    assert Path(compat.comfy_nodes().__file__).resolve() == comfy.path / "nodes.py"


def test_in_process_comfy_runs_on_the_cpu(comfy):
    import comfy.model_management as mm

    assert mm.get_torch_device() == torch.device("cpu")


@pytest.mark.parametrize("model_file", list(EXPECTED_CLASS))
def test_tiny_model_loads_through_stock_loader_as_intended_class(comfy, tiny_models, model_file):
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model(str(tiny_models.path(model_file)))
    spec = tiny_models.spec(model_file)
    assert type(patcher.model.model_config).__name__ == EXPECTED_CLASS[model_file]
    assert type(patcher.model).__name__ == "WAN21"
    assert patcher.model.image_to_video == (spec["model_type"] == "i2v")
    diffusion_model = patcher.model.diffusion_model
    assert (diffusion_model.dim, diffusion_model.num_heads, len(diffusion_model.blocks), diffusion_model.in_dim) == \
        (spec["dim"], spec["num_heads"], spec["num_layers"], spec["in_dim"])
    assert (diffusion_model.img_emb is not None) == (spec["model_type"] == "i2v")


def test_unet_loader_finds_tiny_models_in_registered_folder(comfy):
    import folder_paths

    names = folder_paths.get_filename_list("diffusion_models")
    assert set(host.TINY_MODEL_FILES) <= set(names)


@pytest.mark.parametrize("model_file", [host.T2V_A, host.T2V_B, host.T2V_WIDE])
def test_in_process_ksampler_gives_finite_nondegenerate_latent(comfy, tiny_models, model_file):
    samples = sample_in_process(model_file, host.wan_conditioning(1), host.wan_conditioning(2))
    assert samples.shape == empty_latent()["samples"].shape
    assert torch.isfinite(samples).all()
    assert samples.std() > 0.1


def test_in_process_ksampler_on_i2v_model_uses_image_conditioning(comfy, tiny_models):
    positive, negative = i2v_inputs()
    with_image = sample_in_process(host.I2V, positive, negative)
    without_image = sample_in_process(host.I2V, host.wan_conditioning(1), host.wan_conditioning(2))
    assert torch.isfinite(with_image).all() and with_image.std() > 0.1
    assert not torch.allclose(with_image, without_image)


@pytest.mark.smoke
def test_in_process_sampling_is_deterministic(comfy, tiny_models):
    first = sample_in_process(host.T2V_A, host.wan_conditioning(1), host.wan_conditioning(2))
    second = sample_in_process(host.T2V_A, host.wan_conditioning(1), host.wan_conditioning(2))
    assert torch.equal(first, second)


@pytest.mark.smoke
def test_load_pack_imports_repo_as_dit_cache_bridge(comfy):
    pack = host.load_pack()
    assert pack.__name__ == host.PACK_NAME
    assert Path(pack.__file__).resolve() == host.REPO_ROOT / "__init__.py"
    assert Path(sys.modules["nodes"].__file__).resolve() == comfy.path / "nodes.py"


# --- ComfyUI server -------------------------------------------------------------------------------

def test_server_lists_stock_and_test_nodes(comfy_server):
    info = comfy_server.object_info()
    assert {"KSampler", "UNETLoader", "ModelSamplingSD3", "EmptyHunyuanLatentVideo", "SaveLatent"} <= set(info)
    assert {"DCBTestWanConditioning", "DCBTestWanImageConditioning"} <= set(info)
    assert len(info) > 400


def test_server_offers_tiny_models_to_unet_loader(comfy_server):
    choices = comfy_server.object_info("UNETLoader")["input"]["required"]["unet_name"][0]
    assert set(host.TINY_MODEL_FILES) <= set(choices)


@pytest.mark.smoke
def test_server_loads_the_pack_without_import_errors(comfy_server):
    failures = [line for line in comfy_server.log_text().splitlines()
                if host.PACK_NAME in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert not failures, "\n".join(failures)


def test_server_rejects_invalid_graph_with_node_errors(comfy_server):
    graph = sampling_graph("no_such_model.safetensors")
    with pytest.raises(host.PromptRejected) as rejected:
        comfy_server.post_prompt(graph)
    assert "1" in rejected.value.node_errors


@pytest.mark.parametrize("model_file", [host.T2V_A, host.I2V])
def test_server_sampling_matches_in_process_sampling(comfy_server, comfy, model_file):
    entry = comfy_server.run(sampling_graph(model_file), timeout=180)
    [latent_file] = comfy_server.output_files(entry, "7", "latents")
    served = load_file(latent_file)["latent_tensor"]
    in_process = sample_in_process(model_file, host.wan_conditioning(1), host.wan_conditioning(2))
    assert torch.isfinite(served).all()
    torch.testing.assert_close(served, in_process, rtol=1e-4, atol=1e-4)


def test_server_runs_image_conditioning_test_node_on_i2v_model(comfy_server):
    graph = sampling_graph(host.I2V)
    graph["8"] = {"class_type": "DCBTestWanImageConditioning",
                  "inputs": {"conditioning": ["3", 0], "start_latent": ["5", 0], "clip_seed": 3, "known_frames": 1}}
    graph["6"]["inputs"]["positive"] = ["8", 0]
    entry = comfy_server.run(graph, timeout=180)
    [latent_file] = comfy_server.output_files(entry, "7", "latents")
    assert torch.isfinite(load_file(latent_file)["latent_tensor"]).all()


def test_server_interrupt_stops_a_running_prompt(comfy_server):
    import requests

    prompt_id = comfy_server.post_prompt(sampling_graph(host.T2V_WIDE, steps=5000))
    deadline = time.monotonic() + 60
    while not requests.get(f"{comfy_server.url}/queue", timeout=10).json()["queue_running"]:
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.05)
    time.sleep(1.0)  # past the start of execution, which clears any earlier interrupt flag
    comfy_server.interrupt()
    entry = comfy_server.wait(prompt_id, timeout=60, check=False)
    assert entry["status"]["status_str"] == "error"
    assert any(message[0] == "execution_interrupted" for message in entry["status"]["messages"])
