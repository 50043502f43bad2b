"""Training a text-encoder projector with diffusers' Qwen-Image pipelines (c2c_diffusers/text_training.py) and
its command line (tools/train_projector_diffusers.py --pair text).

The tiny random models of tiny_qwen.py: a transformers Qwen2.5-VL receiver in a Qwen-Image pipeline with a tiny
DiT, a Qwen3-VL sharer. The training forward fuses exactly what inference fuses; a resumed run ends with the
weights of an uninterrupted one, bit for bit; bad samples are refused before a step with their index, file and
fix. (A projector trained here loads in ComfyUI: test_text_encoder.py, next to the hosts' crosscheck.)
"""
import numpy as np
import pytest
import torch
from PIL import Image

from c2c_core import TrainConfig, load_bundle, save_bundle, train_bank, velocity_loss
from c2c_core.samples import Conditioning, SampleHost, TrainingDataError, save_sample
from c2c_core.train import run_training
from c2c_diffusers import BridgeSetupError, SharerInputs, TextEncoderBridge
from c2c_diffusers.text_encoder import encoder_signature
from c2c_diffusers.text_training import (PROMPT_SAMPLES, bridged_prompt_velocity, check_prompt_set, open_prompt_set,
                                         prompt_batches, save_prompt_sample)

pytest.importorskip("transformers")
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImagePipeline  # noqa: E402
import tiny_qwen  # noqa: E402
from tiny_qwen import PROMPTS, bundle_for, encode, prompt_batch  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tok():
    return tiny_qwen.tokenizer()


@pytest.fixture(scope="module")
def sharer_processor(tok):
    return tiny_qwen.sharer_processor(tok)


@pytest.fixture(scope="module")
def sharer():
    return tiny_qwen.qwen3().requires_grad_(False)


@pytest.fixture(scope="module")
def pipe(tok):
    dit = tiny_qwen.dit().requires_grad_(False)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_qwen.vae(),
                             text_encoder=tiny_qwen.qwen25().requires_grad_(False), tokenizer=tok, transformer=dit)


