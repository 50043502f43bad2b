"""Load C2C Projector and Create C2C Projector: where a C2C_PROJECTOR comes from."""
from __future__ import annotations

import logging
import math

import torch
from comfy_api.latest import io

from c2c_core import (COMPUTED_MAP_KINDS, PROJECTOR_KINDS as CORE_PROJECTOR_KINDS, BundleError, LayerMap,
                        LayerMapError, ProjectorBank, ProjectorBundle, ProjectorConfigError, load_bundle,
                        parse_layer_spec)
from c2c_core.bundle import arch_mismatches
from c2c_core.errors import cut, quote
from ..c2c_comfy import compat, paths
from ..c2c_comfy.errors import BridgeInputError, check
from ..c2c_comfy.text_encoder import RECEIVER_KINDS, SHARER_KINDS, encoder_of, encoder_signature
from .types import CATEGORY, Projector

log = logging.getLogger("dit_cache_bridge")

PROJECTOR_KINDS = list(CORE_PROJECTOR_KINDS)     # the combos' options: c2c_core's lists, one home
MAPPING_KINDS = list(COMPUTED_MAP_KINDS)


class LoadC2CProjector(io.ComfyNode):
    NODE = "Load C2C Projector"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTCacheBridge_LoadC2CProjector", display_name=cls.NODE, category=f"{CATEGORY}/projectors",
            description="Load a trained projector bundle (.safetensors) from models/c2c_projectors. A bundle may "
                        "also hold a backward (receiver -> sharer) bank, which Fuse Caches and Bridged KSampler use "
                        "for direction 'bidirectional' when no backward_projector is connected.",
            inputs=[io.Combo.Input("projector_name", options=paths.projector_files(),
                                   tooltip="A projector bundle in models/c2c_projectors. Only .safetensors files "
                                           "are listed; pickled .pt/.ckpt files are never loaded.")],
            outputs=[Projector.Output(tooltip="Projector bank, layer map and the model pair it was made for.")],
        )

    @classmethod
    def validate_inputs(cls, projector_name):
        """Where projector files go, instead of the host's bare "Invalid input" / "Value not in list" (an empty list
        is what a new user meets first)."""
        files = paths.projector_files()
        if isinstance(projector_name, str) and projector_name in files:
            return True
        folder = "models/c2c_projectors/"
        if not files:
            return (f"{cls.NODE}: no projector in {folder}. Put a bundle (.safetensors from Train C2C Projector or "
                    f"tools/train_projector.py) there and press R in the editor to refresh the list, or use Create "
                    f"C2C Projector (identity/weighted need no training).")
        return (f"{cls.NODE}: {quote(projector_name, 60)} is not in {folder}; pick a bundle from the list (press R "
                f"after adding files).")

    @classmethod
    def fingerprint_inputs(cls, projector_name, **kwargs):
        """Re-run when the bundle under the name changes (replaced, re-trained, removed)."""
        return paths.projector_fingerprint(projector_name)

    @classmethod
    def execute(cls, projector_name: str) -> io.NodeOutput:
        check(isinstance(projector_name, str), cls.NODE, "projector_name", quote(projector_name, 60),
              "a file name from the list", "pick a bundle from the list")
        try:
            bundle = load_bundle(paths.projector_path(projector_name))
        except (BundleError, FileNotFoundError) as e:
            raise BridgeInputError(cls.NODE, "projector_name", cut(str(e)), "a C2C projector bundle",
                                   "pick a bundle saved by DiT Cache Bridge (Create/Train C2C Projector or tools/train_projector.py), or re-export it as .safetensors") from e
        warning = untagged_warning(bundle)
        if warning:
            log.warning("%s: %s: %s", cls.NODE, quote(projector_name, 120), warning)
        return io.NodeOutput(bundle)


