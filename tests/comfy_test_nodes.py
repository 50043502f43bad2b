"""Test-only ComfyUI nodes and the conditioning makers they share with the in-process tests.

Wan's text conditioning is a (B, L, 4096) tensor from umT5; the tests have no text encoder, so they
make that tensor from a seed. The same function serves both sides: ``tests/host.py`` uses it
in-process, and the test server loads this file as a custom node (``ComfyServer`` links it into its
custom_nodes folder), so a graph can sample the tiny models without a text encoder, with
conditioning bit-identical to the in-process one. Never shipped with the pack.

Top level imports torch only; ComfyUI modules are imported inside the functions that need them.
"""

from __future__ import annotations

import torch

TEXT_DIM = 4096  # umT5-XXL width; fixed by ComfyUI's Wan detection
CLIP_TOKENS = 257  # CLIP-H/14 penultimate hidden states: class token + 16x16 patches
CLIP_DIM = 1280


def wan_text_context(seed: int, length: int = 8, batch: int = 1) -> torch.Tensor:
    """A seeded stand-in for umT5 output: float32 (batch, length, 4096), standard normal."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(batch, length, TEXT_DIM, generator=gen, dtype=torch.float32)


def wan_conditioning(seed: int, length: int = 8, batch: int = 1) -> list:
    """ComfyUI CONDITIONING for Wan: ``[[context (batch, length, 4096), {}]]``."""
    return [[wan_text_context(seed, length, batch), {}]]


def clip_vision_features(seed: int, batch: int = 1) -> torch.Tensor:
    """A seeded stand-in for CLIPVisionEncode's penultimate hidden states: (batch, 257, 1280)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(batch, CLIP_TOKENS, CLIP_DIM, generator=gen, dtype=torch.float32)


def i2v_conditioning(conditioning: list, concat_latent: torch.Tensor, clip_fea: torch.Tensor | None = None,
                     known_frames: int = 1) -> list:
    """Image-to-video conditioning set the way WanImageToVideo sets it, without a VAE or CLIP vision.

    conditioning: CONDITIONING to extend (not modified; copies are returned).
    concat_latent: (B, 16, T, H, W), the VAE-encoded start video in latent space (unprocessed, as
        ``vae.encode`` returns it; the model applies ``process_latent_in`` itself). WanImageToVideo
        encodes the start image followed by grey frames.
    clip_fea: (B, 257, 1280) CLIP-vision penultimate hidden states, or None (then the model's image
        cross-attention attends to the text tokens, as ComfyUI does without clip_vision_output).
    known_frames: how many leading latent frames are given by the image: ``concat_mask`` is 0 there
        and 1 elsewhere, shape (1, 1, T, H, W), as WanImageToVideo builds it.

    Reads in WAN21.extra_conds / concat_cond: ``concat_latent_image``, ``concat_mask`` and
    ``clip_vision_output.penultimate_hidden_states``.
    """
    import comfy.clip_vision
    import node_helpers

    if concat_latent.dim() != 5:
        raise ValueError(f"concat_latent must be (B, 16, T, H, W), got {tuple(concat_latent.shape)}")
    _, _, frames, height, width = concat_latent.shape
    mask = torch.ones((1, 1, frames, height, width), dtype=concat_latent.dtype, device=concat_latent.device)
    mask[:, :, :known_frames] = 0.0
    out = node_helpers.conditioning_set_values(conditioning, {"concat_latent_image": concat_latent, "concat_mask": mask})
    if clip_fea is not None:
        clip_output = comfy.clip_vision.Output()
        clip_output.penultimate_hidden_states = clip_fea
        out = node_helpers.conditioning_set_values(out, {"clip_vision_output": clip_output})
    return out


