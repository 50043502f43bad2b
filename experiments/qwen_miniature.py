"""Does a trained projector carry what a Qwen3-VL sharer reads into the image a Qwen-Image DiT draws?

A miniature of the text-encoder pair (Qwen3-VL sharer -> Qwen2.5-VL receiver -> Qwen-Image DiT), small
enough for two CPU cores, built on the diffusers/transformers host (c2c_diffusers.text_encoder):

- data: prompts "a {colour} {shape} on a {colour} background" (8 colours, 4 shapes) and their 8 x 8
  latent images (4 channels): the shape's mask painted with the foreground colour's latent vector over
  the background's. The image is a function of the prompt; prompts are split into train / validation /
  test by combination, so every test prompt is a combination no model was trained on.
- seeing receiver: a tiny transformers Qwen2.5-VL (hidden 64, 2 layers, 2 K/V heads), seeded, RMSNorm weights 1,
  then **taught** briefly (``teach_receiver``): linear probes read the foreground and background colours from its
  last rows (the template's suffix after the prompt), so it learns to carry the colour words there through
  attention, as a pretrained encoder's later tokens summarise the earlier ones (a stand-in for one).
- receiver: the taught encoder made **colour-blind**: the embedding rows of the 8 colour words are replaced by their
  mean, so it attends as the seeing one does but cannot tell "red" from "blue"; the shape words are untouched.
  Handing it the seeing receiver's own K/V (the K/V oracle) restores every row but the colour words' own.
- DiT: a tiny diffusers QwenImageTransformer2DModel trained here with flow matching on prompt embeddings
  made by QwenImagePipeline.encode_prompt (template and all), half of the rows from the seeing receiver
  and half from the blind one: it paints the colours when the conditioning names them and its best
  guess when it does not (a DiT trained on only the seeing embeddings meets the blind ones out of its
  distribution, and the receiver-alone baseline is then broken rather than ignorant).
- sharer: a tiny random transformers Qwen3-VL of another seed (its own M-RoPE layout, k_norm, RMSNorm weights 1),
  never taught: it sees every word, colours included, in its colour words' own K/V.

Then, with the encoders and the DiT frozen, the blind receiver's self-attention reads the sharer's
projected K/V through ``c2c_diffusers.TextEncoderBridge`` (the same FusionRun as inference), and
projectors are trained with helper 22's path: ``train_bank`` + ``velocity_loss(bridged_prompt_velocity)``,
the frozen DiT's flow-matching loss. Compared on held-out prompts: receiver alone, seeing receiver
(upper bound), training-free weighted fusion (alpha chosen on validation), the trained projectors, a
shuffled-sharer control (the trained c2c projector reading another prompt's sharer K/V) and the K/V oracle.

Run through ``experiments/run_qwen_miniature.py``; this module is the per-seed pipeline.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "white")
SHAPES = ("square", "ring", "cross", "stripe")
CHANNELS, SIZE = 4, 8                   # latent image: 4 channels of 8 x 8 -> 16 packed tokens of 16
EVAL_SIGMAS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.95)
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=151936)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)


@dataclass
class Settings:
    """Sizes of one run; the defaults take a few minutes per seed on one CPU thread."""
    dit_steps: int = 1500
    dit_batch: int = 32
    dit_lr: float = 1e-3
    blind_share: float = 0.5            # share of DiT training rows conditioned on the blind receiver
    embed_scale: float = 1.0            # the receiver's token embeddings times this (small: attention-dominant)
    attn_gain: float = 1.0              # the receiver's attention outputs (o_proj) times this (large: attention-dominant)
    unit_norms: bool = True             # both encoders' RMSNorm weights 1 (K/V of a real model's scale)
    teach_steps: int = 300              # steps teaching the seeing receiver to name the colours in its last tokens
    teach_lr: float = 3e-3
    teach_batch: int = 16
    teach_rows: int = 5                 # the last rows (the template's suffix after the prompt) the probe reads
    projector_steps: int = 400
    projector_batch: int = 16
    projector_lr: float = 3e-3
    projector_hidden: int = 128
    kinds: tuple = ("full", "c2c")
    alphas: tuple = (0.1, 0.25, 0.5, 1.0)
    sample_steps: int = 12
    split: tuple = (0.6, 0.15)          # train and validation shares of the prompts; the rest is test

    @classmethod
    def quick(cls) -> "Settings":
        """A dry-run size (seconds): the pipeline runs end to end, the numbers mean nothing."""
        return cls(dit_steps=4, dit_batch=4, teach_steps=2, teach_batch=2, projector_steps=2, projector_batch=2,
                   projector_hidden=16, kinds=("c2c",), alphas=(0.5,), sample_steps=2)


# ------------------------------------------------------------------------------------------------
# Data: the prompt names the colours and the shape; the latent image is drawn from them
# ------------------------------------------------------------------------------------------------
def shape_mask(shape: str) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                          indexing="ij")
    if shape == "square":
        return ((y >= 2) & (y <= 5) & (x >= 2) & (x <= 5)).float()
    if shape == "ring":
        d = ((y - 3.5) ** 2 + (x - 3.5) ** 2).sqrt()
        return ((d >= 2.0) & (d <= 3.6)).float()
    if shape == "cross":
        return (((y >= 3) & (y <= 4)) | ((x >= 3) & (x <= 4))).float()
    if shape == "stripe":
        return ((y - x).abs() <= 1).float()
    raise ValueError(shape)


@dataclass(frozen=True)
class Item:
    fg: int
    shape: int
    bg: int

    @property
    def prompt(self) -> str:
        return f"a {COLOURS[self.fg]} {SHAPES[self.shape]} on a {COLOURS[self.bg]} background"


def palette(seed: int) -> torch.Tensor:
    """(colours, 4) latent colour vectors, seeded."""
    return torch.randn(len(COLOURS), CHANNELS, generator=torch.Generator().manual_seed(500 + seed))


def image(item: Item, colours: torch.Tensor) -> torch.Tensor:
    """The (4, 8, 8) latent image of a prompt."""
    mask = shape_mask(SHAPES[item.shape])
    return colours[item.fg][:, None, None] * mask + colours[item.bg][:, None, None] * (1 - mask)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, 8, 8) -> (B, 16, 4 C): the 2 x 2 patches QwenImagePipeline packs latents into."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    b = packed.shape[0]
    return packed.view(b, SIZE // 2, SIZE // 2, CHANNELS, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, CHANNELS, SIZE,
                                                                                                 SIZE)


def splits(seed: int, settings: Settings) -> dict:
    """Every (fg, shape, bg) with fg != bg, shuffled by seed and split by combination."""
    items = [Item(f, s, b) for f in range(len(COLOURS)) for s in range(len(SHAPES)) for b in range(len(COLOURS))
             if f != b]
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    items = [items[i] for i in order]
    n_train, n_val = (int(share * len(items)) for share in settings.split)
    return {"train": items[:n_train], "val": items[n_train:n_train + n_val], "test": items[n_train + n_val:]}


# ------------------------------------------------------------------------------------------------
# Models: tiny random Qwen-VL encoders (transformers), a tiny Qwen-Image DiT (diffusers)
# ------------------------------------------------------------------------------------------------
def tokenizer():
    """The Qwen2.5 tokenizer files ComfyUI ships (COMFYUI_PATH, else the repo's .host/ComfyUI): no download."""
    import os
    from transformers import Qwen2Tokenizer
    root = Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".host" / "ComfyUI")
    return Qwen2Tokenizer.from_pretrained(root / "comfy" / "text_encoders" / "qwen25_tokenizer")


