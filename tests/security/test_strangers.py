"""Files from strangers and long runs (issue 23, items 8 and 10), host-free: each refused with its exact
message, naming what was found, what was expected and the fix, and nothing written on refusal."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from c2c_core import LayerMap, ModelSignature, ProjectorBank, TrainConfig, load_bundle, save_bundle, train_bank
from c2c_core.arch import ArchTag
from c2c_core.errors import (DivergedError, InvalidMetadataError, NonFiniteWeightsError, ResumeError,
                             SignatureError)
from c2c_core.samples import Conditioning, SampleHost, TrainingDataError, TrainingSet, save_sample
from c2c_core.tensorfile import file_identity

ROOT = Path(__file__).resolve().parents[2]
SIG = ModelSignature(2, 2, 4)
MAP = LayerMap.build("identity", 2, 2)


def tag_of(**overrides) -> dict:
    good = ArchTag.from_config(dim=8, ffn_dim=32, num_heads=2, num_layers=2, in_channels=16, out_channels=16,
                               text_dim=32, image_embedding=False, patch_size=(1, 2, 2), rope_axes=(4, 2, 2))
    return good.to_dict() | overrides


# -- item 10: identity and text ---------------------------------------------------------------------

@pytest.mark.parametrize("family, shown", [
    ("wan\x1b[31mred", r"'wan\x1b[31mred'"),
    ("wan\u202eevil", r"'wan\u202eevil'"),
    ("wan\nINFO fake log line", r"'wan\nINFO fake log line'"),
    ("Wan2.1", "'Wan2.1'"),
])
def test_an_architecture_tag_outside_its_alphabet_is_refused_and_quoted_escaped(family, shown):
    with pytest.raises(SignatureError) as info:
        ArchTag.from_dict(tag_of(family=family))
    message = str(info.value)
    assert message == (f"architecture tag family is {shown}; expected 1-40 of a-z, 0-9, '.', '_', '-' (starting "
                       f"with a letter or digit).")
    assert not any(ord(c) < 32 or c == "\u202e" for c in message)


def test_a_bundle_whose_tag_carries_control_characters_is_refused_before_any_tensor(tmp_path):
    sig = ModelSignature(2, 2, 4, arch=ArchTag.from_dict(tag_of()))
    save_bundle(tmp_path / "t.safetensors", ProjectorBank.build("full", sig, sig, MAP.layers, hidden_dim=4), MAP)
    path = edit_meta(tmp_path / "t.safetensors", "c2c_bundle",
                     lambda m: m["sharer"]["arch"].update(variant="t2v\x1b]0;pwned\x07"))
    with pytest.raises(InvalidMetadataError) as info:
        load_bundle(path)
    assert str(info.value) == (f"{path}: bundle metadata is inconsistent: \"architecture tag variant is "
                               r"'t2v\\x1b]0;pwned\\x07'; expected 1-40 of a-z, 0-9, '.', '_', '-' (starting with a "
                               "letter or digit).\"")
    assert "\x1b" not in str(info.value) and "\x07" not in str(info.value)


def test_a_tag_with_zero_output_channels_cannot_be_made():
    with pytest.raises(SignatureError) as info:
        ArchTag.from_config(dim=8, ffn_dim=32, num_heads=2, num_layers=2, in_channels=16, out_channels=0,
                            text_dim=32, image_embedding=False, patch_size=(1, 2, 2), rope_axes=(4, 2, 2))
    assert str(info.value) == "architecture tag out_channels is 0; expected an integer from 1 to 1048576."


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_retag_projector_refuses_a_model_that_gives_zero_output_channels_and_writes_nothing(tmp_path):
    bundle, sig = tmp_path / "old.safetensors", ModelSignature(2, 2, 6)
    save_bundle(bundle, ProjectorBank.build("full", sig, sig, MAP.layers, hidden_dim=4), MAP)
    model = tmp_path / "model.safetensors"       # a head of 2 rows for 1x2x2 patches: 0 output channels
    save_file({"patch_embedding.weight": torch.zeros(12, 16, 1, 2, 2), "blocks.0.ffn.0.weight": torch.zeros(48, 12),
               "blocks.1.ffn.0.weight": torch.zeros(48, 12), "text_embedding.0.weight": torch.zeros(12, 32),
               "head.head.weight": torch.zeros(2, 12)}, str(model))
    with pytest.raises(SystemExit) as info:
        load_tool("retag_projector").main([str(bundle), "--sharer", str(model), "--receiver", str(model)])
    assert str(info.value) == (f"--sharer {model}: architecture tag out_channels is 0; expected an integer from 1 to "
                               f"1048576. Nothing was written; pass the sharer model file (a Wan-family checkpoint) "
                               f"the bundle was made for.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "old.safetensors"]


def test_a_format_1_header_carrying_a_backward_bank_is_refused(tmp_path):
    path = tmp_path / "both.safetensors"
    bank = ProjectorBank.build("full", SIG, SIG, MAP.layers, hidden_dim=4)
    save_bundle(path, bank, MAP, backward=(ProjectorBank.build("full", SIG, SIG, MAP.layers, hidden_dim=4), MAP))
    edit_meta(path, "c2c_bundle", lambda m: m.update(format_version=1))
    with pytest.raises(InvalidMetadataError) as info:
        load_bundle(path)
    assert str(info.value) == (f"{path}: bundle format version 1 carries a backward bank; expected format "
                               "version 2 for a bundle with one. Save it again with DiT Cache Bridge "
                               "(save_projector_bundle) or use another file.")


def test_a_same_size_rewrite_with_its_mtime_restored_is_another_file(tmp_path):
    path = tmp_path / "r.safetensors"
    save_file({"t": torch.zeros(4)}, str(path))
    before = os.stat(path)
    with open(path, "r+b") as f:         # same inode, same size, other bytes
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x3f")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert file_identity(after) != file_identity(before)


def edit_meta(path, key, edit):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"][key])
    edit(meta)
    header["__metadata__"][key] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return path


# -- item 8: training resume, saving, datasets -------------------------------------------------------

def train(folder, steps=2, resume=None, grad_hook=None):
    config = TrainConfig(steps=steps, checkpoint_every=1, checkpoint_dir=str(folder))
    bank = ProjectorBank.build("full", SIG, SIG, MAP.layers, hidden_dim=4)
    if grad_hook is not None:
        for p in bank.parameters():
            p.register_hook(grad_hook)
    return train_bank(bank, MAP, lambda step: torch.randn(1, 3, 2, 4),
                      lambda b, x: (b.project(0, "k", x, x) ** 2).mean(), config, resume=resume)


def set_state_tensor(path, name, value):
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    meta = json.loads(read_meta_raw(path))
    tensors[name] = value
    save_file(tensors, str(path), metadata=meta)


def read_meta_raw(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    return json.dumps(json.loads(data[8:8 + n])["__metadata__"])


def test_a_checkpoint_whose_adamw_step_is_nan_is_refused_before_a_step_is_taken(tmp_path):
    train(tmp_path, steps=1)
    state = tmp_path / "step_000001.state.safetensors"
    set_state_tensor(state, "optimizer.0.step", torch.tensor(float("nan")))
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(ResumeError) as info:
        train(tmp_path, steps=1, resume=str(tmp_path))
    assert str(info.value) == (f"{state}: optimizer step of parameter 0 holds NaN or Inf; expected finite values (the "
                               f"run it comes from diverged, or the file was damaged). Resume from an earlier "
                               f"checkpoint, or start a new run (resume off).")
    assert sorted(os.listdir(tmp_path)) == listing


@pytest.mark.parametrize("value, found", [
    (torch.tensor(7.0), "[7.0]"),          # more steps than the checkpoint made
    (torch.tensor(0.5), "[0.5]"),
])
def test_a_checkpoint_whose_adamw_step_is_not_its_count_is_refused(tmp_path, value, found):
    train(tmp_path, steps=1)
    state = tmp_path / "step_000001.state.safetensors"
    set_state_tensor(state, "optimizer.0.step", value)
    with pytest.raises(ResumeError) as info:
        train(tmp_path, steps=1, resume=str(tmp_path))
    assert str(info.value) == (f"{state}: optimizer step of parameter 0 is {found}; expected one whole number from 0 "
                               f"to the checkpoint's step 1. Resume from an earlier checkpoint, or start a new run "
                               f"(resume off).")


@pytest.mark.parametrize("value, found", [
    (torch.zeros(5056, dtype=torch.float32), "torch.float32 of shape [5056]"),
    (torch.zeros(17, dtype=torch.uint8), "torch.uint8 of shape [17]"),
])
def test_a_random_number_state_of_the_wrong_dtype_or_length_is_a_resume_error(tmp_path, value, found):
    train(tmp_path, steps=1)
    state = tmp_path / "step_000001.state.safetensors"
    set_state_tensor(state, "rng.cpu", value)
    with pytest.raises(ResumeError) as info:
        train(tmp_path, steps=1, resume=str(tmp_path))
    assert str(info.value) == (f"{state}: random-number state 'rng.cpu' is {found}; expected torch.uint8 of shape "
                               f"[5056] (this torch's generator). Resume from an earlier checkpoint, or start a new "
                               f"run (resume off).")


def test_weights_that_go_nan_while_the_loss_is_finite_are_never_checkpointed(tmp_path):
    with pytest.raises(DivergedError) as info:
        train(tmp_path, steps=2, grad_hook=lambda g: g * float("nan"))
    assert re.fullmatch(r"train_bank: the projector's weights \[.*\] hold NaN or Inf after step 1; expected finite "
                        r"weights\. Nothing was saved for this step\. Lower lr, resume from an earlier checkpoint, "
                        r"or start a new run \(resume off\)\.", str(info.value))
    assert os.listdir(tmp_path) == []


def test_a_bank_with_nan_weights_is_never_saved(tmp_path):
    bank = ProjectorBank.build("full", SIG, SIG, MAP.layers, hidden_dim=4)
    name, weight = next(iter(bank.state_dict().items()))
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError) as info:
        save_bundle(tmp_path / "p.safetensors", bank, MAP)
    assert str(info.value) == (f"refusing to write {tmp_path / 'p.safetensors'}: tensor '{name}' holds NaN or Inf "
                               f"values; expected finite weights below 65504 (Load C2C Projector would refuse the file). The training "
                               f"diverged: lower the learning rate, resume from an earlier checkpoint or start a new "
                               f"run.")
    assert os.listdir(tmp_path) == []


HOST = SampleHost("test", ("receiver_positive", "sharer_positive"), "Save Test Sample")


def samples(folder, channels=16, receiver_width=32, sharer_width=32, scale=1.0):
    save_sample(folder, HOST, torch.randn(1, channels, 1, 2, 2) * scale,
                {"receiver_positive": Conditioning({"cross_attn": torch.zeros(1, 3, receiver_width)}),
                 "sharer_positive": Conditioning({"cross_attn": torch.zeros(1, 3, sharer_width)})})
    return TrainingSet.open(folder, HOST)


def arch(text_dim=32, channels=16):
    return ArchTag.from_dict(tag_of(text_dim=text_dim, out_channels=channels, in_channels=channels))


def test_a_dataset_of_other_latent_channels_is_refused_before_training(tmp_path):
    data = samples(tmp_path, channels=48)
    with pytest.raises(TrainingDataError) as info:
        data.check_models(arch(), arch())
    assert str(info.value) == (f"sample index 0 (sample_00001.safetensors) in {tmp_path}: the latent has 48 channels; "
                               f"expected the models' 16-channel latent (wan2.1). Fix: save samples for these models "
                               f"with Save Test Sample (its latent encoded by these models' VAE), or pick the dataset "
                               f"made for them")


def test_a_dataset_of_another_text_width_is_refused_before_training(tmp_path):
    data = samples(tmp_path, sharer_width=4096)
    data.check_models(arch(), None)                   # an untagged sharer is not checked
    with pytest.raises(TrainingDataError) as info:
        data.check_models(arch(), arch())
    assert str(info.value) == (f"sample index 0 (sample_00001.safetensors) in {tmp_path}: sharer_positive has text "
                               f"embeddings 4096 wide; expected the sharer's text width 32 ({arch().describe()}). "
                               f"Fix: save samples with the sharer's own text encoder through Save Test Sample, or "
                               f"pick the dataset made for these models")


def test_a_huge_finite_latent_is_blamed_on_the_data(tmp_path):
    samples(tmp_path)
    save_sample(tmp_path, HOST, torch.full((1, 16, 1, 2, 2), 3e30),
                {"receiver_positive": Conditioning({"cross_attn": torch.zeros(1, 3, 32)}),
                 "sharer_positive": Conditioning({"cross_attn": torch.zeros(1, 3, 32)})})
    with pytest.raises(TrainingDataError) as info:
        TrainingSet.open(tmp_path, HOST)
    assert str(info.value) == (f"the latents of samples index 1 (sample_00002.safetensors, up to 3e+30) in {tmp_path} "
                               f"hold values far beyond any VAE latent; this is the data, not the projector; expected "
                               f"latent values within ±10000 (a latent from VAE Encode or a sampler). Fix: delete "
                               f"sample_00002.safetensors from {tmp_path} (or save it again from VAE Encode's output: "
                               f"look upstream of Save Test Sample for a scaling node or a broken encoder) and run "
                               f"again")
