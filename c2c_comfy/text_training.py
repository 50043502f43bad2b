"""Projector training for a Qwen text-encoder pair in ComfyUI: the frozen Qwen-Image DiT's flow-matching loss
through the bridged receiver encoder.

The same names as the diffusers host's ``c2c_diffusers/text_training.py`` (docs/architecture.md, session 6); the
loop, checkpoints, resume and torchrun are ``c2c_core.train.run_training``, the files ``c2c_core.samples``.

A sample is a clean Qwen-Image latent x0 (as VAE Encode gives it) and what the encoders read: the prompt, the mode
of the stock encode node (text / edit / edit_plus, as Bridged Qwen Text Encode) and the edit image, plus the
reference latents the stock node would have VAE-encoded from that image (made when the sample is saved, so training
needs no VAE). The encoders run at training time, so nothing of theirs is stored.

One training forward (:func:`bridged_prompt_velocity`): ComfyUI's own TextEncodeQwenImageEdit(Plus) node encodes
the prompt with a :class:`~c2c_comfy.text_encoder.BridgedClip` in place of the receiver CLIP, exactly as Bridged Qwen
Text Encode does (same hooks, same ``FusionRun``), except that inside ``BridgedClip.training`` the bank is used in
place and autograd is on (compat.grad_enabled: ComfyUI runs prompts under inference mode); the sharer encodes
without grad. The frozen DiT then predicts the velocity at x_t = (1 − σ)·x0 + σ·noise from that conditioning
(``compat.diffusion_model_output``: its raw output, as the Wan loop), and the loss is its MSE against noise − x0.
Only the bank learns: the encoders and the DiT are frozen for the run and never changed (clones).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from c2c_core import ProjectorBundle, save_bundle, velocity_loss
from c2c_core.bundle import tag_bank
from c2c_core.samples import Conditioning, SampleDraws, SampleHost, TrainingDataError, TrainingSet, save_sample
from c2c_core.train import DataParallel, TrainSettings, provenance, run_training, trainable_copy
from . import compat, files
from .errors import BridgeInputError
from .text_encoder import STOCK_NODES, BridgedClip, encoder_signature
from .training import TrainOutcome, frozen

__all__ = ["PROMPT_SAMPLES", "save_prompt_sample", "open_prompt_set", "PromptBatch", "prompt_batches",
           "bridged_prompt_velocity", "check_prompt_set", "reference_latents", "encode_prompt", "prompt_loss",
           "session", "check_dit", "train_text_projector", "BridgedClip"]

NODE = "Train C2C Text Projector"
#: the samples a text-encoder projector trains on in ComfyUI (the diffusers host's are "diffusers-qwen-image":
#: its latents are normalised by the pipeline and its edit images preprocessed by transformers)
PROMPT_SAMPLES = SampleHost("comfyui-qwen-image", ("receiver_positive",), "Save C2C Text Training Sample")
ROLE = "receiver_positive"
IMAGE, REFERENCE = "image", "reference_latents"
MODES = tuple(STOCK_NODES)


def _image_inputs(mode: str, image) -> dict:
    """The stock node's image input for ``mode``: none in text mode, ``image`` (edit) or ``image1`` (edit_plus)."""
    if mode == "text" or image is None:
        return {}
    return {"image": image} if mode == "edit" else {"image1": image}


class _ImagesOnly:
    """Stands in for the CLIP inside a stock Qwen encode node when only its reference latents are wanted: the
    node sizes and VAE-encodes the image itself, so the latents are the ones sampling would get."""

    def tokenize(self, text, **kwargs):
        return {}

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        return [[None, {}]]


def reference_latents(mode: str, image, vae) -> list:
    """The reference latents the stock node of ``mode`` (``STOCK_NODES``) makes from ``image`` with ``vae``."""
    if vae is None or image is None or mode == "text":
        return []
    node = compat.stock_qwen_encode_node(STOCK_NODES[mode])
    (conditioning,) = compat.run_stock_node(node, clip=_ImagesOnly(), prompt="", vae=vae, **_image_inputs(mode, image))
    return list(conditioning[0][1].get(REFERENCE, []))


