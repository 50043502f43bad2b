"""K/V recordings: a sharer's self-attention K/V over a whole sampling run, for replay.

Recorded (low-VRAM) mode samples the sharer alone first, keeping the chosen layers' K/V per step and
CFG pass, then replays them into the receiver's run, so only one model is resident at a time. Three
parts, one job each: ``format.py`` (tensor names, storage encoding, the saved file and its strict
load), ``store.py`` (RAM or disk while recording, byte accounting, the background writer) and
``replay.py`` (the reader that hands K/V to the receiver's device).
"""
from .format import (RECORDING_KEY, RECORDING_VERSION, STORAGE_DTYPES, KVRecording, MissingStepError, decode, encode,
                     load_recording, save_recording, tensor_name)
from .replay import ReplayReader
from .store import DiskStore, RamStore, RecordingWriteError, pinnable

__all__ = ["RECORDING_KEY", "RECORDING_VERSION", "STORAGE_DTYPES", "KVRecording", "MissingStepError", "decode", "encode",
           "load_recording", "save_recording", "tensor_name", "ReplayReader", "DiskStore", "RamStore",
           "RecordingWriteError", "pinnable"]