class CreateC2CProjector(io.ComfyNode):
    NODE = "Create C2C Projector"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTCacheBridge_CreateC2CProjector", display_name=cls.NODE, category=f"{CATEGORY}/projectors",
            description="Training-free projectors (identity, weighted) for same-architecture pairs, or a freshly "
                        "initialised learnable one to train.",
            inputs=[
                io.MultiType.Input(io.Model.Input("sharer", tooltip="The model whose K/V are shared (e.g. ChronoEdit), "
                                                  "or a text encoder (CLIP: Qwen3-VL)."), types=[io.Model, io.Clip]),
                io.MultiType.Input(io.Model.Input("receiver", tooltip="The model that receives the K/V (e.g. Wan2.1), "
                                                  "or a text encoder (CLIP: Qwen-Image's Qwen2.5-VL)."),
                                   types=[io.Model, io.Clip]),
                io.Combo.Input("kind", options=PROJECTOR_KINDS, default="identity",
                               tooltip="identity: sharer K/V replace the receiver's (same architecture only). "
                                       "weighted: alpha·sharer + (1−alpha)·receiver. gating/full/c2c: learnable, "
                                       "freshly initialised — train them first. auto: gating for equal shapes, "
                                       "full otherwise."),
                io.Combo.Input("mapping", options=MAPPING_KINDS, default="terminal",
                               tooltip="Which sharer layer feeds which receiver layer. terminal: last layers "
                                       "aligned (C2C default); identity: layer i to i; position: nearest relative "
                                       "depth; uniform: evenly spread pairs."),
                io.String.Input("layers", default="all",
                                tooltip="Receiver layers to fuse: 'all', ranges like '0-3,7', 'last4', 'first4', "
                                        "'-1' for the last layer."),
                io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the sharer for the 'weighted' projector."),
                io.Int.Input("hidden_dim", default=0, min=0, max=65536,
                             tooltip="Hidden width of learnable projectors; 0 picks the kind's default (c2c: the receiver's "
                                     "K/V width ÷ 8, from 64 to 512; full 512; gating 64)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Initialisation seed of learnable projectors (not a noise seed: fixed, "
                                     "so the projector is not re-created on every run)."),
            ],
            outputs=[Projector.Output()],
        )

    @classmethod
    def execute(cls, sharer, receiver, kind, mapping, layers, alpha, hidden_dim, seed) -> io.NodeOutput:
        _check_create_inputs(cls.NODE, kind, mapping, layers, alpha, hidden_dim, seed)
        sharer_sig, receiver_sig = pair_signatures(cls.NODE, sharer, receiver)
        try:
            fused = parse_layer_spec(layers, receiver_sig.num_layers)
        except (LayerMapError, ValueError) as e:
            # the core's message says what is wrong and lists the accepted forms: the one list the user reads
            raise BridgeInputError(cls.NODE, "layers", quote(layers), "a layer list", str(e)) from e
        try:
            layer_map = LayerMap.build(mapping, sharer_sig.num_layers, receiver_sig.num_layers, layers=fused)
        except LayerMapError as e:
            raise BridgeInputError(cls.NODE, "mapping", f"'{mapping}' cannot pair {sharer_sig.num_layers} sharer "
                                   f"with {receiver_sig.num_layers} receiver layers ({e})", "a mapping that fits",
                                   "use 'terminal' or 'position' for models with different depths") from e
        hparams = {"alpha": alpha} if kind == "weighted" else {}
        if kind in ("gating", "full", "c2c", "auto") and hidden_dim:
            hparams["hidden_dim"] = hidden_dim
        torch.manual_seed(seed)
        try:
            bank = ProjectorBank.build(kind, sharer_sig, receiver_sig, sorted(layer_map.pairs), **hparams)
        except ProjectorConfigError as e:
            raise BridgeInputError(cls.NODE, "kind", f"'{kind}' for sharer {_shape(sharer_sig)} and receiver "
                                   f"{_shape(receiver_sig)} ({e})", "a projector that fits both models",
                                   "use 'full' or 'c2c' (trained) when heads × head_dim differ") from e
        bank.eval()
        bundle = ProjectorBundle(bank=bank, layer_map=layer_map, sharer=sharer_sig, receiver=receiver_sig,
                                 provenance={"created_by": cls.NODE, "seed": seed,
                                             "trained": bank.kind in ("identity", "weighted")}, metadata={})
        return io.NodeOutput(bundle)


def _check_create_inputs(node, kind, mapping, layers, alpha, hidden_dim, seed) -> None:
    """ComfyUI checks neither V3 combo values in API prompts nor numbers that arrive through links."""
    check(kind in PROJECTOR_KINDS, node, "kind", quote(kind, 60), f"one of {PROJECTOR_KINDS}", "pick a kind from the list")
    check(mapping in MAPPING_KINDS, node, "mapping", quote(mapping, 60), f"one of {MAPPING_KINDS}",
          "pick a mapping from the list")
    check(isinstance(layers, str) and len(layers) <= 200, node, "layers", quote(layers, 60),
          "a layer list such as 'all', '0-3,7' or 'last4'", "type a layer list")
    check(type(alpha) in (int, float) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0, node, "alpha", quote(alpha, 40),
          "a number from 0 to 1", "0.5 mixes sharer and receiver equally")
    check(type(hidden_dim) is int and 0 <= hidden_dim <= 65536, node, "hidden_dim", quote(hidden_dim, 40),
          "an integer from 0 to 65536", "0 picks the kind's default width")
    check(type(seed) is int and 0 <= seed < 2**64, node, "seed", quote(seed, 40), "an integer from 0 to 2^64-1",
          "any fixed number, e.g. 0")


