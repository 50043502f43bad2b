"""Save KV Cache and Load KV Cache: persist a recording so one sharer run feeds many receiver runs.

Saves never replace a file (the counter advances past every existing ``prefix_NNNNN``), stream disk
recordings from disk to disk and go through a temp file renamed into place. Load KV Cache's cache
key includes the file's identity, so a replaced file is read again, never mixed with the old one.
"""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from c2c_core import BundleError, align
from c2c_core.errors import cut, quote
from c2c_core.recording import load_recording, save_recording
from ..c2c_comfy import files
from ..c2c_comfy.errors import BridgeInputError, check
from ..c2c_comfy.recorded import RecordedSharer
from ..c2c_comfy.validate import check_inputs
from .capture import DEFAULT_REFRESH, refresh_inputs, refresh_policy
from .types import CATEGORY, KVSource

SUBFOLDER = "kv_cache"


def recordings_folder() -> str:
    return os.path.join(folder_paths.get_output_directory(), SUBFOLDER)


GRID_ALIGNMENTS = list(align.GRID_ALIGNMENTS)


def recording_files() -> list[str]:
    """Recordings in output/kv_cache/, sub-folders included (Save KV Cache's prefix may name one)."""
    return files.listed(recordings_folder())


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
        check(isinstance(kv_source, RecordedSharer), cls.NODE, "kv_source", "a live K/V source",
              "a recording", "feed it from Record KV Cache (Capture KV Cache is live)")
        subfolder, name = files.checked_prefix(cls.NODE, "filename_prefix", filename_prefix)
        path = files.save_in(cls.NODE, "filename_prefix", recordings_folder(), subfolder, name,
                             lambda p: save_recording(p, kv_source.recording))
        return io.NodeOutput(kv_source, ui={"kv_cache": [{"filename": path.name, "type": "output",
                                                          "subfolder": "/".join(filter(None, (SUBFOLDER, subfolder)))}]})


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
                    io.Combo.Input("grid_alignment", options=GRID_ALIGNMENTS, default="refuse",
                                   tooltip="What to do when the receiver's latent grid differs from the recording's.")]
                   + refresh_inputs(),
            outputs=[KVSource.Output(tooltip="A K/V source for Fuse Caches.")],
        )

    @classmethod
    def fingerprint_inputs(cls, kv_cache, **kwargs):
        """Re-run when the file under the name changes (replaced, rewritten, removed)."""
        path = files.inside(recordings_folder(), kv_cache)
        return files.fingerprint(path) if path else "invalid"

    @classmethod
    def execute(cls, kv_cache, refresh_every=1, grid_alignment="refuse", refresh="every",
                threshold=DEFAULT_REFRESH.threshold, budget=DEFAULT_REFRESH.budget,
                max_reuse=DEFAULT_REFRESH.max_reuse) -> io.NodeOutput:
        check(grid_alignment in GRID_ALIGNMENTS, cls.NODE, "grid_alignment", quote(grid_alignment, 60),
              f"one of {GRID_ALIGNMENTS}", "pick a value from the list")
        check(type(refresh_every) is int and 1 <= refresh_every <= 1000, cls.NODE, "refresh_every",
              quote(refresh_every, 60), "an integer from 1 to 1000", "1 replays every step; k reuses a step k times")
        check_inputs(cls, {"refresh": refresh, "threshold": threshold, "budget": budget, "max_reuse": max_reuse})
        policy = refresh_policy(cls.NODE, refresh, refresh_every, threshold, budget, max_reuse)
        path = files.inside(recordings_folder(), kv_cache)
        check(path is not None, cls.NODE, "kv_cache", f"the name {quote(kv_cache, 80)}",
              "a recording inside output/kv_cache/", "pick a file from the list")
        try:
            recording = load_recording(path)
        except (BundleError, FileNotFoundError) as e:
            raise BridgeInputError(cls.NODE, "kv_cache", cut(str(e)), "a recording saved by Save KV Cache",
                                   "pick another file, or record again") from e
        return io.NodeOutput(RecordedSharer(recording, recording.signature, recording.layers, policy,
                                            "auto", grid_alignment, cls.NODE))