@pytest.fixture(scope="module")
def edit_pipe(pipe, tok):
    return QwenImageEditPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=tok,
                                 processor=tiny_qwen.receiver_processor(tok), transformer=pipe.transformer)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.RandomState(0).rand(56, 84, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """Three text-to-image samples: 8 × 8 latents of the tiny VAE's 4 channels, one prompt each."""
    folder = tmp_path_factory.mktemp("prompt_samples")
    g = torch.Generator().manual_seed(11)
    for prompt in (PROMPTS[0], PROMPTS[1], "a green bird"):
        save_prompt_sample(folder, torch.randn(1, 4, 1, 8, 8, generator=g), prompt)
    return folder


def test_training_fuses_as_inference_and_only_the_bank_learns(tmp_path, pipe, sharer, sharer_processor):
    """One fusion path: the prompt embeddings a training step computes (with grad, the bank in place) are the
    inference ones bit for bit; the velocity loss trains the bank alone, and the saved bundle fuses as trained."""
    for model in (pipe.text_encoder, pipe.transformer, sharer):
        model.requires_grad_(False)
    bundle = bundle_for(sharer, pipe.text_encoder, "c2c")
    bridge = TextEncoderBridge(sharer, sharer_processor, bundle, strength=0.7).attach(pipe)
    try:
        with bridge.training():
            trained_path = pipe.encode_prompt(PROMPTS, device="cpu")[0]
        assert trained_path.requires_grad
        assert torch.equal(trained_path.detach(), encode(pipe, PROMPTS))
        result = train_bank(bundle.bank, bundle.layer_map, lambda step: prompt_batch(step % 2),
                            velocity_loss(bridged_prompt_velocity(bridge, pipe)), TrainConfig(steps=8, lr=3e-3, seed=0))
        assert result.losses[-1] < 0.9 * result.losses[0], result.losses
        assert all(p.grad is not None for p in bundle.bank.parameters())
        assert not any(p.requires_grad for m in (pipe.text_encoder, pipe.transformer, sharer) for p in m.parameters())
        trained = encode(pipe)
    finally:
        bridge.detach()
    save_bundle(tmp_path / "trained.safetensors", bundle.bank, bundle.layer_map)
    with TextEncoderBridge(sharer, sharer_processor, load_bundle(tmp_path / "trained.safetensors"),
                           strength=0.7).attach(pipe):
        assert torch.equal(encode(pipe), trained)




def test_prompt_samples_round_trip_and_feed_the_trainer(tmp_path, edit_pipe, sharer, sharer_processor, image):
    """A text-encoder projector's samples (c2c_core.samples): a clean latent and what the encoders read. The
    draws are a pure function of seed and step; an edit sample carries its image for the encoders and its latents
    for the DiT, and a training step on it predicts the velocity of the target tokens only."""
    g = torch.Generator().manual_seed(3)
    x0, image_latents = torch.randn(1, 4, 1, 8, 8, generator=g), torch.randn(1, 4, 1, 8, 8, generator=g)
    save_prompt_sample(tmp_path, x0, PROMPTS[0])
    path = save_prompt_sample(tmp_path, x0 * 0.5, "make the sign say OPEN", image=image, image_latents=image_latents)
    assert path.name == "sample_00002.safetensors"
    batches = prompt_batches(open_prompt_set(tmp_path), seed=1)
    drawn = {step: batches(step) for step in range(6)}
    again = prompt_batches(open_prompt_set(tmp_path), seed=1)(4)
    assert torch.equal(again.noise, drawn[4].noise) and again.sigma == drawn[4].sigma
    edit = next(b for b in drawn.values() if b.image is not None)
    text = next(b for b in drawn.values() if b.image is None)
    assert text.prompt == [PROMPTS[0]] and torch.equal(text.x0, QwenImagePipeline._pack_latents(x0, 1, 4, 8, 8))
    assert text.img_shapes == [[(1, 4, 4)]] and edit.img_shapes == [[(1, 4, 4), (1, 4, 4)]]
    assert np.array_equal(np.asarray(edit.image), np.asarray(image))
    assert torch.equal(edit.image_latents, QwenImagePipeline._pack_latents(image_latents, 1, 4, 8, 8))
    with TextEncoderBridge(sharer, sharer_processor, bundle_for(sharer, edit_pipe.text_encoder, "c2c")).attach(
            edit_pipe) as bridge:
        velocity, target = bridged_prompt_velocity(bridge, edit_pipe)(bridge.bundle.bank, edit)
    assert velocity.shape == target.shape == (1, 16, 16) and torch.isfinite(velocity).all()


def train(pipe, sharer, sharer_processor, samples, config, resume=True, progress=None):
    """A fresh c2c bundle trained by run_training on ``samples`` (what the CLI runs); returns (bundle, result)."""
    bundle = bundle_for(sharer, pipe.text_encoder, "c2c")
    with TextEncoderBridge(sharer, sharer_processor, bundle).attach(pipe) as bridge:
        result = run_training(bundle.bank, bundle.layer_map, prompt_batches(open_prompt_set(samples), seed=3),
                              velocity_loss(bridged_prompt_velocity(bridge, pipe)), config, resume=resume,
                              progress=progress)
    return bundle, result


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, pipe, sharer, sharer_processor,
                                                                     samples):
    """Stopped after its checkpoint at step 2 and resumed, a 4-step run has the uninterrupted run's losses and its
    bank, bit for bit (the checkpoint holds the optimizer and RNG states; the draws are a function of the step)."""
    def config(folder):
        return TrainConfig(steps=4, lr=3e-3, seed=0, checkpoint_every=2, checkpoint_dir=str(folder))

    whole, whole_result = train(pipe, sharer, sharer_processor, samples, config(tmp_path / "whole"), resume=False)

    def stop_at_2(done, total, loss):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(pipe, sharer, sharer_processor, samples, config(tmp_path / "cut"), resume=False, progress=stop_at_2)
    resumed, result = train(pipe, sharer, sharer_processor, samples, config(tmp_path / "cut"))
    assert result.resumed_at == 2 and result.losses == whole_result.losses
    assert whole_result.losses[-1] != whole_result.losses[0]
    for name, tensor in whole.bank.state_dict().items():
        assert torch.equal(resumed.bank.state_dict()[name], tensor), name
    assert any(not torch.equal(t, bundle_for(sharer, pipe.text_encoder, "c2c").bank.state_dict()[name])
               for name, t in whole.bank.state_dict().items()), "the bank trained"