def untrained_warning(bundle) -> str | None:
    """A learnable projector straight from Create C2C Projector has random weights: it fuses noise, not knowledge."""
    if bundle.provenance.get("trained") is not False:
        return None
    return (f"untrained '{bundle.bank.kind}' projector: its random weights change the output but carry none of "
            f"the sharer's knowledge. Train it (Train C2C Projector) and load it with Load C2C Projector, or set "
            f"{CreateC2CProjector.NODE}'s kind to 'identity' or 'weighted' (training-free).")


def pair_signatures(node: str, sharer, receiver):
    """The two sides of a new projector: two diffusion models (MODEL) or two Qwen-VL text encoders (CLIP)."""
    if compat.is_clip(sharer) or compat.is_clip(receiver):
        for name, value in (("sharer", sharer), ("receiver", receiver)):
            check(compat.is_clip(value), node, name, f"a {type(value).__name__} beside a CLIP",
                  "two text encoders (CLIP) or two diffusion models (MODEL)",
                  "connect the Qwen3-VL and the Qwen2.5-VL text encoders (Load CLIP), or two diffusion models")
        return (encoder_signature(encoder_of(node, "sharer", sharer, SHARER_KINDS)),
                encoder_signature(encoder_of(node, "receiver", receiver, RECEIVER_KINDS)))
    return model_signature(node, "sharer", sharer), model_signature(node, "receiver", receiver)


def model_signature(node: str, input_name: str, model):
    """The Wan signature of a MODEL input, or an error saying what the pack supports."""
    try:
        return compat.wan_signature(model)
    except compat.NotAWanModel as e:
        raise BridgeInputError(node, input_name, str(e), "a Wan2.1-architecture model (Wan2.1, ChronoEdit)",
                               "load a Wan2.1 or ChronoEdit diffusion model with Load Diffusion Model") from e


def check_same_latent(node: str, input_name: str, sharer, receiver) -> None:
    """A live sharer samples the receiver's latent: both models must use one latent format.

    Wan2.2-TI2V-5B samples a 48-channel latent (ComfyUI's Wan22 format); Wan2.1, ChronoEdit and the
    Wan2.2 A14B experts a 16-channel one (Wan21). Fed the other one, ComfyUI fails deep inside the
    model (``zeros: Dimension size must be non-negative``) or pads it into a wrong picture.
    """
    role, other = ("receiver", "sharer") if input_name in ("model", "receiver") else ("sharer", "receiver")
    formats = {"sharer": compat.latent_format(sharer), "receiver": compat.latent_format(receiver)}
    (own_name, own_channels), (other_name, other_channels) = formats[role], formats[other]
    check(own_channels == other_channels, node, input_name,
          f"a {role} that samples the {own_name} latent ({own_channels} channels), but the {other} samples the "
          f"{other_name} latent ({other_channels} channels)",
          "a sharer and a receiver of one latent format (Wan2.2-TI2V-5B: 48 channels; Wan2.1, ChronoEdit, "
          "Wan2.2 A14B: 16 channels)",
          "pair Wan2.2-TI2V-5B only with Wan2.2-TI2V-5B, and Wan2.1-latent models only with each other")


def _shape(sig) -> str:
    return f"{sig.num_layers} layers × {sig.num_heads} heads × {sig.head_dim}"


def check_projector_fits(node: str, bundle, sharer_sig, receiver_sig, input_name: str = "projector") -> None:
    """The bundle's shapes, then its architecture tags (c2c_core.arch), against the models it is used with."""
    check(bundle.receiver.same_shape(receiver_sig), node, input_name,
          f"a projector made for a receiver of {_shape(bundle.receiver)}, but the receiver model has "
          f"{_shape(receiver_sig)}", "the pair the projector was made for",
          "load the projector trained for this receiver, or create one with Create C2C Projector")
    check(bundle.sharer.same_shape(sharer_sig), node, input_name,
          f"a projector made for a sharer of {_shape(bundle.sharer)}, but the sharer model has {_shape(sharer_sig)}",
          "the pair the projector was made for",
          "load the projector trained for this sharer, or create one with Create C2C Projector")
    for mismatch in arch_mismatches(bundle, sharer_sig, receiver_sig):
        raise BridgeInputError(node, input_name, mismatch.describe(),
                               f"a projector made for this {mismatch.role}'s architecture (same shapes are not enough: "
                               f"it learned another network's keys and values)",
                               f"load the projector trained for this pair of models, or train one for it with Train "
                               f"C2C Projector (Create C2C Projector makes a training-free one)")


def untagged_warning(bundle) -> str | None:
    """A bundle saved before bundles named their models' architectures is accepted on shapes alone."""
    if bundle.tagged:
        return None
    return ("the bundle does not name the architectures it was made for (saved by an older DiT Cache Bridge); it is "
            "accepted because the shapes fit, but a projector for another pair of the same shapes would be accepted "
            "too. Re-save it with this version (tools/retag_projector.py) to have it checked.")