def save_prompt_sample(folder, x0: torch.Tensor, prompt: str, mode: str = "text", image=None, vae=None) -> Path:
    """Write one sample as the next ``sample_NNNNN.safetensors`` in ``folder`` (c2c_core.samples): x0 one latent
    as VAE Encode gives it ((1, C, H, W) or (1, C, 1, H, W)); the prompt; ``mode`` the stock encode node the prompt
    goes through; for edit modes the IMAGE (1, H, W, 3) and, with a ``vae``, its reference latents."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise TrainingDataError(f"prompt {prompt!r}", "the caption text of the latent", "type the prompt")
    if mode not in MODES:
        raise TrainingDataError(f"mode {mode!r}", f"one of {list(MODES)}", "pick the mode the prompt is encoded in")
    if (mode == "text") != (image is None):
        raise TrainingDataError(f"mode '{mode}' {'with' if image is not None else 'without'} an image",
                                "an image exactly in the edit modes", "connect the edit image, or set mode to 'text'")
    latent = x0.unsqueeze(2) if x0.dim() == 4 else x0
    if latent.dim() != 5 or latent.shape[0] != 1 or latent.shape[2] != 1:
        raise TrainingDataError(f"a latent of shape {tuple(x0.shape)}", "one image latent (1, C, H, W) or "
                                "(1, C, 1, H, W)", "save one image latent per sample (VAE Encode of the picture)")
    tensors = {}
    if image is not None:
        if image.dim() != 4 or image.shape[0] != 1 or image.shape[-1] not in (3, 4):
            raise TrainingDataError(f"an image of shape {tuple(image.shape)}", "one IMAGE (1, H, W, 3)",
                                    "connect one picture (Load Image)")
        tensors[IMAGE] = image[..., :3]
        tensors.update({f"{REFERENCE}.{i}": t for i, t in enumerate(reference_latents(mode, image, vae))})
    return save_sample(folder, PROMPT_SAMPLES, latent, {ROLE: Conditioning(tensors, {"prompt": prompt, "mode": mode})})


def open_prompt_set(folder) -> TrainingSet:
    """The samples Save C2C Text Training Sample wrote into ``folder``, checked from their headers."""
    return TrainingSet.open(folder, PROMPT_SAMPLES)


def _bad(dataset: TrainingSet, index: int, found: str, expected: str, fix: str) -> TrainingDataError:
    return TrainingDataError(f"sample index {index} ({dataset.paths[index].name}) in {dataset.folder}: {found}",
                             expected, fix)


def check_prompt_set(dataset: TrainingSet, dit) -> None:
    """Refuse samples the DiT cannot denoise before any model runs: one image latent (1 frame) of the DiT's
    latent channels. Raises TrainingDataError naming the index, the file and the fix."""
    name, channels = compat.latent_format(dit)
    for index in range(len(dataset)):
        shape = dataset.latent_shape(index)
        if shape[1] != channels:
            raise _bad(dataset, index, f"the latent has {shape[1]} channels", f"the DiT's {channels}-channel "
                       f"latent ({name})", "save samples whose latent comes from this DiT's VAE (VAE Encode with the "
                       "Qwen-Image VAE), or pick the dataset made for it")
        if shape[2] != 1:
            raise _bad(dataset, index, f"the latent has {shape[2]} frames", "one image latent (1 frame)",
                       "save one picture's latent per sample with Save C2C Text Training Sample")


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------
@dataclass
class PromptBatch:
    """One training item: x0 and noise (1, C, 1, H, W) in the DiT's own scale, sigma (1,), what the encoders read
    (prompt, mode, edit image) and the reference latents the DiT reads beside x_t."""
    x0: torch.Tensor
    noise: torch.Tensor
    sigma: torch.Tensor
    prompt: str
    mode: str = "text"
    image: Optional[torch.Tensor] = None
    reference_latents: list = field(default_factory=list)

    @property
    def x_t(self) -> torch.Tensor:
        return self.sigma.reshape(-1, 1, 1, 1, 1) * self.noise + (1.0 - self.sigma.reshape(-1, 1, 1, 1, 1)) * self.x0


def _item(dataset: TrainingSet, index: int):
    """Sample ``index``'s latent and (prompt, mode, image, reference latents), refused with the fix if malformed."""
    sample = dataset[index]
    role = sample.roles[ROLE]
    prompt, mode = role.values.get("prompt"), role.values.get("mode")
    if not isinstance(prompt, str) or mode not in MODES:
        raise _bad(dataset, index, f"prompt {prompt!r}, mode {mode!r}", f"a prompt and a mode of {list(MODES)}",
                   "save the sample again with Save C2C Text Training Sample")
    image = role.tensors.get(IMAGE)
    if (image is None) != (mode == "text"):
        raise _bad(dataset, index, f"mode '{mode}' {'with' if image is not None else 'without'} an image",
                   "an image exactly in the edit modes", "save the sample again with Save C2C Text Training Sample")
    refs = sorted((int(k.rsplit(".", 1)[1]), t) for k, t in role.tensors.items() if k.startswith(REFERENCE + "."))
    return sample.latent, prompt, mode, image, [t for _, t in refs]


