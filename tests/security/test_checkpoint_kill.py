"""kill -9 while training checkpoints are written: every checkpoint left is complete and loadable,
the newest complete one resumes, and a later save removes the dead writer's temp files."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from c2c_core import load_bundle, read_meta
from c2c_core.bundle import remove_stale_temp_files
from c2c_core.checkpoint import TRAINER_STATE_KEY, find_checkpoint

WRITER = Path(__file__).with_name("checkpoint_writer.py")


def test_kill_9_during_checkpointing_leaves_only_complete_checkpoints(tmp_path):
    writer = subprocess.Popen([sys.executable, str(WRITER), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):                       # a few checkpoints, so pruning has run
            assert writer.stdout.readline(), "the writer died"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(p.suffix == ".tmp" for p in tmp_path.iterdir()):
            time.sleep(0.0005)
        os.kill(writer.pid, signal.SIGKILL)      # in the middle of a write (a temp file exists)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    temps = [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
    assert temps, "the kill should have landed during a write"
    states = sorted(tmp_path.glob("step_*.state.safetensors"))
    assert 1 <= len(states) <= 3                 # keep_last=3 (one more bundle may await its state file)
    for state in states:
        meta = read_meta(state, TRAINER_STATE_KEY)
        load_bundle(tmp_path / meta["bundle"])
    assert find_checkpoint(tmp_path) == states[-1]
    for bundle in tmp_path.glob("step_*[0-9].safetensors"):   # a bundle written before the kill loads too
        load_bundle(bundle)
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(temps)
