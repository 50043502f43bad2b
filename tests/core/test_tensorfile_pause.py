"""c2c_core.tensorfile's test pause: what the kill -9 tests (tests/security/test_server_robustness.py) rely on."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from c2c_core.tensorfile import PAUSE_ENV, PAUSE_FILE, load_tensors, save_tensors_with_meta

TENSORS = {"w": torch.arange(4096, dtype=torch.float32)}


def wait_for(pattern, folder, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found
        time.sleep(0.01)
    raise TimeoutError(pattern)


def test_an_armed_write_pauses_half_way_and_completes_when_let_go(tmp_path, monkeypatch):
    monkeypatch.setenv(PAUSE_ENV, "1")
    (tmp_path / PAUSE_FILE).touch()
    path = tmp_path / "x.safetensors"
    writer = threading.Thread(target=save_tensors_with_meta, args=(path, TENSORS, {"a": 1}, "k"))
    writer.start()
    try:
        (marker,) = wait_for("*.tmp.paused", tmp_path)
        (temp,) = tmp_path.glob("*.tmp")
        assert not path.exists()                       # paused before publishing …
        assert 0 < temp.stat().st_size < TENSORS["w"].numel() * 4   # … with half a file, as a kill would leave it
    finally:
        (tmp_path / PAUSE_FILE).unlink()
        for m in tmp_path.glob("*.tmp.paused"):
            m.unlink()
        writer.join(timeout=30)
    assert torch.equal(load_tensors(path, ["w"])["w"], TENSORS["w"])   # let go: the whole file, published
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("env, armed", [("1", False), ("", True)])
def test_a_write_pauses_only_with_the_variable_and_the_file(tmp_path, monkeypatch, env, armed):
    monkeypatch.setenv(PAUSE_ENV, env)
    if armed:
        (tmp_path / PAUSE_FILE).touch()
    save_tensors_with_meta(tmp_path / "x.safetensors", TENSORS, {"a": 1}, "k")   # returns: no pause
    assert torch.equal(load_tensors(tmp_path / "x.safetensors", ["w"])["w"], TENSORS["w"])