def prompt_batches(dataset: TrainingSet, dit, seed: int = 0, batch_size: int = 1, rank: int = 0, world: int = 1):
    """``batches(step) -> [PromptBatch]``: this rank's items of a step (``c2c_core.samples.SampleDraws``: a pure
    function of seed, step and rank, so a resumed run sees the same items); sigma follows the DiT's own
    model_sampling, ``sigma = shift(t)`` with t ~ U[0, 1), as the Wan loop draws it."""
    draws = SampleDraws(dataset, seed, 0.0, batch_size, rank, world)
    to_sigma = compat.percent_to_sigma(dit)
    device = compat.load_device(dit)

    def batches(step: int) -> list:
        out = []
        for draw in draws(step):
            latent, prompt, mode, image, refs = _item(dataset, draw.index)
            out.append(PromptBatch(
                x0=compat.process_latent_in(dit, latent.float()).to(device), noise=draw.noise.to(device),
                sigma=torch.tensor([float(to_sigma(1.0 - draw.t))], dtype=torch.float32, device=device),
                prompt=prompt, mode=mode, image=image, reference_latents=refs))
        return out
    return batches


# ------------------------------------------------------------------------------------------------
# The training forward
# ------------------------------------------------------------------------------------------------
def encode_prompt(bridge: BridgedClip, batch: PromptBatch):
    """The CONDITIONING Bridged Qwen Text Encode gives for the batch's prompt (the stock node of its mode, the
    bridge in place of the receiver CLIP), with the sample's reference latents as the stock node adds them."""
    node = compat.stock_qwen_encode_node(STOCK_NODES[batch.mode])
    (conditioning,) = compat.run_stock_node(node, clip=bridge, prompt=batch.prompt, vae=None,
                                            **_image_inputs(batch.mode, batch.image))
    if not batch.reference_latents:
        return conditioning
    return [[cond, {**extras, REFERENCE: list(extras.get(REFERENCE, [])) + list(batch.reference_latents)}]
            for cond, extras in conditioning]


def bridged_prompt_velocity(bridge: BridgedClip, dit):
    """``predict(bank, batch) -> (DiT velocity, noise − x0)`` for ``c2c_core.train.velocity_loss``: the receiver
    encodes through ``bridge`` in training mode (gradients reach the bank), the frozen DiT (a MODEL) predicts."""
    device = compat.load_device(dit)

    def predict(bank, batch: PromptBatch):
        if bank is not bridge.bundle.bank:
            raise TypeError("train the bank of the bridge's own bundle (bridge.bundle.bank)")
        with compat.grad_enabled():
            with bridge.training():
                conditioning = encode_prompt(bridge, batch)
            conds = compat.cond_cat(compat.processed_model_conds(dit, conditioning, batch.x0, "positive", device))
            velocity = compat.diffusion_model_output(dit, batch.x_t, batch.sigma, conds, [0])
        return velocity.float(), (batch.noise - batch.x0).float()

    return predict


