"""What the graph editor shows on each pack node, read from the server's /object_info as the frontend reads it."""
from __future__ import annotations

import pytest
from comfy_server import PromptRejected

P = "DiTCacheBridge_"
RECORDING_SETTINGS = {"seed", "steps", "cfg", "sampler_name", "scheduler", "denoise", "latent_image", "storage",
                      "storage_dtype", "mode"}


def inputs(info: dict) -> dict:
    return {name: spec for section in ("required", "optional") for name, spec in info["input"].get(section, {}).items()}


def order(info: dict) -> list:
    return [name for section in ("required", "optional") for name in info["input_order"].get(section, [])]


def test_capture_kv_cache_shows_only_what_live_capture_uses(comfy_server):
    names = set(inputs(comfy_server.object_info(P + "CaptureKVCache")))
    assert names == {"sharer", "positive", "negative", "middle", "layers", "refresh_every", "rope_alignment",
                     "grid_alignment", "projector", "refresh", "threshold", "budget", "max_reuse"}
    assert not names & RECORDING_SETTINGS


def test_record_kv_cache_takes_the_ksamplers_settings_in_its_order(comfy_server):
    record, ksampler = comfy_server.object_info(P + "RecordKVCache"), comfy_server.object_info("KSampler")
    widgets = ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    assert [n for n in order(record) if n in widgets] == [n for n in order(ksampler) if n in widgets]
    assert inputs(record)["latent_image"][0] == "LATENT"


def test_only_noise_seeds_get_a_control_after_generate_widget(comfy_server):
    def control(node_id):
        return inputs(comfy_server.object_info(node_id))["seed"][1].get("control_after_generate")

    assert control(P + "RecordKVCache") is True
    assert control(P + "BridgedKSampler") is True
    assert control(P + "CreateC2CProjector") is False     # an init seed: 'randomize' would rebuild it every run
    assert control(P + "TrainC2CProjector") is False      # a training seed: 'randomize' would retrain every run


def test_bridged_ksampler_starts_with_the_ksamplers_inputs_in_the_ksamplers_order(comfy_server):
    bridged, ksampler = comfy_server.object_info(P + "BridgedKSampler"), comfy_server.object_info("KSampler")
    expected = ["receiver" if n == "model" else n for n in order(ksampler)]
    assert order(bridged)[:len(expected)] == expected
    for name in ("seed", "steps", "cfg", "denoise"):
        assert inputs(bridged)[name][1]["default"] == inputs(ksampler)[name][1]["default"], name


def test_load_c2c_projector_without_a_listed_file_says_where_projector_files_go(comfy_server):
    """An empty choice (what an empty list sends) is answered with the folder, not the host's 'Invalid input'."""
    graph = {"1": {"class_type": P + "LoadC2CProjector", "inputs": {"projector_name": ""}},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.post_prompt(graph)
    (error,) = rejected.value.node_errors["1"]["errors"]
    assert error["details"].startswith("projector_name - Load C2C Projector: "), error
    assert "models/c2c_projectors/" in error["details"] and "press R" in error["details"], error


def test_an_input_error_is_named_for_the_pack_not_for_its_folder(comfy_server):
    """ComfyUI names an error by module and class; the pack's module path is a temp folder the reader cannot use."""
    import host

    graph = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": host.T2V_A, "weight_dtype": "default"}},
             "2": {"class_type": P + "CreateC2CProjector",
                   "inputs": {"sharer": ["1", 0], "receiver": ["1", 0], "kind": "weighted", "mapping": "identity",
                              "layers": "not a layer list", "alpha": 0.5, "hidden_dim": 0, "seed": 0}},
             "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    entry = comfy_server.wait(comfy_server.post_prompt(graph), timeout=120, check=False)
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["exception_type"] == "DiTCacheBridge.BridgeInputError", error["exception_type"]
    message = error["exception_message"]
    assert message.startswith("Create C2C Projector › layers: 'not a layer list'; expected a layer list. Fix: "), message
    assert message.count("accepted:") == 1 and message.count("Fix:") == 1, f"the fix given twice: {message}"
