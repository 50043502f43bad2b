"""Save KV Cache and Load KV Cache: persist a recording so one sharer run feeds many receiver runs."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..c2c_core import BundleError
from ..c2c_core.recording import load_recording, save_recording
from ..c2c_comfy.errors import BridgeInputError, check
from ..c2c_comfy.recorded import RecordedSource
from .types import CATEGORY, KVSource

SUBFOLDER = "kv_cache"


def recordings_folder() -> str:
    return os.path.join(folder_paths.get_output_directory(), SUBFOLDER)


def recording_files() -> list[str]:
    folder = recordings_folder()
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


class SaveKVCache(io.ComfyNode):
    NODE = "Save KV Cache"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTCacheBridge_SaveKVCache", display_name=cls.NODE, category=f"{CATEGORY}/recorded",
            description="Write a recorded K/V cache to output/kv_cache/ as one .safetensors file with metadata.",
            inputs=[KVSource.Input("kv_source", tooltip="From Record KV Cache."),
                    io.String.Input("filename_prefix", default="kv_cache",
                                    tooltip="File name prefix; a counter and .safetensors are appended.")],
            outputs=[KVSource.Output(tooltip="The same recording, to fuse right away.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, kv_source, filename_prefix) -> io.NodeOutput:
        check(isinstance(kv_source, RecordedSource), cls.NODE, "kv_source", "a live K/V source",
              "a recording", "feed it from Record KV Cache (Capture KV Cache is live)")
        full, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, recordings_folder())
        while os.path.exists(os.path.join(full, f"{name}_{counter:05}.safetensors")):
            counter += 1        # ComfyUI's counter only sees names ending in '_'; never write over a recording
        file = f"{name}_{counter:05}.safetensors"
        save_recording(os.path.join(full, file), kv_source.recording)
        return io.NodeOutput(kv_source, ui={"kv_cache": [{"filename": file, "subfolder": os.path.join(SUBFOLDER, subfolder),
                                                          "type": "output"}]})


class LoadKVCache(io.ComfyNode):
    NODE = "Load KV Cache"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTCacheBridge_LoadKVCache", display_name=cls.NODE, category=f"{CATEGORY}/recorded",
            description="Load a K/V recording saved by Save KV Cache; tensors are read step by step during replay.",
            inputs=[io.Combo.Input("kv_cache", options=recording_files(),
                                   tooltip="A recording in output/kv_cache/ (.safetensors only)."),
                    io.Int.Input("refresh_every", default=1, min=1, max=1000,
                                 tooltip="Reuse each replayed step's K/V for k steps."),
                    io.Combo.Input("grid_alignment", options=["refuse", "nearest", "trilinear"], default="refuse",
                                   tooltip="What to do when the receiver's latent grid differs from the recording's.")],
            outputs=[KVSource.Output(tooltip="A K/V source for Fuse Caches.")],
        )

    @classmethod
    def execute(cls, kv_cache, refresh_every=1, grid_alignment="refuse") -> io.NodeOutput:
        path = os.path.join(recordings_folder(), os.path.relpath(os.path.join("/", kv_cache), "/"))
        try:
            recording = load_recording(path)
        except (BundleError, FileNotFoundError) as e:
            raise BridgeInputError(cls.NODE, "kv_cache", str(e), "a recording saved by Save KV Cache",
                                   "pick another file, or record again") from e
        return io.NodeOutput(RecordedSource(recording, recording.signature, recording.layers, int(refresh_every),
                                            "auto", grid_alignment, cls.NODE))