def prompt_loss(predict: Callable) -> Callable:
    """``loss_fn(bank, [PromptBatch])``: the velocity MSE averaged over the step's items (prompts of different
    lengths do not batch)."""
    per_item = velocity_loss(predict)

    def loss_fn(bank, batches: list):
        return sum(per_item(bank, b) for b in batches) / len(batches)

    return loss_fn


@contextlib.contextmanager
def session(dit, bridge: BridgedClip):
    """Load the DiT and both encoders together the ComfyUI way, freeze them, and run in ComfyUI's training mode."""
    patchers = [dit, compat.clip_patcher(bridge.receiver), compat.clip_patcher(bridge.sharer)]
    with compat.loaded_for_run(patchers) as modules, frozen(*modules), compat.training_mode():
        yield


def check_dit(node: str, input_name: str, dit, receiver_width: int) -> None:
    """A Qwen-Image DiT that reads the receiver encoder's hidden states, or an error naming the fix."""
    width = compat.qwen_image_text_width(dit)
    if width is None:
        raise BridgeInputError(node, input_name, f"a {compat.model_kind(dit)} model", "a Qwen-Image diffusion model",
                               "load Qwen-Image (or Qwen-Image-Edit) with Load Diffusion Model")
    if width != receiver_width:
        raise BridgeInputError(node, input_name, f"a Qwen-Image DiT reading {width}-wide text",
                               f"the receiver encoder's width {receiver_width}",
                               "connect the DiT that belongs to this text encoder (Qwen-Image with qwen_2.5_vl_7b)")


def train_text_projector(dit, receiver, sharer, projector: ProjectorBundle, dataset: TrainingSet,
                         settings: TrainSettings, *, checkpoint_dir=None, resume: bool = True, output_path=None,
                         progress: Optional[Callable[[int, int, float], None]] = None) -> TrainOutcome:
    """Train a copy of ``projector``'s bank for the receiver / sharer CLIPs on ``dataset`` with the frozen DiT's
    velocity loss; nothing passed in is changed. Checkpoints, resume and torchrun as in
    ``c2c_core.train.run_training``; rank 0 saves the trained bundle to ``output_path`` (never replacing a file)."""
    parallel = DataParallel.current()
    receiver_sig = encoder_signature(compat.qwen_encoder(receiver))
    sharer_sig = encoder_signature(compat.qwen_encoder(sharer))
    with compat.grad_enabled():
        bank = trainable_copy(projector).to(compat.load_device(compat.clip_patcher(receiver)))
        bundle = ProjectorBundle(bank=bank, layer_map=projector.layer_map, sharer=bank.sharer, receiver=bank.receiver)
        bridge = BridgedClip(NODE, receiver, sharer, bundle, 1.0)
        model = dit.clone()
        compat.fresh_weights_per_forward(model)
        compat.fresh_tensors_outside_layers(model)
        check_prompt_set(dataset, model)
        batches = prompt_batches(dataset, model, settings.seed, settings.batch_size, parallel.rank, parallel.world)
        with session(model, bridge):
            result = run_training(bank, projector.layer_map, batches,
                                  prompt_loss(bridged_prompt_velocity(bridge, model)), settings,
                                  checkpoint_dir=checkpoint_dir, resume=resume, progress=progress, parallel=parallel)
        bank = tag_bank(bank.cpu().eval(), sharer_sig, receiver_sig)
    info = provenance("DiT Cache Bridge text-encoder training", settings, result, len(dataset), parallel.world)
    trained = ProjectorBundle(bank=bank, layer_map=projector.layer_map, sharer=bank.sharer, receiver=bank.receiver,
                              provenance=info, metadata={})
    outcome = TrainOutcome(trained, result.losses, result.last_checkpoint, result.resumed_at)
    if parallel.rank == 0 and output_path is not None:
        outcome.output_path = files.save_unique(
            output_path, lambda p: save_bundle(p, bank, projector.layer_map, info, overwrite=False))
    return outcome
