"""Projector training for a Qwen text-encoder pair in ComfyUI (c2c_comfy/text_training.py, nodes/text_train.py,
tools/train_projector.py --pair text).

Tiny models from tools/make_tiny_qwen.py, loaded under inference_mode as loaders inside a prompt load them: the
receiver Qwen2.5-VL, the sharer Qwen3-VL on a host that has it (0.33.0; elsewhere the receiver's own encoder stands
in as the sharer, so training runs on every host), the tiny Qwen-Image DiT.
"""
from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from bridge_helpers import comfy_qwen_encoder, load_model, pack_nodes

pytestmark = pytest.mark.slow

PROMPTS = ["a red cube on a blue floor", "write 'C2C' on the sign", "two cats, one black", "a green door"]


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_module_fixtures():
    """conftest's one_thread is per test, so module fixtures (the training runs) would set up with OpenMP's
    threads: slow on the shared machine, and another summation order than the tests that compare with them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qwen(tiny_models, comfy):
    import host
    tiny = host._load_tool("make_tiny_qwen")
    root = Path(os.environ.get("DCB_TINY_QWEN_ROOT") or tiny_models.root)
    tiny.ensure_models(root)
    paths = {name: root / spec["folder"] / name for name, spec in tiny.SPECS.items()}
    with torch.inference_mode():
        receiver = tiny.load_tiny_clip(paths[tiny.RECEIVER])
        sharer = tiny.load_tiny_clip(paths[tiny.SHARER]) if tiny.has_qwen3vl() else receiver
        dit = tiny.load_tiny_qwen_image(paths[tiny.DIT])
        wan = load_model(tiny_models.path(host.T2V_A))
    return {"receiver": receiver, "sharer": sharer, "dit": dit, "wan": wan, "tiny": tiny,
            "paths": {"receiver": paths[tiny.RECEIVER], "dit": paths[tiny.DIT],
                      "sharer": paths[tiny.SHARER] if tiny.has_qwen3vl() else paths[tiny.RECEIVER]}}


@pytest.fixture(scope="module")
def tt(qwen):
    pack_nodes()
    return importlib.import_module("dit_cache_bridge.c2c_comfy.text_training")


def make_projector(qwen, kind="c2c", seed=0):
    with torch.inference_mode():
        return pack_nodes().CreateC2CProjector.execute(qwen["sharer"], qwen["receiver"], kind, "terminal", "all", 0.5,
                                                       16, seed).args[0]


def image(seed=0):
    return torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dataset(tt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("text_samples")
    for i, prompt in enumerate(PROMPTS):
        latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(i))
        edit = i == 1
        tt.save_prompt_sample(folder, latent, prompt, "edit_plus" if edit else "text", image(i) if edit else None)
    return tt.open_prompt_set(folder)


def trainable(tt, qwen, projector):
    from c2c_core.train import trainable_copy
    from c2c_core import ProjectorBundle
    bank = trainable_copy(projector).eval()      # eval: the c2c gate's Gumbel noise only in train_bank
    bundle = ProjectorBundle(bank=bank, layer_map=projector.layer_map, sharer=bank.sharer, receiver=bank.receiver)
    return tt.BridgedClip("test", qwen["receiver"], qwen["sharer"], bundle, 1.0)


def test_training_forward_fuses_exactly_as_inference(tt, qwen, dataset):
    """The conditioning a training step computes (with grad, the bank in place) is Bridged Qwen Text Encode's bit for
    bit, text-only and with an edit image."""
    from dit_cache_bridge.nodes.text_encode import BridgedQwenTextEncode
    projector = make_projector(qwen)
    bridge = trainable(tt, qwen, projector)
    for mode, images in (("text", {}), ("edit_plus", {"image1": image(3)})):
        batch = tt.PromptBatch(x0=None, noise=None, sigma=None, prompt=PROMPTS[0], mode=mode,
                               image=images.get("image1"))
        with bridge.training():
            trained = tt.encode_prompt(bridge, batch)
        assert trained[0][0].requires_grad
        node = BridgedQwenTextEncode.execute(qwen["receiver"], qwen["sharer"], projector, PROMPTS[0], mode, 1.0, "all",
                                             "", **images).args[0]
        assert torch.equal(trained[0][0].detach(), node[0][0])


def settings(steps=4, **overrides):
    from c2c_core.train import TrainSettings
    return TrainSettings(**{"steps": steps, "lr": 3e-3, "batch_size": 2, "seed": 0, "negative_share": 0.0,
                            "loss": "velocity", **overrides})


@pytest.fixture(scope="module")
def trained(tt, qwen, dataset, tmp_path_factory):
    """One 4-step run with checkpoints every 2 steps (kept for the resume test)."""
    folder = tmp_path_factory.mktemp("text_checkpoints")
    projector = make_projector(qwen)
    outcome = tt.train_text_projector(qwen["dit"], qwen["receiver"], qwen["sharer"], projector, dataset,
                                      settings(checkpoint_every=2, checkpoint_dir=folder), checkpoint_dir=folder)
    return {"outcome": outcome, "projector": projector, "checkpoints": folder}


def test_only_the_bank_learns_and_the_loss_falls(tt, qwen, dataset):
    """Six steps on one fixed item: the velocity loss falls, the bank alone gets gradients and the models stay frozen
    and unchanged."""
    from c2c_core import train_bank, TrainConfig
    projector = make_projector(qwen)
    bridge = trainable(tt, qwen, projector)
    bank = bridge.bundle.bank
    model = qwen["dit"].clone()
    (item,) = tt.prompt_batches(dataset, model, seed=3)(0)
    models = (qwen["receiver"].cond_stage_model, qwen["sharer"].cond_stage_model, qwen["dit"].model)
    weights_before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    loss_fn = tt.prompt_loss(tt.bridged_prompt_velocity(bridge, model))

    def eval_loss():    # the bank in eval mode: no Gumbel noise in the c2c gates
        bank.eval()
        with torch.no_grad():
            return float(loss_fn(bank, [item]).detach())

    with tt.compat.grad_enabled():
        tt.compat.fresh_weights_per_forward(model)
        tt.compat.fresh_tensors_outside_layers(model)
        with tt.session(model, bridge):
            before = eval_loss()
            train_bank(bank, projector.layer_map, lambda step: [item], loss_fn, TrainConfig(steps=6, lr=1e-2, seed=0))
            after = eval_loss()
    assert after < 0.97 * before, (before, after)     # 0.95 (Qwen3-VL sharer), 0.955 (the receiver's own)
    grads = {name: p.grad for name, p in bank.named_parameters()}
    assert all(g is not None for g in grads.values()) and sum(float(g.abs().sum()) for g in grads.values()) > 0
    assert not any(p.grad is not None for m in models for p in m.parameters())
    assert all(torch.equal(v, before[k])
               for m, before in zip(models, weights_before) for k, v in m.state_dict().items())


def test_a_run_saves_a_tagged_bundle_with_its_provenance(trained):
    outcome, projector = trained["outcome"], trained["projector"]
    assert len(outcome.losses) == 4 and all(torch.isfinite(torch.tensor(outcome.losses)))
    before, after = projector.bank.state_dict(), outcome.bundle.bank.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert outcome.bundle.receiver.arch.kind == "text-encoder" and outcome.bundle.provenance["steps"] == 4


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tt, qwen, dataset, trained, tmp_path):
    """The run is stopped after step 2 (its checkpoint), then resumed: same weights as the 4-step run, bit for bit."""
    from c2c_core.checkpoint import clear_checkpoints
    folder = tmp_path / "ckpt"
    shutil.copytree(trained["checkpoints"], folder)
    for late in sorted(folder.glob("step_000004*")):
        late.unlink()
    resumed = tt.train_text_projector(qwen["dit"], qwen["receiver"], qwen["sharer"], trained["projector"], dataset,
                                      settings(checkpoint_every=2, checkpoint_dir=folder), checkpoint_dir=folder)
    assert resumed.resumed_at == 2
    want = trained["outcome"].bundle.bank.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in resumed.bundle.bank.state_dict().items())
    assert resumed.losses == trained["outcome"].losses
    clear_checkpoints(folder)




# --- bad samples ------------------------------------------------------------------------------------------------
def test_bad_samples_are_refused_with_index_file_and_fix(tt, qwen, tmp_path):
    from c2c_core.samples import TrainingDataError
    nan = tmp_path / "nan"
    tt.save_prompt_sample(nan, torch.zeros(1, 16, 8, 8), "a cat")
    tt.save_prompt_sample(nan, torch.full((1, 16, 8, 8), float("nan")), "a dog")
    with pytest.raises(TrainingDataError, match=r"the latents of samples index 1 \(sample_00002.safetensors\) in .* "
                                                r"hold NaN or Inf values; expected finite values.*Fix: delete "
                                                r"sample_00002.safetensors"):
        tt.open_prompt_set(nan)
    wide = tmp_path / "channels"
    tt.save_prompt_sample(wide, torch.zeros(1, 48, 8, 8), "a cat")
    with pytest.raises(TrainingDataError, match=r"sample index 0 \(sample_00001.safetensors\) in .*channels: the "
                                                r"latent has 48 channels; expected the DiT's 16-channel latent "
                                                r"\(Wan21\)\. Fix: save samples whose latent comes from this DiT's "
                                                r"VAE"):
        tt.check_prompt_set(tt.open_prompt_set(wide), qwen["dit"])
    video = tmp_path / "video"
    from c2c_core.samples import Conditioning, save_sample
    save_sample(video, tt.PROMPT_SAMPLES, torch.zeros(1, 16, 3, 8, 8),
                {"receiver_positive": Conditioning({}, {"prompt": "a cat", "mode": "text"})})
    with pytest.raises(TrainingDataError, match=r"sample index 0 \(sample_00001.safetensors\) in .*: the latent has "
                                                r"3 frames; expected one image latent \(1 frame\)"):
        tt.check_prompt_set(tt.open_prompt_set(video), qwen["dit"])


def test_samples_of_another_host_or_pair_are_refused(tt, tmp_path):
    from c2c_core.samples import Conditioning, TrainingDataError, save_sample
    from comfy_test_nodes import wan_conditioning
    training = importlib.import_module("dit_cache_bridge.c2c_comfy.training")
    wan = tmp_path / "wan"
    conds = {role: wan_conditioning(i) for i, role in enumerate(("receiver_positive", "receiver_negative",
                                                                 "sharer_positive", "sharer_negative"))}
    training.save_training_samples(wan, torch.zeros(1, 16, 3, 8, 8), conds)
    with pytest.raises(TrainingDataError, match=r"sample index 0: .*sample_00001.safetensors was written by the "
                                                r"comfyui host; this is the comfyui-qwen-image host.*Save the sample "
                                                r"with Save C2C Text Training Sample"):
        tt.open_prompt_set(wan)
    text = tmp_path / "text"
    tt.save_prompt_sample(text, torch.zeros(1, 16, 8, 8), "a cat")
    with pytest.raises(TrainingDataError, match=r"sample index 0: .* was written by the comfyui-qwen-image host; "
                                                r"this is the comfyui host.*Save C2C Training Sample"):
        training.open_training_set(text)
    python = tmp_path / "diffusers"
    save_sample(python, tt.PROMPT_SAMPLES.__class__("diffusers-qwen-image", ("receiver_positive",), "x"),
                torch.zeros(1, 16, 1, 8, 8), {"receiver_positive": Conditioning({}, {"prompt": "a cat"})})
    with pytest.raises(TrainingDataError, match=r"sample index 0: .* was written by the diffusers-qwen-image host; "
                                                r"this is the comfyui-qwen-image host, whose latent space and image "
                                                r"conditioning differ"):
        tt.open_prompt_set(python)


# --- the nodes ----------------------------------------------------------------------------------------------------
def run_node(node, **inputs):
    """As ComfyUI's executor runs a node: under inference_mode."""
    with torch.inference_mode():
        return node.execute(**inputs)