def _seeded(model, seed: int, unit_norms: bool = False):
    """Seeded random weights; the language-model head made 1 wide: the pipeline and the bridge read hidden states
    only, and the 151936-wide head would be most of the miniature's time (every forward computes logits).
    ``unit_norms``: the decoder's RMSNorm weights 1, as a real checkpoint's are O(1) and positive, so its K/V are
    O(1) as a real model's (random N(0, 0.1) weights make them about 0.1)."""
    model.lm_head = torch.nn.Linear(model.lm_head.in_features, 1, bias=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))
        if unit_norms:
            for name, p in model.model.language_model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
    return model.eval().requires_grad_(False)


def qwen25(seed: int, embed_scale: float = 1.0, attn_gain: float = 1.0, unit_norms: bool = False):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    config = Qwen2_5_VLConfig(text_config=dict(TEXT, rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3],
                                                                           rope_theta=1e6)),
                              vision_config=dict(VISION, fullatt_block_indexes=[0]))
    model = _seeded(Qwen2_5_VLForConditionalGeneration(config), seed, unit_norms)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(embed_scale)
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.mul_(attn_gain)
    return model


def qwen3(seed: int, unit_norms: bool = False):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    config = Qwen3VLConfig(text_config=dict(TEXT, head_dim=16, rope_parameters=dict(
                               rope_type="default", mrope_section=[2, 3, 3], mrope_interleaved=True, rope_theta=5e6)),
                           vision_config=dict(VISION, deepstack_visual_indexes=[0], num_position_embeddings=64))
    return _seeded(Qwen3VLForConditionalGeneration(config), seed, unit_norms)