def test_bad_samples_are_refused_with_their_index_file_and_fix(tmp_path, pipe, sharer, sharer_processor, image):
    """Refused when the folder is opened or checked against the pipeline, before any step: NaN latents, latents of
    another VAE, latents the DiT cannot pack, the Wan pair's samples and ComfyUI's; an edit sample given to a
    text-to-image pipeline; and the text pair's samples given to the Wan trainer."""
    from c2c_diffusers.training import open_training_set, save_training_sample
    with pytest.raises(BridgeSetupError, match=r"x0 has shape \(1, 4, 8, 8\); expected one image latent"):
        save_prompt_sample(tmp_path, torch.zeros(1, 4, 8, 8), "a cat")
    with pytest.raises(BridgeSetupError, match="needs both the image and its image_latents"):
        save_prompt_sample(tmp_path, torch.zeros(1, 4, 1, 8, 8), "a cat", image=np.zeros((8, 8, 3), np.uint8))

    def folder(name, *latents):
        for latent in latents:
            save_prompt_sample(tmp_path / name, latent, "a cat")
        return tmp_path / name

    fine = torch.zeros(1, 4, 1, 8, 8)
    with pytest.raises(TrainingDataError, match=r"index 1 \(sample_00002.safetensors\).*NaN or Inf.*Fix: delete "
                                                r"sample_00002.safetensors"):
        open_prompt_set(folder("nonfinite", fine, torch.full((1, 4, 1, 8, 8), float("nan"))))
    with pytest.raises(TrainingDataError, match=r"sample index 1 \(sample_00002.safetensors\) in .*: the latent has 16 "
                                                r"channels; expected the 4-channel latent this pipeline's transformer "
                                                r"takes \(16 packed channels\). Fix: save samples for this pipeline "
                                                r"with c2c_diffusers.text_training.save_prompt_sample"):
        check_prompt_set(open_prompt_set(folder("channels", fine, torch.zeros(1, 16, 1, 8, 8))), pipe)
    with pytest.raises(TrainingDataError, match=r"sample index 0 \(sample_00001.safetensors\) in .*: the latent is "
                                                r"\(1, 4, 1, 8, 7\); expected one image latent .* with even H and W"):
        check_prompt_set(open_prompt_set(folder("odd", torch.zeros(1, 4, 1, 8, 7))), pipe)
    check_prompt_set(open_prompt_set(folder("fine", fine)), pipe)

    wan = tmp_path / "wan"        # the Wan pair's samples are not a text-encoder pair's, and the reverse
    save_prompt_sample(wan, fine, "a cat")
    save_training_sample(wan, torch.zeros(1, 16, 2, 4, 4), torch.zeros(1, 8, 64), SharerInputs(torch.zeros(1, 8, 64)))
    with pytest.raises(TrainingDataError, match=r"sample index 1: .*sample_00002.safetensors was written by the "
                                                r"diffusers host; this is the diffusers-qwen-image host.*Save the "
                                                r"sample with c2c_diffusers.text_training.save_prompt_sample"):
        open_prompt_set(wan)
    with pytest.raises(TrainingDataError, match=r"sample index 0: .*sample_00001.safetensors was written by the "
                                                r"diffusers-qwen-image host; this is the diffusers host.*Save the "
                                                r"sample with c2c_diffusers.training.save_training_sample"):
        open_training_set(wan)
    comfy = tmp_path / "comfy"    # ComfyUI's text samples hold its own latents (and its edit-image conditioning)
    comfy_host = SampleHost("comfyui-qwen-image", PROMPT_SAMPLES.roles, "Save C2C Text Training Sample")
    save_sample(comfy, comfy_host, fine, {"receiver_positive": Conditioning({}, {"prompt": "a cat"})})
    with pytest.raises(TrainingDataError, match=r"sample index 0: .*sample_00001.safetensors was written by the "
                                                r"comfyui-qwen-image host; this is the diffusers-qwen-image host"):
        open_prompt_set(comfy)

    edit = tmp_path / "edit"
    save_prompt_sample(edit, fine, "make it red", image=image, image_latents=fine)
    bundle = bundle_for(sharer, pipe.text_encoder, "c2c")
    with TextEncoderBridge(sharer, sharer_processor, bundle).attach(pipe) as bridge:
        with pytest.raises(BridgeSetupError, match=r"an edit sample \(prompt 'make it red' with an edit image\) for "
                                                   r"QwenImagePipeline, which encodes text only; train edit samples "
                                                   r"with a QwenImageEditPipeline"):
            bridged_prompt_velocity(bridge, pipe)(bridge.bundle.bank, prompt_batches(open_prompt_set(edit))(0))


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, pipe, sharer, sharer_processor):
    """The tiny pipeline and sharer as the CLI reads them: a diffusers pipeline folder and a transformers one."""
    root = tmp_path_factory.mktemp("models")
    pipe.save_pretrained(root / "qwen_image")
    sharer.save_pretrained(root / "qwen3_vl")
    sharer_processor.save_pretrained(root / "qwen3_vl")
    return root