def test_the_nodes_save_samples_and_train_a_projector_bridged_qwen_text_encode_uses(tt, qwen, comfy):
    from dit_cache_bridge.nodes import text_train, train
    from dit_cache_bridge.nodes.text_encode import BridgedQwenTextEncode
    name = "tiny_text_pair"
    shutil.rmtree(comfy.output_dir / "c2c_training" / name, ignore_errors=True)
    shutil.rmtree(comfy.output_dir / "c2c_training" / "checkpoints" / name, ignore_errors=True)
    latent = {"samples": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))}
    (folder,) = run_node(text_train.SaveC2CTextTrainingSample, latent=latent, prompt=PROMPTS[0], mode="text",
                         folder=name).args
    run_node(text_train.SaveC2CTextTrainingSample, latent={"samples": latent["samples"][:1]}, prompt=PROMPTS[1],
             mode="edit_plus", folder=name, image=image(7))
    assert len(list((comfy.output_dir / "c2c_training" / folder).glob("sample_*.safetensors"))) == 3
    projector = make_projector(qwen)
    try:
        trained, plot = run_node(text_train.TrainC2CTextProjector, dit=qwen["dit"], clip=qwen["receiver"],
                                 sharer_clip=qwen["sharer"], projector=projector, dataset=folder, steps=2, batch_size=1,
                                 learning_rate=1e-3, warmup_steps=0, schedule="cosine", checkpoint_every=1, seed=0,
                                 output_name=name, resume=False).args
        assert plot.dim() == 4 and plot.shape[-1] == 3 and trained.provenance["steps"] == 2
        fused = BridgedQwenTextEncode.execute(qwen["receiver"], qwen["sharer"], trained, PROMPTS[0], "text", 1.0,
                                              "all", "").args[0]
        untrained = BridgedQwenTextEncode.execute(qwen["receiver"], qwen["sharer"], projector, PROMPTS[0], "text",
                                                  1.0, "all", "").args[0]
        assert torch.isfinite(fused[0][0]).all() and not torch.equal(fused[0][0], untrained[0][0])
    finally:
        for path in Path(train.projector_folder()).glob(f"{name}*.safetensors"):
            path.unlink()


