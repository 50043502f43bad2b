"""Save C2C Training Sample and Train C2C Projector: collect data in a workflow, then train a projector on it.

Both nodes are thin: files, folders, messages and the loss plot here; the CONDITIONING conversion and the
bridged training forward in ``c2c_comfy/training.py`` (shared with tools/train_projector.py), the sample
format and the loop in c2c_core (``samples.py``, ``train.py``).
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from c2c_core import DECAYS, LOSS_KINDS, C2CError, DivergedError, ResumeError
from c2c_core.samples import TrainingDataError
from c2c_core.train import TrainSettings
from ..c2c_comfy import compat, paths, training
from ..c2c_comfy.errors import BridgeInputError, check
from ..c2c_comfy.validate import check_inputs
from .projector import check_projector_fits, model_signature
from .types import CATEGORY, Projector

TRAIN_CATEGORY = f"{CATEGORY}/training"
_CONFIG_INPUTS = {"lr": "learning_rate", "decay": "schedule", "warmup_steps": "warmup_steps", "steps": "steps",
                  "seed": "seed", "checkpoint_every": "checkpoint_every", "loss": "loss", "batch_size": "batch_size",
                  "negative_share": "negative_share"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def samples_root() -> Path:
    """``<output>/c2c_training``: where sample folders, checkpoints and loss plots go."""
    return Path(folder_paths.get_output_directory()) / training.SAMPLES_SUBFOLDER


def checked_name(node: str, input_name: str, value: str, what: str) -> str:
    name = value.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    check(bool(_NAME.match(name)) and ".." not in name, node, input_name, repr(value),
          f"a {what}: letters, digits, '_', '-' or '.', no slashes",
          "rename it, e.g. 'wan_chronoedit'")
    return name


def checked_folder(node: str, input_name: str, value: str) -> str:
    """A sample folder name; ``checkpoints`` (any case) is where Train C2C Projector keeps its checkpoints."""
    name = checked_name(node, input_name, value, "folder name")
    check(name.lower() != training.CHECKPOINTS_SUBFOLDER, node, input_name, repr(value),
          f"a sample folder other than output/{training.SAMPLES_SUBFOLDER}/{training.CHECKPOINTS_SUBFOLDER}/, where "
          f"Train C2C Projector keeps its checkpoints", "rename it, e.g. 'wan_chronoedit'")
    return name


def dataset_fingerprint(dataset):
    """A training node's fingerprint: new or changed sample files make it run again (ComfyUI reuses its result
    otherwise)."""
    if not isinstance(dataset, str) or not _NAME.match(dataset.strip()) or ".." in dataset:
        return dataset
    folder = samples_root() / dataset.strip()
    if not folder.is_dir():
        return dataset
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors")))


class SaveC2CTrainingSample(io.ComfyNode):
    NODE = "Save C2C Training Sample"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTCacheBridge_SaveC2CTrainingSample", display_name=cls.NODE, category=TRAIN_CATEGORY,
            description="Stores one training example for Train C2C Projector: a clean video latent plus the "
                        "receiver's and the sharer's conditioning, as .safetensors files (tensors and JSON, "
                        "nothing pickled) in output/c2c_training/<folder>/. One file per latent of the batch.",
            inputs=[
                io.Latent.Input("latent", tooltip="The clean video latent to learn from (e.g. VAE Encode of a "
                                                  "reference video). Training adds noise itself."),
                io.Conditioning.Input("positive", tooltip="The receiver's positive conditioning for this latent."),
                io.Conditioning.Input("negative", tooltip="The receiver's negative conditioning (trained on a "
                                                          "share of the steps, since the bridge also fuses the "
                                                          "negative pass of CFG)."),
                io.Conditioning.Input("sharer_positive", tooltip="The sharer's positive conditioning (for an I2V / "
                                                                 "ChronoEdit sharer: from its WanImageToVideo node, "
                                                                 "with the same width, height and length as the "
                                                                 "latent)."),
                io.Conditioning.Input("sharer_negative", tooltip="The sharer's negative conditioning."),
                io.String.Input("folder", default="c2c_samples",
                                tooltip="Sample folder under output/c2c_training/. Train C2C Projector's 'dataset' "
                                        "input takes the same name. Files are numbered, never overwritten."),
            ],
            outputs=[io.String.Output(display_name="folder",
                                      tooltip="The folder name, for Train C2C Projector's dataset input: linking "
                                              "it makes training wait until this sample is saved.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent, positive, negative, sharer_positive, sharer_negative, folder) -> io.NodeOutput:
        name = checked_folder(cls.NODE, "folder", folder)
        samples = latent["samples"]
        check(samples.dim() == 5, cls.NODE, "latent", f"a latent of shape {tuple(samples.shape)}",
              "a video latent (batch, 16, frames, height, width)", "encode a video or use an empty Wan video latent")
        for input_name, conditioning in (("positive", positive), ("negative", negative),
                                         ("sharer_positive", sharer_positive), ("sharer_negative", sharer_negative)):
            check(len(conditioning) == 1, cls.NODE, input_name, f"{len(conditioning)} conditioning entries",
                  "exactly one", "do not combine or area-split conditioning you save for training")
        _check_image_latent(cls.NODE, samples, sharer_positive, "sharer_positive")
        _check_image_latent(cls.NODE, samples, sharer_negative, "sharer_negative")
        _check_finite(cls.NODE, "latent", samples)
        for input_name, conditioning in (("positive", positive), ("negative", negative),
                                         ("sharer_positive", sharer_positive), ("sharer_negative", sharer_negative)):
            for tensor, extras in conditioning:
                _check_finite(cls.NODE, input_name, tensor)
                _check_finite(cls.NODE, input_name, extras.get("concat_latent_image"), "its image latent")
        written = training.save_training_samples(samples_root() / name, samples, {
            "receiver_positive": positive, "receiver_negative": negative,
            "sharer_positive": sharer_positive, "sharer_negative": sharer_negative})
        return io.NodeOutput(name, ui={"text": [f"{len(written)} sample(s) → output/{training.SAMPLES_SUBFOLDER}/"
                                                f"{name}/{written[-1].name}"]})


def _check_finite(node, input_name, tensor, what="the tensor"):
    """A sample is saved once and trained on many times: NaN/Inf is refused here, not discovered mid-training."""
    if tensor is None or not tensor.is_floating_point():
        return
    bad = int((~torch.isfinite(tensor)).sum())
    check(bad == 0, node, input_name, f"{bad} NaN or Inf value(s) in {what}", "finite values",
          "fix the node that produced it (an fp16 overflow in VAE Encode or a text encoder?) and save again")


def _check_image_latent(node, samples, conditioning, input_name):
    for _, extras in conditioning:
        image = extras.get("concat_latent_image")
        if image is not None:
            check(tuple(image.shape[-3:]) == tuple(samples.shape[-3:]), node, input_name,
                  f"an image latent of {tuple(image.shape[-3:])} (frames, height, width)",
                  f"the latent's {tuple(samples.shape[-3:])}",
                  "give the sharer's WanImageToVideo node the latent's width, height and length")


def training_inputs(output_name: str) -> list:
    """The training settings both training nodes take, in one order (saved workflows' widget values follow it)."""
    return [
        io.Int.Input("steps", default=500, min=1, max=1_000_000, tooltip="Optimizer steps."),
        io.Int.Input("batch_size", default=1, min=1, max=256,
                     tooltip="Samples per step (per process under torchrun)."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5, round=1e-7,
                       tooltip="AdamW peak learning rate (C2C uses 1e-4)."),
        io.Int.Input("warmup_steps", default=0, min=0, max=1_000_000,
                     tooltip="Linear learning-rate warm-up steps; must be below steps."),
        io.Combo.Input("schedule", options=list(DECAYS), default="cosine",
                       tooltip="Learning-rate decay after warm-up."),
        io.Int.Input("checkpoint_every", default=100, min=0, max=1_000_000,
                     tooltip="Write a checkpoint every N steps (0: only at the end). An interrupted run "
                             "loses at most the steps since the last one."),
        io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                     tooltip="Seed of sample order, noise and timesteps. Same seed and settings, same "
                             "weights (and a re-queue reuses the trained result instead of retraining)."),
        io.String.Input("output_name", default=output_name,
                        tooltip="Bundle name in models/c2c_projectors/ (.safetensors is added); also names "
                                "the checkpoint folder and the loss plot."),
        io.Boolean.Input("resume", default=True, optional=True,
                         tooltip="On: continue from the last checkpoint of output_name (same settings "
                                 "required). Off: delete that run's checkpoints and start over."),
    ]