def test_cli_trains_a_text_projector_end_to_end(tmp_path, saved_models, samples, pipe, sharer, sharer_processor,
                                                capsys):
    """tools/train_projector_diffusers.py --pair text (its main(), in this process): the pipeline folder (its VAE not
    loaded) and the sharer folder, the samples, 3 steps with a checkpoint; the bundle it writes has the loss curve
    next to it and fuses in TextEncoderBridge; a second run over the same checkpoints asks for --resume or
    --restart."""
    import host
    cli = host._load_tool("train_projector_diffusers")
    out = tmp_path / "qwen3vl_to_qwen25vl.safetensors"
    argv = ["--pair", "text", "--receiver", str(saved_models / "qwen_image"),
            "--sharer", str(saved_models / "qwen3_vl"),
            "--dataset", str(samples), "--kind", "c2c", "--steps", "3", "--lr", "1e-2", "--checkpoint-every", "2",
            "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "step 3/3 loss" in printed and f"wrote {out}" in printed
    assert (tmp_path / "qwen3vl_to_qwen25vl_loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "qwen3vl_to_qwen25vl_checkpoints").glob("step_??????.safetensors")) == \
        ["step_000002.safetensors", "step_000003.safetensors"]
    bundle = load_bundle(out)
    assert bundle.bank.kind == "c2c" and bundle.provenance["steps"] == 3 and bundle.provenance["samples"] == 3
    assert bundle.receiver.arch == encoder_signature(pipe.text_encoder).arch
    stock = encode(pipe)
    with TextEncoderBridge(sharer, sharer_processor, bundle).attach(pipe):
        assert not torch.allclose(encode(pipe), stock, atol=1e-4)
    with pytest.raises(SystemExit, match="holds checkpoints of an earlier run; pass --resume to continue it or "
                                         "--restart to delete them and start over"):
        cli.main(argv)
