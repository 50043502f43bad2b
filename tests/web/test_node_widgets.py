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
    assert names == {"sharer", "positive", "negative", "layers", "refresh_every", "rope_alignment", "grid_alignment",
                     "projector"}
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


def test_an_empty_load_c2c_projector_says_where_projector_files_go(comfy_server):
    """The test server has no projector files: the list is empty, and the answer is where they go, not 'Invalid input'."""
    graph = {"1": {"class_type": P + "LoadC2CProjector", "inputs": {"projector_name": ""}},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    with pytest.raises(PromptRejected) as rejected:
        comfy_server.post_prompt(graph)
    (error,) = rejected.value.node_errors["1"]["errors"]
    assert "no projector in models/c2c_projectors/" in error["details"], error
    assert "Train C2C Projector" in error["details"] and "Create C2C Projector" in error["details"], error