def colour_blind(encoder, tok):
    """A copy of ``encoder`` whose colour words all embed as their mean: it cannot tell them apart."""
    blind = copy.deepcopy(encoder)
    ids = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in COLOURS]
    assert all(len(i) == 1 for i in ids), ids
    rows = blind.get_input_embeddings().weight
    with torch.no_grad():
        rows[[i[0] for i in ids]] = rows[[i[0] for i in ids]].mean(0)
    return blind


def dit(seed: int):
    from diffusers import QwenImageTransformer2DModel
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=CHANNELS * 4, out_channels=CHANNELS, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                       guidance_embeds=False, axes_dims_rope=(8, 4, 4))


def pipeline(encoder, tok, transformer):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=CHANNELS, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * CHANNELS,
                                 latents_std=[1.0] * CHANNELS).eval()
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder,
                             tokenizer=tok, transformer=transformer)


def velocity(transformer, x_t, sigma, embeds):
    """The DiT's velocity, called as QwenImagePipeline calls it (timestep = sigma)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(x_t.shape[0])
    return transformer(hidden_states=x_t, timestep=sigma, encoder_hidden_states=embeds,
                       encoder_hidden_states_mask=None, img_shapes=[[(1, SIZE // 2, SIZE // 2)]] * x_t.shape[0],
                       return_dict=False)[0]


def encode(pipe, prompts: list, chunk: int = 32):
    """Prompt embeddings through the pipeline's own encode_prompt (with whatever bridge is attached)."""
    out, masks = [], []
    with torch.no_grad():
        for start in range(0, len(prompts), chunk):
            e, m = pipe.encode_prompt(prompts[start:start + chunk], device="cpu")
            out.append(e)
            masks.append(m)
    lengths = {e.shape[1] for e in out}
    assert len(lengths) == 1 and all(m is None for m in masks), "every prompt has the same token count here"
    return torch.cat(out)          # no padding, so no mask (the pipeline passes none either)