def test_the_train_node_refuses_what_does_not_fit(tt, qwen):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    from dit_cache_bridge.nodes import text_train
    inputs = dict(dit=qwen["dit"], clip=qwen["receiver"], sharer_clip=qwen["sharer"], projector=make_projector(qwen),
                  dataset="no_such_folder", steps=2, batch_size=1, learning_rate=1e-3, warmup_steps=0,
                  schedule="cosine", checkpoint_every=1, seed=0, output_name="x")
    with pytest.raises(BridgeInputError, match=r"Train C2C Text Projector › dit: a WAN21 model; expected a "
                                               r"Qwen-Image diffusion model"):
        run_node(text_train.TrainC2CTextProjector, **{**inputs, "dit": qwen["wan"]})
    with pytest.raises(BridgeInputError, match=r"Train C2C Text Projector › dataset: training-sample folder .*"
                                               r"no_such_folder does not exist"):
        run_node(text_train.TrainC2CTextProjector, **inputs)
    with pytest.raises(BridgeInputError, match=r"› warmup_steps: 2; expected fewer than steps \(2\)"):
        run_node(text_train.TrainC2CTextProjector, **{**inputs, "warmup_steps": 2})
    with pytest.raises(BridgeInputError, match=r"› sharer_clip: a ModelPatcher, not a CLIP"):
        run_node(text_train.TrainC2CTextProjector, **{**inputs, "sharer_clip": qwen["dit"]})


