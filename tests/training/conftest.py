"""Fixtures for the projector-training tests: tiny models loaded the way a ComfyUI node loads them,
seeded sample folders, and one CPU thread (on a shared 2-core machine OpenMP's second thread makes
small matmuls an order of magnitude slower; the setting is restored after each test).
"""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

LATENT_SHAPE = (1, 16, 3, 8, 8)     # 3 latent frames of 8x8 -> 48 tokens


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pack(comfy):
    from bridge_helpers import pack_nodes
    return pack_nodes()


@pytest.fixture(scope="session")
def training(pack):
    return importlib.import_module("dit_cache_bridge.c2c_comfy.training")


@pytest.fixture(scope="session")
def train(pack):
    """c2c_core's loop side (TrainSettings, trainable_copy), as the pack imports it."""
    return importlib.import_module("c2c_core.train")


@pytest.fixture(scope="session")
def samples(pack):
    """c2c_core's sample files, as the pack imports them."""
    return importlib.import_module("c2c_core.samples")


@pytest.fixture(scope="session")
def models(tiny_models, comfy):
    """Tiny models loaded under inference_mode, as UNETLoader does inside a ComfyUI prompt."""
    import host
    from bridge_helpers import load_model
    with torch.inference_mode():
        return {"a": load_model(tiny_models.path(host.T2V_A)), "b": load_model(tiny_models.path(host.T2V_B)),
                "i2v": load_model(tiny_models.path(host.I2V)), "wide": load_model(tiny_models.path(host.T2V_WIDE))}


def make_projector(pack, sharer, receiver, kind="c2c", mapping="identity", layers="all", hidden_dim=64, seed=0):
    with torch.inference_mode():     # as the Create C2C Projector node runs inside a prompt
        return pack.CreateC2CProjector.execute(sharer, receiver, kind, mapping, layers, 0.5, hidden_dim, seed).args[0]


def t2v_samples(training, folder: Path, count: int = 4, seed: int = 0) -> Path:
    """``count`` seeded samples with plain text conditioning for both models."""
    from comfy_test_nodes import wan_conditioning
    for i in range(count):
        latent = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(seed * 1000 + i))
        training.save_training_samples(folder, latent, {
            "receiver_positive": wan_conditioning(100 + i), "receiver_negative": wan_conditioning(7, length=5),
            "sharer_positive": wan_conditioning(200 + i), "sharer_negative": wan_conditioning(8, length=5)})
    return folder


def i2v_samples(training, folder: Path, count: int = 3) -> Path:
    """Samples whose sharer conditioning carries the first latent frame and CLIP-vision features."""
    from comfy_test_nodes import clip_vision_features, i2v_conditioning, wan_conditioning
    for i in range(count):
        latent = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(50 + i))
        start = torch.zeros(LATENT_SHAPE)
        start[:, :, :1] = latent[:, :, :1]
        clip = clip_vision_features(300 + i)
        training.save_training_samples(folder, latent, {
            "receiver_positive": wan_conditioning(100 + i), "receiver_negative": wan_conditioning(7, length=5),
            "sharer_positive": i2v_conditioning(wan_conditioning(200 + i), start, clip),
            "sharer_negative": i2v_conditioning(wan_conditioning(8, length=5), start, clip)})
    return folder


def weights_of(patcher) -> dict:
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


@pytest.fixture(scope="session")
def helpers():
    """The helper functions above, for the test modules (conftest is not importable by name)."""
    from types import SimpleNamespace
    return SimpleNamespace(make_projector=make_projector, t2v_samples=t2v_samples, i2v_samples=i2v_samples,
                           weights_of=weights_of, LATENT_SHAPE=LATENT_SHAPE)