class DCBTestWanConditioning:
    """Seeded Wan text conditioning, for graphs that run without a text encoder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of the stand-in text embedding."}),
            "length": ("INT", {"default": 8, "min": 1, "max": 512, "tooltip": "Number of text tokens."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "_for_testing/dit_cache_bridge"

    def make(self, seed, length, batch_size):
        return (wan_conditioning(seed, length, batch_size),)


class DCBTestWanImageConditioning:
    """Adds WanImageToVideo's image conditioning from a latent and a seeded CLIP-vision stand-in."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "start_latent": ("LATENT", {"tooltip": "Used as the encoded start video (concat_latent_image)."}),
            "clip_seed": ("INT", {"default": 0, "min": -1, "max": 2**31 - 1,
                                  "tooltip": "Seed of the stand-in CLIP-vision features; -1 for none."}),
            "known_frames": ("INT", {"default": 1, "min": 0, "max": 4096}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "_for_testing/dit_cache_bridge"

    def make(self, conditioning, start_latent, clip_seed, known_frames):
        latent = start_latent["samples"]
        clip_fea = None if clip_seed < 0 else clip_vision_features(clip_seed, latent.shape[0])
        return (i2v_conditioning(conditioning, latent, clip_fea, known_frames),)


NODE_CLASS_MAPPINGS = {
    "DCBTestWanConditioning": DCBTestWanConditioning,
    "DCBTestWanImageConditioning": DCBTestWanImageConditioning,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DCBTestWanConditioning": "Test: Wan conditioning from seed",
    "DCBTestWanImageConditioning": "Test: Wan image conditioning",
}


# --------------------------------------------------------------------------------------------------
# `make demo` with the trained tiny pair: the miniature experiment's held-out videos as graph inputs
# --------------------------------------------------------------------------------------------------

def _miniature():
    """experiments/miniature.py (its data functions import torch only), under a private module name."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "_dcb_experiments_miniature"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "experiments" / "miniature.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def demo_moving_squares(indices: list[int]) -> tuple[torch.Tensor, list, list]:
    """(start latent, positive, negative) of the experiment's held-out videos ``indices``, built by its own code.

    start latent: (N, 16, 3, 8, 8) in VAE latent space, the first frame then zeros (the sharer's image);
    positive: the direction's stand-in text embedding per video; negative: the shared negative one.
    """
    import comfy.latent_formats

    mini = _miniature()
    videos, classes = mini.demo_test_videos(mini.Settings().test_videos)
    videos, classes = videos[indices], classes[indices]
    latents = comfy.latent_formats.Wan21().process_out(videos)
    conds = mini.conditionings(latents, classes, mini.text_embeddings(0))
    start = conds["sharer_positive"][0][1]["concat_latent_image"]
    return start, conds["receiver_positive"], conds["receiver_negative"]


class DCBDemoMovingSquares:
    """The demo's inputs for the trained tiny pair: a start latent and the text conditioning of test videos."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "videos": ("STRING", {"default": "1,10,12,14", "tooltip": "Comma-separated indices into the miniature "
                                                                "experiment's 64 held-out test videos (seed 0)."}),
        }}

    RETURN_TYPES = ("LATENT", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("start_latent", "positive", "negative")
    FUNCTION = "make"
    CATEGORY = "_for_testing/dit_cache_bridge"

    def make(self, videos):
        indices = [int(v) for v in videos.split(",") if v.strip()]
        start, positive, negative = demo_moving_squares(indices)
        return ({"samples": start}, positive, negative)


NODE_CLASS_MAPPINGS["DCBDemoMovingSquares"] = DCBDemoMovingSquares
NODE_DISPLAY_NAME_MAPPINGS["DCBDemoMovingSquares"] = "Test: demo moving squares (miniature test videos)"


# --------------------------------------------------------------------------------------------------
# The tiny Qwen models (tools/make_tiny_qwen.py): the stock CLIPLoader/UNETLoader build Qwen's full widths, so
# graphs on the tiny files load them through these (ComfyUI's own loaders with the files' sizes)
# --------------------------------------------------------------------------------------------------

def _make_tiny_qwen():
    import importlib.util
    import sys
    from pathlib import Path

    name = "_dcb_make_tiny_qwen"
    if name not in sys.modules:
        tools = Path(__file__).resolve().parents[1] / "tools"
        sys.path.insert(0, str(tools))        # make_tiny_qwen imports its sibling make_tiny_models
        spec = importlib.util.spec_from_file_location(name, tools / "make_tiny_qwen.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class DCBTestTinyQwenCLIP:
    """A tiny Qwen-VL text encoder file as Load CLIP (type qwen_image) would give it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "Absolute path of a tiny encoder file."})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "_for_testing/dit_cache_bridge"

    def load(self, path):
        return (_make_tiny_qwen().load_tiny_clip(path),)


class DCBTestTinyQwenImage:
    """The tiny Qwen-Image DiT file as Load Diffusion Model would give it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "Absolute path of the tiny DiT file."})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "_for_testing/dit_cache_bridge"

    def load(self, path):
        return (_make_tiny_qwen().load_tiny_qwen_image(path),)


NODE_CLASS_MAPPINGS.update(DCBTestTinyQwenCLIP=DCBTestTinyQwenCLIP, DCBTestTinyQwenImage=DCBTestTinyQwenImage)
NODE_DISPLAY_NAME_MAPPINGS.update(DCBTestTinyQwenCLIP="Test: tiny Qwen-VL text encoder",
                                  DCBTestTinyQwenImage="Test: tiny Qwen-Image DiT")