def test_the_cli_trains_a_text_pair(qwen, dataset, tmp_path):
    """tools/train_projector.py --pair text (text_cli_worker.py runs the CLI's main with the tiny models' loader):
    the same training from the command line, with its checkpoints, bundle and loss plot. Its torchrun launch is the
    Wan pair's code (c2c_core.train.run_training, DataParallel: tests/training/test_distributed.py)."""
    import subprocess
    import sys
    from c2c_core import load_bundle
    cli = Path(__file__).with_name("text_cli_worker.py")
    out = tmp_path / "text_pair.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    paths = qwen["paths"]
    result = subprocess.run([sys.executable, str(cli), "--pair", "text", "--sharer", paths["sharer"], "--receiver",
                             paths["receiver"], "--dit", paths["dit"], "--dataset", dataset.folder, "--kind", "c2c",
                             "--hidden-dim", "16", "--steps", "2", "--checkpoint-every", "1", "--out", out,
                             "--threads", "1", "--cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 process(es), loss velocity" in result.stdout and "weights sha256" in result.stdout
    bundle = load_bundle(out)
    assert bundle.provenance["steps"] == 2 and bundle.receiver.arch.family == "qwen2.5-vl"
    assert sorted(p.name for p in (tmp_path / "text_pair_checkpoints").iterdir())[-1] == "step_000002.state.safetensors"
    assert (tmp_path / "text_pair_loss.png").is_file()


# --- a bundle trained here, used in Python ------------------------------------------------------------------------
def test_a_bundle_trained_here_fuses_the_same_numbers_in_python(tt, qwen, comfyui_root, tmp_path):
    """tests/diffusers/test_text_encoder.py's cross-check, with a bundle trained by this host: the same tiny
    receiver (512 wide, as ComfyUI detects Qwen-Image's encoder) and Qwen3-VL sharer in ComfyUI and in transformers,
    a tiny Qwen-Image DiT reading 512-wide text; two training steps here, then Bridged Qwen Text Encode and
    c2c_diffusers' TextEncoderBridge with the saved file agree to 1e-4 (two attention kernels)."""
    if not (comfyui_root / "comfy" / "text_encoders" / "qwen3vl.py").is_file():
        pytest.skip("this ComfyUI has no Qwen3-VL text encoder (comfy/text_encoders/qwen3vl.py)")
    pytest.importorskip("transformers")
    import json
    from safetensors.torch import save_file
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)
    from c2c_core import load_bundle, save_bundle
    from c2c_diffusers import TextEncoderBridge
    from dit_cache_bridge.nodes.text_encode import BridgedQwenTextEncode
    tiny = qwen["tiny"]
    config = dict(vocab_size=152064, hidden_size=512, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
    receiver_spec = {"kind": "qwen25_vl", "vision": tiny.VISION, "config": config}
    receiver_clip, receiver_state = comfy_qwen_encoder(tiny, receiver_spec, 7, tmp_path / "receiver.safetensors")
    sharer_spec = tiny.SPECS[tiny.SHARER]
    sharer_clip, sharer_state = comfy_qwen_encoder(tiny, sharer_spec, 8, tmp_path / "sharer.safetensors")
    dit_spec = {**tiny.SPECS[tiny.DIT], "config": {**tiny.SPECS[tiny.DIT]["config"], "joint_attention_dim": 512}}
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    import comfy.ops
    dit_config = {**dit_spec["config"], "axes_dims_rope": tuple(dit_spec["config"]["axes_dims_rope"])}
    model = QwenImageTransformer2DModel(**dit_config, dtype=torch.float32, device="cpu",
                                        operations=comfy.ops.disable_weight_init)
    tiny.initialise(model, 9)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "dit.safetensors"),
              metadata={tiny.METADATA_KEY: json.dumps({"name": "wide", **dit_spec})})
    dit = tiny.load_tiny_qwen_image(tmp_path / "dit.safetensors")

    samples = tmp_path / "samples"
    tt.save_prompt_sample(samples, torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1)), PROMPTS[0])
    projector = pack_nodes().CreateC2CProjector.execute(sharer_clip, receiver_clip, "c2c", "terminal", "all", 0.5, 16,
                                                        0).args[0]
    outcome = tt.train_text_projector(dit, receiver_clip, sharer_clip, projector, tt.open_prompt_set(samples),
                                      settings(steps=2, batch_size=1, lr=1e-2))
    save_bundle(tmp_path / "trained.safetensors", outcome.bundle.bank, outcome.bundle.layer_map,
                outcome.bundle.provenance)
    bundle = load_bundle(tmp_path / "trained.safetensors")
    assert any(not torch.equal(v, projector.bank.state_dict()[k]) for k, v in bundle.bank.state_dict().items())

    receiver = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(config, rope_parameters=dict(rope_type="default", mrope_section=[16, 24, 24], rope_theta=1e6)),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=512,
                           fullatt_block_indexes=[0]), tie_word_embeddings=True)).eval()
    receiver.load_state_dict({"model.language_model." + k[len("model."):]: v for k, v in receiver_state.items()
                              if k.startswith("model.")}, strict=False)
    s, vision = sharer_spec["config"], sharer_spec["vision"]
    sharer = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=dict(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                         intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
                         num_key_value_heads=s["num_key_value_heads"], head_dim=128, rope_parameters=dict(
                             rope_type="default", mrope_section=[24, 20, 20], mrope_interleaved=True, rope_theta=5e6)),
        vision_config=dict(depth=vision["depth"], hidden_size=vision["hidden_size"], num_heads=vision["num_heads"],
                           intermediate_size=vision["intermediate_size"], out_hidden_size=s["hidden_size"],
                           deepstack_visual_indexes=vision["deepstack"]))).eval()
    sharer.load_state_dict(sharer_state, strict=False)
    tok = Qwen2Tokenizer.from_pretrained(comfyui_root / "comfy" / "text_encoders" / "qwen25_tokenizer")
    from diffusers import QwenImagePipeline
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=receiver, tokenizer=tok, transformer=None)

    prompt = "a red cube with 'C2C' written on it"
    comfy_fused = BridgedQwenTextEncode.execute(receiver_clip, sharer_clip, bundle, prompt, "text", 1.0, "all",
                                                "").args[0][0][0]
    stock = BridgedQwenTextEncode.execute(receiver_clip, sharer_clip, bundle, prompt, "text", 0.0, "all",
                                          "").args[0][0][0]
    with TextEncoderBridge(sharer, tok, bundle).attach(pipe), torch.no_grad():
        python_fused = pipe.encode_prompt(prompt, device="cpu")[0]
    assert (comfy_fused - stock).abs().max() > 0.1, "the fusion moved the conditioning"
    assert (python_fused - comfy_fused).abs().max() < 1e-4, (python_fused - comfy_fused).abs().max()