def train_dit(transformer, seeing, blind, x0, settings: Settings, seed: int, log) -> list:
    """Flow matching of the whole DiT on (prompt embeddings, packed latent image) pairs; each row is conditioned on
    the seeing receiver's embeddings, or with probability ``settings.blind_share`` on the blind one's, so the DiT
    knows both: it paints the colours when the conditioning names them and its best guess when it does not (as a
    real DiT has seen its encoder's embeddings of what that encoder could and could not read)."""
    params = list(transformer.parameters())
    transformer.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(params, lr=settings.dit_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(7919 * seed + 1)
    losses = []
    for step in range(settings.dit_steps):
        warmup = min(1.0, (step + 1) / 50)
        for group in optimizer.param_groups:
            group["lr"] = settings.dit_lr * warmup * 0.5 * (1 + math.cos(math.pi * step / settings.dit_steps))
        idx = torch.randint(0, x0.shape[0], (settings.dit_batch,), generator=g)
        noise = torch.randn(x0[idx].shape, generator=g)
        sigma = torch.rand(settings.dit_batch, generator=g)
        x_t = (1 - sigma[:, None, None]) * x0[idx] + sigma[:, None, None] * noise
        use_blind = (torch.rand(settings.dit_batch, generator=g) < settings.blind_share)[:, None, None]
        embeds = torch.where(use_blind, blind[idx], seeing[idx])
        loss = torch.nn.functional.mse_loss(velocity(transformer, x_t, sigma, embeds), noise - x0[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, settings.dit_steps // 5) == 0:
            log(f"  DiT step {step + 1}/{settings.dit_steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    transformer.eval().requires_grad_(False)
    return losses


def teach_receiver(pipe, items: list, settings: Settings, seed: int, log) -> list:
    """Train the receiver briefly so that its last ``settings.teach_rows`` hidden states (the template's suffix after
    the prompt) name the foreground and background colours (two linear probes, cross-entropy), as a trained
    language model's later tokens summarise the earlier ones. Only attention can carry a colour word there, so the
    receiver learns to read its context: the stand-in for a pretrained encoder. Returns the per-step losses."""
    encoder = pipe.text_encoder
    text = encoder.model.language_model   # its layers and final norm learn; the 151936-row embedding stays as drawn
    params = [p for name, p in text.named_parameters() if not name.startswith("embed_tokens")]
    encoder.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(104_729 * seed + 3)
    width = encoder.config.text_config.hidden_size
    probes = torch.nn.ModuleList(torch.nn.Linear(width, len(COLOURS)) for _ in range(2))
    optimizer = torch.optim.AdamW(params + list(probes.parameters()), lr=settings.teach_lr, weight_decay=0.0)
    # the pipeline's own template and tokenizer, tokenized once (every prompt has the same token count, no padding)
    ids = pipe.tokenizer([pipe.prompt_template_encode.format(i.prompt) for i in items], return_tensors="pt")["input_ids"]
    labels = {side: torch.tensor([getattr(i, side) for i in items]) for side in ("fg", "bg")}
    losses = []
    for step in range(settings.teach_steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.teach_lr * 0.5 * (1 + math.cos(math.pi * step / settings.teach_steps))
        idx = torch.randint(0, len(items), (settings.teach_batch,), generator=g)
        # the hidden states encode_prompt hands the DiT: the last layer's, after the final norm
        rows = encoder(input_ids=ids[idx], output_hidden_states=True).hidden_states[-1][:, -settings.teach_rows:]
        loss = sum(torch.nn.functional.cross_entropy(probe(rows).flatten(0, 1),
                                                     labels[side][idx].repeat_interleave(settings.teach_rows))
                   for probe, side in zip(probes, ("fg", "bg"))) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, settings.teach_steps // 5) == 0:
            log(f"  receiver step {step + 1}/{settings.teach_steps} colour-probe loss "
                f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    encoder.eval().requires_grad_(False)
    return losses


# ------------------------------------------------------------------------------------------------
# Bridges
# ------------------------------------------------------------------------------------------------
def bundle(kind: str, sharer, receiver, seed: int, **hparams):
    from c2c_core import LayerMap, ProjectorBank
    from c2c_core.bundle import ProjectorBundle
    from c2c_diffusers.text_encoder import encoder_signature
    s, r = encoder_signature(sharer), encoder_signature(receiver)
    layer_map = LayerMap.build("terminal", s.num_layers, r.num_layers)
    torch.manual_seed(seed)
    bank = ProjectorBank.build(kind, s, r, layer_map.layers, **hparams).eval()
    return ProjectorBundle(bank=bank, layer_map=layer_map, sharer=s, receiver=r)


def shuffled_bridge_class():
    """TextEncoderBridge whose sharer K/V are rolled by one row over the batch: each prompt reads another prompt's
    sharer (every prompt here has the same tokens but for its words, so the token alignment is unchanged)."""
    from c2c_diffusers import TextEncoderBridge

    class ShuffledSharer(TextEncoderBridge):
        def _run_sharer(self, inputs):
            return {layer: (k.roll(1, 0), v.roll(1, 0)) for layer, (k, v) in super()._run_sharer(inputs).items()}

    return ShuffledSharer


def bridged_encode(pipe, sharer, tok, bundle_, prompts, shuffled=False):
    from c2c_diffusers import TextEncoderBridge
    cls = shuffled_bridge_class() if shuffled else TextEncoderBridge
    with cls(sharer, tok, bundle_).attach(pipe):
        return encode(pipe, prompts)


def train_projector(pipe, sharer, tok, fresh, train_items, colours, settings: Settings, seed: int):
    """The bank trained with the frozen DiT's flow-matching loss through the bridged encode_prompt (helper 22's
    ``bridged_prompt_velocity``); returns the per-step losses."""
    from c2c_core import TrainConfig, train_bank, velocity_loss
    from c2c_diffusers import TextEncoderBridge
    from c2c_diffusers.text_training import PromptBatch, bridged_prompt_velocity

    x0_all = pack(torch.stack([image(i, colours) for i in train_items]))
    g = torch.Generator().manual_seed(31 * seed + 5)

    def batches(step):
        idx = torch.randint(0, len(train_items), (settings.projector_batch,), generator=g)
        x0 = x0_all[idx]
        return PromptBatch(x0=x0, noise=torch.randn(x0.shape, generator=g), sigma=float(torch.rand(1, generator=g)),
                           img_shapes=[[(1, SIZE // 2, SIZE // 2)]] * len(idx),
                           prompt=[train_items[i].prompt for i in idx.tolist()])

    bridge = TextEncoderBridge(sharer, tok, fresh).attach(pipe)
    try:
        config = TrainConfig(steps=settings.projector_steps, lr=settings.projector_lr,
                             warmup_steps=min(20, settings.projector_steps // 5), seed=seed)
        result = train_bank(fresh.bank, fresh.layer_map, batches, velocity_loss(bridged_prompt_velocity(bridge, pipe)),
                            config)
    finally:
        bridge.detach()
    return result.losses


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def velocity_mse(transformer, embeds, x0, seed: int):
    """Mean velocity MSE over EVAL_SIGMAS (and per sigma); the same noise for every method."""
    g = torch.Generator().manual_seed(10_000 + seed)
    curve = {}
    with torch.no_grad():
        for sigma in EVAL_SIGMAS:
            noise = torch.randn(x0.shape, generator=g)
            x_t = (1 - sigma) * x0 + sigma * noise
            curve[sigma] = float(torch.nn.functional.mse_loss(velocity(transformer, x_t, sigma, embeds),
                                                              noise - x0))
    return sum(curve.values()) / len(curve), curve


def sample(transformer, embeds, steps: int, seed: int) -> torch.Tensor:
    """Euler sampling of the flow from seeded noise (sigma 1 -> 0 in equal steps); (B, 4, 8, 8) latents."""
    g = torch.Generator().manual_seed(20_000 + seed)
    x = torch.randn(embeds.shape[0], (SIZE // 2) ** 2, CHANNELS * 4, generator=g)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s_next - s) * velocity(transformer, x, float(s), embeds)
    return unpack(x)


def colour_accuracy(latents: torch.Tensor, items: list, colours: torch.Tensor) -> float:
    """Share of foreground and background colours of sampled images nearest to the prompt's colours."""
    right = 0
    for lat, item in zip(latents, items):
        mask = shape_mask(SHAPES[item.shape]).bool()
        for region, want in ((mask, item.fg), (~mask, item.bg)):
            mean = lat[:, region].mean(1)
            right += int(torch.cdist(mean[None], colours)[0].argmin()) == want
    return right / (2 * len(items))


def psnr(latents: torch.Tensor, truth: torch.Tensor) -> float:
    peak = float(truth.max() - truth.min())
    mse = ((latents - truth) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return float((10 * torch.log10(peak ** 2 / mse)).mean())


# ------------------------------------------------------------------------------------------------
# One seed, end to end
# ------------------------------------------------------------------------------------------------
@dataclass
class SeedResult:
    seed: int
    mse: dict = field(default_factory=dict)           # method -> mean velocity MSE (test)
    mse_curve: dict = field(default_factory=dict)     # method -> {sigma: MSE}
    colour: dict = field(default_factory=dict)        # method -> colour accuracy of sampled test images
    psnr: dict = field(default_factory=dict)          # method -> latent PSNR of sampled test images (dB)
    alpha_gap: dict = field(default_factory=dict)     # weighted alpha -> gap closed on validation
    chosen: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)        # final training losses (mean of the last 50 steps)
    counts: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)      # method -> the first test images sampled (lists), for the plot
    example_prompts: list = field(default_factory=list)
    sample_steps: int = 0


RECEIVER, UPPER, WEIGHTED, SHUFFLED = ("receiver alone (colour-blind)", "seeing receiver (upper bound)",
                                       "weighted fusion", "shuffled sharer (c2c)")
#: the most any K/V bridge can give here: the blind receiver reading the seeing receiver's own K/V (identity)
ORACLE = "K/V oracle (seeing twin's own K/V)"


def run_seed(seed: int, settings: Settings, out_dir: Path, log=print) -> SeedResult:
    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = SeedResult(seed)
    clock = time.monotonic()
    tok = tokenizer()
    colours = palette(seed)
    data = splits(seed, settings)
    result.counts = {k: len(v) for k, v in data.items()}
    seeing = qwen25(100 + seed, settings.embed_scale, settings.attn_gain, settings.unit_norms)
    sharer = qwen3(200 + seed, settings.unit_norms)
    transformer = dit(300 + seed)
    seeing_pipe = pipeline(seeing, tok, transformer)
    if settings.teach_steps:
        teach = teach_receiver(seeing_pipe, data["train"], settings, seed, log)
        result.losses["receiver probe"] = sum(teach[-20:]) / len(teach[-20:])
    result.seconds["teach receiver"] = time.monotonic() - clock
    clock = time.monotonic()
    blind = colour_blind(seeing, tok)
    blind_pipe = pipeline(blind, tok, transformer)
    x0 = {k: pack(torch.stack([image(i, colours) for i in v])) for k, v in data.items()}
    prompts = {k: [i.prompt for i in v] for k, v in data.items()}

    # 1. the DiT learns to paint from the receiver's embeddings, seeing or blind (train prompts only)
    dit_losses = train_dit(transformer, encode(seeing_pipe, prompts["train"]), encode(blind_pipe, prompts["train"]),
                           x0["train"], settings, seed, log)
    result.losses["DiT"] = sum(dit_losses[-50:]) / len(dit_losses[-50:])
    result.seconds["DiT"] = time.monotonic() - clock

    def score(name, e, split="test"):
        mse, curve = velocity_mse(transformer, e, x0[split], seed)
        if split == "test":
            result.mse[name], result.mse_curve[name] = mse, curve
            latents = sample(transformer, e, settings.sample_steps, seed)
            result.colour[name] = colour_accuracy(latents, data["test"], colours)
            result.psnr[name] = psnr(latents, unpack(x0["test"]))
            result.examples[name] = latents[:4].tolist()
        return mse

    # 2. baselines on held-out prompts
    clock = time.monotonic()
    score(RECEIVER, encode(blind_pipe, prompts["test"]))
    score(UPPER, encode(seeing_pipe, prompts["test"]))
    result.examples["truth"] = unpack(x0["test"][:4]).tolist()
    result.example_prompts, result.sample_steps = prompts["test"][:4], settings.sample_steps
    val_receiver = score(RECEIVER, encode(blind_pipe, prompts["val"]), "val")
    val_upper = score(UPPER, encode(seeing_pipe, prompts["val"]), "val")
    val = {}
    for alpha in settings.alphas:
        b = bundle("weighted", sharer, blind, seed, alpha=alpha) if alpha < 1 else bundle("identity", sharer, blind, seed)
        val[alpha] = score(WEIGHTED, bridged_encode(blind_pipe, sharer, tok, b, prompts["val"]), "val")
        result.alpha_gap[alpha] = (val_receiver - val[alpha]) / (val_receiver - val_upper)
    if val:
        alpha = min(val, key=val.get)
        result.chosen["weighted alpha"] = alpha
        b = bundle("weighted", sharer, blind, seed, alpha=alpha) if alpha < 1 else bundle("identity", sharer, blind, seed)
        score(WEIGHTED, bridged_encode(blind_pipe, sharer, tok, b, prompts["test"]))
    score(ORACLE, bridged_encode(blind_pipe, seeing, tok, bundle("identity", seeing, blind, seed), prompts["test"]))
    result.seconds["baselines"] = time.monotonic() - clock

    # 3. trained projectors (the blind receiver reads the sharer), and the shuffled-sharer control
    from c2c_core import save_bundle
    for kind in settings.kinds:
        clock = time.monotonic()
        fresh = bundle(kind, sharer, blind, seed, hidden_dim=settings.projector_hidden)
        losses = train_projector(blind_pipe, sharer, tok, fresh, data["train"], colours, settings, seed)
        result.losses[kind] = sum(losses[-50:]) / len(losses[-50:])
        save_bundle(out_dir / f"projector_{kind}.safetensors", fresh.bank, fresh.layer_map)
        name = f"{kind} projector (trained)"
        score(name, bridged_encode(blind_pipe, sharer, tok, fresh, prompts["test"]))
        if kind == "c2c":
            score(SHUFFLED, bridged_encode(blind_pipe, sharer, tok, fresh, prompts["test"], shuffled=True))
        result.seconds[f"train {kind}"] = time.monotonic() - clock
        log(f"  seed {seed}: {name} MSE {result.mse[name]:.4f} (receiver {result.mse[RECEIVER]:.4f}, "
            f"upper {result.mse[UPPER]:.4f})")
    (out_dir / "result.json").write_text(json.dumps({k: v for k, v in result.__dict__.items() if k != "examples"},
                                                    indent=1, default=str))
    return result


def colour_locality(seed: int = 0, settings: Settings = Settings()) -> dict:
    """Where the receiver keeps the colours, and what a K/V bridge can reach: per row of the conditioning
    encode_prompt hands the DiT, for a random receiver (the previous construction) and for the taught one, the
    distance between the seeing receiver's rows for two prompts that differ only in their colours, between the seeing
    and the blind receiver's rows, and between the seeing receiver's rows and the K/V oracle's (the blind receiver
    reading the seeing one's own K/V). Printed by ``run_qwen_miniature.py --diagnose``."""
    tok = tokenizer()
    prompts = ["a red square on a blue background", "a green square on a yellow background"]
    words = [tok.decode([i]) for i in tok(prompts[0], add_special_tokens=False)["input_ids"]]
    out = {"prompts": prompts, "tokens": words + ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]}
    for name, steps in (("random receiver", 0), ("taught receiver", settings.teach_steps)):
        seeing = qwen25(100 + seed, settings.embed_scale, settings.attn_gain, settings.unit_norms)
        pipe = pipeline(seeing, tok, dit(300 + seed))
        if steps:
            teach_receiver(pipe, splits(seed, settings)["train"], settings, seed, log=lambda m: None)
        blind = colour_blind(seeing, tok)
        blind_pipe = pipeline(blind, tok, pipe.transformer)
        e, b = encode(pipe, prompts), encode(blind_pipe, prompts)
        o = bridged_encode(blind_pipe, seeing, tok, bundle("identity", seeing, blind, seed), prompts)

        def rows(t):
            return [round(float(d), 3) for d in t.norm(dim=-1)]
        out[name] = {"norm": rows(e[0]), "colours change": rows(e[0] - e[1]), "seeing - blind": rows(e[0] - b[0]),
                     "seeing - K/V oracle": rows(e[0] - o[0])}
    return out
