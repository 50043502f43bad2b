"""Save C2C Text Training Sample and Train C2C Text Projector: projectors between two Qwen text encoders, trained
with the frozen Qwen-Image DiT's flow-matching loss.

Thin, as nodes/train.py: folders, messages and the loss plot here; the samples and the bridged training forward in
``c2c_comfy/text_training.py`` (shared with ``tools/train_projector.py --pair text``), the loop in c2c_core.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from c2c_core.errors import quote
from ..c2c_comfy import text_training, training
from ..c2c_comfy.errors import check
from ..c2c_comfy.text_encoder import RECEIVER_KINDS, SHARER_KINDS, encoder_of, encoder_signature
from ..c2c_comfy.validate import check_inputs
from .projector import check_projector_fits
from .text_encode import MODES
from .train import TRAIN_CATEGORY, check_learnable, checked_folder, checked_name, dataset_fingerprint, open_dataset, \
    run_training_node, samples_root, training_inputs
from .types import Projector


class SaveC2CTextTrainingSample(io.ComfyNode):
    NODE = "Save C2C Text Training Sample"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTCacheBridge_SaveC2CTextTrainingSample", display_name=cls.NODE, category=TRAIN_CATEGORY,
            description="Stores one training example for Train C2C Text Projector: a clean Qwen-Image latent, the "
                        "prompt that describes it and, for an edit, the edit image, as .safetensors files (tensors "
                        "and JSON, nothing pickled) in output/c2c_training/<folder>/. One file per latent of the "
                        "batch. The text encoders run when training, so any pair can train on the same samples.",
            inputs=[
                io.Latent.Input("latent", tooltip="The clean image latent to learn from (VAE Encode of the picture "
                                                  "with the Qwen-Image VAE). Training adds noise itself."),
                io.String.Input("prompt", multiline=True, tooltip="What the picture shows (or, for an edit, the "
                                                                  "instruction that turns the edit image into it)."),
                io.Combo.Input("mode", options=MODES, default="text",
                               tooltip="How training encodes the prompt, as Bridged Qwen Text Encode's mode: text "
                                       "(no image), edit (TextEncodeQwenImageEdit) or edit_plus "
                                       "(TextEncodeQwenImageEditPlus)."),
                io.String.Input("folder", default="c2c_text_samples",
                                tooltip="Sample folder under output/c2c_training/. Train C2C Text Projector's "
                                        "'dataset' input takes the same name. Files are numbered, never overwritten."),
                io.Image.Input("image", optional=True, tooltip="edit / edit_plus: the image to edit."),
                io.Vae.Input("vae", optional=True,
                             tooltip="edit / edit_plus: the Qwen-Image VAE, to store the image's reference latent "
                                     "as the stock node makes it (without it the DiT trains without one)."),
            ],
            outputs=[io.String.Output(display_name="folder",
                                      tooltip="The folder name, for Train C2C Text Projector's dataset input: "
                                              "linking it makes training wait until this sample is saved.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent, prompt, mode, folder, image=None, vae=None) -> io.NodeOutput:
        check_inputs(cls, locals())
        node = cls.NODE
        name = checked_folder(node, "folder", folder)
        samples = latent["samples"]
        check(isinstance(prompt, str) and bool(prompt.strip()), node, "prompt", quote(prompt, 40),
              "the text of the picture", "type the prompt the latent should be generated from")
        check(samples.dim() in (4, 5) and (samples.dim() == 4 or samples.shape[2] == 1), node, "latent",
              f"a latent of shape {tuple(samples.shape)}", "an image latent (batch, 16, height, width)",
              "encode the picture with VAE Encode (Qwen-Image VAE)")
        if mode == "text":
            check(image is None, node, "image", "an image in mode 'text'", "no image in text mode",
                  "set mode to 'edit' or 'edit_plus', or disconnect the image")
        else:
            check(image is not None, node, "image", f"mode '{mode}' without an image", "the image to edit",
                  "connect the edit image (Load Image), or set mode to 'text'")
            check(image.shape[0] == 1, node, "image", f"a batch of {image.shape[0]} images", "one image",
                  "connect a single picture")
        bad = int((~torch.isfinite(samples)).sum())
        check(bad == 0, node, "latent", f"{bad} NaN or Inf value(s)", "finite values",
              "fix the node that produced it (an fp16 overflow in VAE Encode?) and save again")
        root = samples_root() / name
        written = [text_training.save_prompt_sample(root, samples[b:b + 1], prompt, mode, image, vae)
                   for b in range(samples.shape[0])]
        return io.NodeOutput(name, ui={"text": [f"{len(written)} sample(s) → output/{training.SAMPLES_SUBFOLDER}/"
                                                f"{name}/{written[-1].name}"]})


class TrainC2CTextProjector(io.ComfyNode):
    NODE = "Train C2C Text Projector"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTCacheBridge_TrainC2CTextProjector", display_name=cls.NODE, category=TRAIN_CATEGORY,
            description="Trains a learnable projector (gating, full or c2c) between two Qwen text encoders on the "
                        "samples saved by Save C2C Text Training Sample: the receiver encodes each prompt reading the "
                        "sharer's projected K/V (as Bridged Qwen Text Encode), and the frozen Qwen-Image DiT's "
                        "flow-matching loss trains the projector. The encoders and the DiT stay frozen and "
                        "unchanged. Saves the result in models/c2c_projectors/ and checkpoints in "
                        "output/c2c_training/checkpoints/; queueing the same node again resumes.",
            inputs=[
                io.Model.Input("dit", tooltip="The Qwen-Image (or Qwen-Image-Edit) diffusion model whose loss "
                                              "trains the projector. Frozen."),
                io.Clip.Input("clip", tooltip="The receiver: Qwen-Image's text encoder (qwen_2.5_vl_7b). Frozen."),
                io.Clip.Input("sharer_clip", tooltip="The sharer: a Qwen3-VL text encoder. Frozen."),
                Projector.Input("projector", tooltip="The projector to train: Create C2C Projector with the two CLIPs "
                                                     "and kind c2c, full or gating (or a trained one to continue "
                                                     "from). It is copied, not changed."),
                io.String.Input("dataset", default="c2c_text_samples",
                                tooltip="Folder under output/c2c_training/ written by Save C2C Text Training Sample."),
                *training_inputs("c2c_text_projector"),
            ],
            outputs=[Projector.Output(display_name="projector", tooltip="The trained projector, ready for Bridged "
                                                                         "Qwen Text Encode."),
                     io.Image.Output(display_name="loss_plot", tooltip="The loss curve.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, dataset=None, **kwargs):
        return dataset_fingerprint(dataset)

    @classmethod
    def execute(cls, dit, clip, sharer_clip, projector, dataset, steps, batch_size, learning_rate, warmup_steps,
                schedule, checkpoint_every, seed, output_name, resume=True) -> io.NodeOutput:
        check_inputs(cls, locals())
        node = cls.NODE
        receiver = encoder_of(node, "clip", clip, RECEIVER_KINDS)
        sharer = encoder_of(node, "sharer_clip", sharer_clip, SHARER_KINDS)
        text_training.check_dit(node, "dit", dit, receiver.hidden_size)
        check_projector_fits(node, projector, encoder_signature(sharer), encoder_signature(receiver))
        check_learnable(node, projector)
        check(warmup_steps < steps, node, "warmup_steps", str(warmup_steps), f"fewer than steps ({steps})",
              "lower warmup_steps or raise steps")
        data_name = checked_folder(node, "dataset", dataset)
        out_name = checked_name(node, "output_name", output_name, "file name")
        data = open_dataset(node, data_name, text_training.open_prompt_set, "Save C2C Text Training Sample")
        settings = dict(loss="velocity", steps=steps, batch_size=batch_size, lr=learning_rate,
                        warmup_steps=warmup_steps, decay=schedule, checkpoint_every=checkpoint_every, seed=seed,
                        negative_share=0.0)

        def train(settings, output_path, progress):
            return text_training.train_text_projector(dit, clip, sharer_clip, projector, data, settings,
                                                      resume=resume, output_path=output_path, progress=progress)

        return run_training_node(cls, out_name, settings, train, "velocity loss, {kind} text-encoder projector",
                                 "samples that fit the DiT", "re-save the samples with Save C2C Text Training Sample")