class TrainC2CProjector(io.ComfyNode):
    NODE = "Train C2C Projector"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTCacheBridge_TrainC2CProjector", display_name=cls.NODE, category=TRAIN_CATEGORY,
            description="Trains a learnable projector (gating, full or c2c) for a sharer → receiver pair on the "
                        "samples saved by Save C2C Training Sample. Both models stay frozen and unchanged; only "
                        "the projector learns. Saves the result in models/c2c_projectors/ and checkpoints in "
                        "output/c2c_training/checkpoints/; queueing the same node again resumes.",
            inputs=[
                io.Model.Input("sharer", tooltip="The model whose K/V are shared (e.g. ChronoEdit). Frozen."),
                io.Model.Input("receiver", tooltip="The model that receives the K/V (e.g. Wan2.1). Frozen."),
                Projector.Input("projector", tooltip="The projector to train: Create C2C Projector with kind c2c, "
                                                     "full or gating for this pair (or a trained one to continue "
                                                     "from). It is copied, not changed."),
                io.String.Input("dataset", default="c2c_samples",
                                tooltip="Folder under output/c2c_training/ written by Save C2C Training Sample."),
                io.Combo.Input("loss", options=list(LOSS_KINDS), default="distill",
                               tooltip="distill: match the sharer's own prediction (learns what the sharer knows). "
                                       "velocity: the flow-matching loss of the bridged receiver against the clean "
                                       "latent (noise − x0). kv: make the projected K/V match the sharer's cache "
                                       "(cheap warm start; equal attention shapes only)."),
                *training_inputs("c2c_projector"),
                io.Float.Input("negative_share", default=0.1, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Fraction of examples trained with the negative conditionings (the bridge "
                                       "also fuses CFG's negative pass)."),
            ],
            outputs=[Projector.Output(display_name="projector", tooltip="The trained projector, ready for Fuse "
                                                                         "Caches or Bridged KSampler."),
                     io.Image.Output(display_name="loss_plot", tooltip="The loss curve.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, dataset=None, **kwargs):
        return dataset_fingerprint(dataset)

    @classmethod
    def execute(cls, sharer, receiver, projector, dataset, loss, steps, batch_size, learning_rate, warmup_steps,
                schedule, checkpoint_every, seed, output_name, resume=True, negative_share=0.1) -> io.NodeOutput:
        check_inputs(cls, locals())
        node = cls.NODE
        sharer_sig = model_signature(node, "sharer", sharer)
        receiver_sig = model_signature(node, "receiver", receiver)
        check_projector_fits(node, projector, sharer_sig, receiver_sig)
        check_learnable(node, projector)
        check(loss != "kv" or (sharer_sig.num_heads, sharer_sig.head_dim) == (receiver_sig.num_heads,
                                                                              receiver_sig.head_dim),
              node, "loss", "'kv' for models of different attention widths", "models with equal heads × head_dim",
              "use 'distill' or 'velocity' for this pair")
        check(warmup_steps < steps, node, "warmup_steps", str(warmup_steps), f"fewer than steps ({steps})",
              "lower warmup_steps or raise steps")
        data_name = checked_folder(node, "dataset", dataset)
        out_name = checked_name(node, "output_name", output_name, "file name")
        data = open_dataset(node, data_name, training.open_training_set, "Save C2C Training Sample")
        settings = dict(loss=loss, steps=steps, batch_size=batch_size, lr=learning_rate, warmup_steps=warmup_steps,
                        decay=schedule, checkpoint_every=checkpoint_every, seed=seed, negative_share=negative_share)

        def train(settings, output_path, progress):
            return training.train_projector(sharer, receiver, projector, data, settings, resume=resume,
                                            output_path=output_path, progress=progress)

        return run_training_node(cls, out_name, settings, train, f"{loss} loss, {{kind}} projector",
                                 "samples that fit both models",
                                 "re-save the samples with Save C2C Training Sample for this pair")


def check_learnable(node: str, projector) -> None:
    check(any(True for _ in projector.bank.parameters()), node, "projector",
          f"a '{projector.bank.kind}' projector, which has nothing to learn", "a learnable projector",
          "set Create C2C Projector's kind to c2c, full or gating")


def open_dataset(node: str, data_name: str, opener, saver: str):
    """The sample folder opened by the host's reader, its refusals on the node's 'dataset' input."""
    try:
        return opener(samples_root() / data_name)
    except TrainingDataError as e:
        raise BridgeInputError(node, "dataset", e.found, e.expected or f"a folder of samples written by {saver}",
                               e.fix or f"save samples into output/{training.SAMPLES_SUBFOLDER}/{data_name}/ first, "
                               "or pick the folder you saved them to") from e


def run_training_node(cls, out_name: str, settings: dict, train, plot_title: str, samples_expected: str,
                      samples_fix: str) -> io.NodeOutput:
    """What both training nodes do around their host's training call: the checkpoint folder, the progress bar (and
    interrupt), the refusals as the node's own, the loss plot shown and saved next to the samples."""
    node = cls.NODE
    bar = compat.progress_bar(settings["steps"], node_id=cls.hidden.unique_id if cls.hidden else None)

    def progress(done, total, value):
        bar.update_absolute(done, total)
        compat.throw_if_interrupted()

    with training_refusals(node, samples_expected, samples_fix):
        folder = samples_root() / training.CHECKPOINTS_SUBFOLDER / out_name
        outcome = train(TrainSettings(checkpoint_dir=folder, **settings),
                        Path(projector_folder()) / f"{out_name}.safetensors", progress)
    plot = loss_plot(outcome.losses, plot_title.format(kind=outcome.bundle.bank.kind))
    write_png(plot, samples_root() / f"{out_name}_loss.png")
    return io.NodeOutput(outcome.bundle, plot)


@contextlib.contextmanager
def training_refusals(node: str, samples_expected: str, samples_fix: str):
    """c2c_core's training errors as the node's own, each on the input it concerns with its fix."""
    try:
        yield
    except TrainingDataError as e:
        raise BridgeInputError(node, "dataset", e.found, e.expected or samples_expected, e.fix or samples_fix) from e
    except ResumeError as e:    # a checkpoint made with other settings, or a damaged one
        raise BridgeInputError(node, "resume", str(e).rstrip("."), "a checkpoint of this output_name, intact and "
                               "made with these settings", "use the settings of the interrupted run, switch resume "
                               "off, or pick a new output_name") from e
    except DivergedError as e:  # NaN/Inf loss or weights: nothing was saved from that step on
        raise BridgeInputError(node, "learning_rate", str(e), "a run whose loss and weights stay finite",
                               "lower learning_rate, or switch resume off to start over") from e
    except C2CError as e:       # TrainConfig names the field it refused
        field = re.search(r"TrainConfig\.(\w+)", str(e))
        input_name = _CONFIG_INPUTS.get(field.group(1), "steps") if field else "projector"
        raise BridgeInputError(node, input_name, str(e), "a valid training setting", "change that input") from e


def projector_folder() -> str:
    """The first registered models/c2c_projectors folder (created when missing)."""
    folder = folder_paths.get_folder_paths(paths.FOLDER)[0]
    os.makedirs(folder, exist_ok=True)
    return folder


def loss_plot(losses: list[float], title: str = "loss") -> torch.Tensor:
    """The loss curve as a ComfyUI IMAGE (1, H, W, 3) float in [0, 1]: raw per-step loss and a moving mean."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    import numpy as np

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = np.arange(1, len(losses) + 1)
    values = np.asarray(losses, dtype=np.float64)
    if len(values):
        ax.plot(steps, values, color="#9db4d6", linewidth=0.8, label="per step")
        window = max(1, len(values) // 20)
        if window > 1:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color="#1f4e99", linewidth=1.6, label=f"mean of {window}")
        if (values > 0).all():
            ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0).unsqueeze(0)


def write_png(image: torch.Tensor, path) -> Path:
    """An IMAGE (1, H, W, 3) as a PNG file (its folder created); returns the path."""
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(array).save(path)
    return path