class PixelVAE:
    """Stands in for the Qwen-Image VAE (no tiny one exists): a 16-channel latent of the pixels at 1/8 size, so the
    reference latent shows which size the stock node resized the image to."""

    def encode(self, pixels):
        return pixels[..., :1].movedim(-1, 1)[:, :, None, ::8, ::8].repeat(1, 16, 1, 1, 1)


def test_an_edit_sample_keeps_the_stock_nodes_reference_latent_and_the_dit_reads_it(tt, qwen, tmp_path):
    from comfy_extras.nodes_qwen import TextEncodeQwenImageEditPlus
    picture = image(11)
    tt.save_prompt_sample(tmp_path, torch.zeros(1, 16, 8, 8), PROMPTS[1], "edit_plus", picture, PixelVAE())
    stock = TextEncodeQwenImageEditPlus.execute(clip=qwen["receiver"], prompt=PROMPTS[1], vae=PixelVAE(),
                                                image1=picture).args[0]
    (want,) = stock[0][1]["reference_latents"]
    (item,) = tt.prompt_batches(tt.open_prompt_set(tmp_path), qwen["dit"])(0)
    (stored,) = item.reference_latents
    assert stored.shape == want.shape and torch.equal(stored, want)       # 1024² area, as the stock node sizes it
    assert torch.equal(item.image, picture) and item.mode == "edit_plus"
    bridge = trainable(tt, qwen, make_projector(qwen))
    with bridge.training():
        conditioning = tt.encode_prompt(bridge, item)
    assert torch.equal(conditioning[0][1]["reference_latents"][0], want)
    model = qwen["dit"].clone()
    with tt.compat.grad_enabled():
        tt.compat.fresh_weights_per_forward(model)
        tt.compat.fresh_tensors_outside_layers(model)
        with tt.session(model, bridge), torch.no_grad():
            predict = tt.bridged_prompt_velocity(bridge, model)
            with_reference, target = predict(bridge.bundle.bank, item)
            item.reference_latents = []
            without, _ = predict(bridge.bundle.bank, item)
    assert with_reference.shape == target.shape == (1, 16, 1, 8, 8) and torch.isfinite(with_reference).all()
    assert not torch.equal(with_reference, without)


# --- the shipped workflow ---------------------------------------------------------------------------------------
WORKFLOW = "qwen_image_train_text_projector.json"


def following_the_note(workflow: dict, mute: tuple, unmute: tuple) -> dict:
    """The workflow with its groups muted and unmuted as its note says (membership: the node's corner in the group)."""
    import copy
    workflow = copy.deepcopy(workflow)
    for group in workflow["groups"]:
        x, y, w, h = group["bounding"]
        mode = 2 if group["id"] in mute else 0 if group["id"] in unmute else None
        for node in workflow["nodes"]:
            if mode is not None and x <= node["pos"][0] < x + w and y <= node["pos"][1] < y + h:
                node["mode"] = mode
    return workflow


def tiny_workflow_prompt(workflow: dict, object_info: dict, paths: dict, output_name: str) -> dict:
    """The workflow as an API prompt on the tiny Qwen models: the loaders swapped for the test loaders (the stock
    ones build Qwen's full widths), VAE Encode for an 8×8 empty latent (no tiny Qwen-Image VAE), a short run."""
    import host
    from bridge_helpers import tiny_qwen_loader
    workflow_api = host._load_tool("workflow_api")
    api = workflow_api.to_api(workflow, object_info)
    for node_id, node in list(api.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if tiny_qwen_loader(api, node_id, paths):
            continue
        if kind == "VAEEncode":
            api[node_id] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        elif kind == "DiTCacheBridge_CreateC2CProjector":
            inputs["hidden_dim"] = 16
        elif kind == "DiTCacheBridge_TrainC2CTextProjector":
            inputs.update(steps=2, warmup_steps=0, checkpoint_every=0, output_name=output_name, resume=False)
    return workflow_api.keep_needed(api, object_info)


def test_the_shipped_workflow_collects_and_trains_as_its_note_says(qwen, comfy_server):
    """workflows/qwen_image_train_text_projector.json on a real server: queued as loaded it saves a sample (and
    trains nothing); with group 1 muted and groups 2–3 unmuted, as its note says, it trains on those samples and
    previews the loss plot. Hosts without Qwen3-VL run it with the receiver's encoder standing in as the sharer."""
    import host
    workflow_api = host._load_tool("workflow_api")
    shipped = workflow_api.load_workflow(host.REPO_ROOT / "workflows" / WORKFLOW)
    notes = " ".join(n["widgets_values"][0] for n in shipped["nodes"] if n["type"] == "MarkdownNote")
    assert "**Collect** (group 1 on, groups 2–3 muted)" in notes
    assert "**Train**: unmute groups 2 and 3 and mute group 1" in notes
    info, name = comfy_server.object_info(), "workflow_test_text_c2c"
    from PIL import Image
    Image.new("RGB", (64, 64), (200, 40, 40)).save(comfy_server.input_dir / "example.png")

    collect = tiny_workflow_prompt(shipped, info, qwen["paths"], name)
    assert not workflow_api.nodes_of_type(collect, "DiTCacheBridge_TrainC2CTextProjector")
    (save,) = workflow_api.nodes_of_type(collect, "DiTCacheBridge_SaveC2CTextTrainingSample")
    folder = comfy_server.output_dir / "c2c_training" / collect[save]["inputs"]["folder"]
    shutil.rmtree(folder, ignore_errors=True)
    comfy_server.run(collect, timeout=120)
    assert len(list(folder.glob("sample_*.safetensors"))) == 1

    train = tiny_workflow_prompt(following_the_note(shipped, mute=(1,), unmute=(2, 3)), info, qwen["paths"], name)
    assert not workflow_api.nodes_of_type(train, "DiTCacheBridge_SaveC2CTextTrainingSample")
    (preview,) = workflow_api.nodes_of_type(train, "PreviewImage")
    try:
        entry = comfy_server.run(train, timeout=300)
        assert entry["outputs"][preview]["images"], "no loss plot"
    finally:
        for path in (Path(comfy_server.models_root) / "c2c_projectors").glob(f"{name}*.safetensors"):
            path.unlink()
