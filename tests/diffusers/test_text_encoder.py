"""The text-encoder bridge for diffusers' Qwen-Image pipelines (c2c_diffusers/text_encoder.py).

Tiny random transformers Qwen2.5-VL (receiver) and Qwen3-VL (sharer) built here from configs (hidden 64,
2 layers, 4 query heads over 2 K/V heads of 16), with the Qwen tokenizer files ComfyUI ships; a tiny
Qwen-Image DiT and VAE complete the pipelines. Prompt embeddings are compared bit for bit where the
math promises it: strength 0 and an identity twin (the receiver's own copy as sharer) are the stock
encoder exactly, text-only, batched with padding and with an edit image.
"""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from c2c_core import (LayerMap, ModelSignature, ProjectorBank, TrainConfig, load_bundle, save_bundle, train_bank,
                      velocity_loss, wan_rope_axes)
from c2c_core.arch import ArchTag, TextEncoderArch
from c2c_core.bundle import ProjectorBundle
from c2c_diffusers import Bridge, BridgeSetupError, LiveSharer, SharerInputs, TextEncoderBridge, TextEncoderBridgeConfig
from c2c_diffusers import apply_text_encoder_bridge, remove_text_encoder_bridge
from c2c_diffusers.text_encoder import (PromptBatch, bridged_prompt_velocity, encoder_signature, open_prompt_set,
                                        prompt_batches, recover_images, save_prompt_sample, token_pieces)
from host import require_comfyui

transformers = pytest.importorskip("transformers")
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline,  # noqa: E402
                       QwenImageEditPlusPipeline, QwenImagePipeline, QwenImageTransformer2DModel)
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer,  # noqa: E402
                          Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor)

pytestmark = pytest.mark.slow

TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=151936)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
PROMPTS = ["a red cat on a blue chair", "the sign reads OPEN"]


def seeded(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))
    return model.eval()


def qwen25(seed=0):
    config = Qwen2_5_VLConfig(text_config=dict(TEXT, rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3],
                                                                           rope_theta=1e6)),
                              vision_config=dict(VISION, fullatt_block_indexes=[0]))
    return seeded(Qwen2_5_VLForConditionalGeneration(config), seed)


def qwen3(seed=1):
    config = Qwen3VLConfig(text_config=dict(TEXT, head_dim=16, rope_parameters=dict(
                               rope_type="default", mrope_section=[2, 3, 3], mrope_interleaved=True, rope_theta=5e6)),
                           vision_config=dict(VISION, deepstack_visual_indexes=[0], num_position_embeddings=64))
    return seeded(Qwen3VLForConditionalGeneration(config), seed)


@pytest.fixture(scope="module")
def tok():
    return Qwen2Tokenizer.from_pretrained(require_comfyui() / "comfy" / "text_encoders" / "qwen25_tokenizer")


@pytest.fixture(scope="module")
def receiver_processor(tok):
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor())


@pytest.fixture(scope="module")
def sharer_processor(tok):
    image = Qwen2VLImageProcessor(patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=Qwen3VLVideoProcessor())


@pytest.fixture(scope="module")
def dit_vae():
    torch.manual_seed(0)
    dit = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                      num_attention_heads=2, joint_attention_dim=64, guidance_embeds=False,
                                      axes_dims_rope=(8, 4, 4)).eval()
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    return dit, vae


@pytest.fixture(scope="module")
def receiver():
    return qwen25()


@pytest.fixture(scope="module")
def sharer():
    return qwen3()


@pytest.fixture(scope="module")
def pipe(receiver, tok, dit_vae):
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=dit_vae[1], text_encoder=receiver,
                             tokenizer=tok, transformer=dit_vae[0])


@pytest.fixture(scope="module")
def edit_pipe(receiver, tok, receiver_processor, dit_vae):
    return QwenImageEditPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=dit_vae[1], text_encoder=receiver,
                                 tokenizer=tok, processor=receiver_processor, transformer=dit_vae[0])


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.RandomState(0).rand(56, 84, 3) * 255).astype("uint8"))


def bundle_for(sharer_model, receiver_model, kind="identity", **hparams) -> ProjectorBundle:
    s, r = encoder_signature(sharer_model), encoder_signature(receiver_model)
    layer_map = LayerMap.build("terminal", s.num_layers, r.num_layers)
    torch.manual_seed(0)
    bank = ProjectorBank.build(kind, s, r, layer_map.layers, **hparams).eval()
    return ProjectorBundle(bank=bank, layer_map=layer_map, sharer=s, receiver=r)


def encode(pipe, prompt=PROMPTS[0], **kwargs):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device="cpu", **kwargs)[0]


def test_strength_zero_is_the_stock_encoder_bit_for_bit(pipe, edit_pipe, sharer, sharer_processor, image):
    stock, stock_batch = encode(pipe), encode(pipe, PROMPTS)
    stock_edit = encode(edit_pipe, image=image)
    bridge = TextEncoderBridge(sharer, sharer_processor, bundle_for(sharer, pipe.text_encoder, "c2c"), strength=0.0)
    with bridge.attach(pipe):
        assert torch.equal(encode(pipe), stock)
        assert torch.equal(encode(pipe, PROMPTS), stock_batch)
        assert bridge.last_report.sharer_forwards == 0
    with bridge.attach(edit_pipe):
        assert torch.equal(encode(edit_pipe, image=image), stock_edit)


def test_identity_twin_is_the_stock_encoder_bit_for_bit(pipe, edit_pipe, receiver_processor, image):
    """The receiver's own copy as sharer through an identity projector at strength 1: each fused layer's K/V are
    replaced by themselves (same text, same images, same positions), so the embeddings are the stock ones: one
    prompt, a padded batch, an edit image (Qwen-Image-Edit), two edit images (Qwen-Image-Edit-Plus)."""
    stock, stock_batch, stock_edit = encode(pipe), encode(pipe, PROMPTS), encode(edit_pipe, image=image)
    twin = copy.deepcopy(pipe.text_encoder)
    bridge = TextEncoderBridge(twin, receiver_processor, bundle_for(twin, pipe.text_encoder), strength=1.0)
    with bridge.attach(pipe):
        assert torch.equal(encode(pipe), stock)
        assert torch.equal(encode(pipe, PROMPTS), stock_batch)
        report = bridge.last_report
    assert report.sharer_forwards == 1 and report.layers == [0, 1]
    assert report.strength == {0: 1.0, 1: 1.0}
    with bridge.attach(edit_pipe):
        assert torch.equal(encode(edit_pipe, image=image), stock_edit)
    # Qwen-Image-Edit-Plus: two images ("Picture 1: …, Picture 2: …"), each recovered and aligned as its own block
    plus = QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                     processor=receiver_processor, transformer=None)
    wide = Image.fromarray((np.random.RandomState(1).rand(56, 140, 3) * 255).astype("uint8"))
    stock_plus = encode(plus, image=[image, wide])
    with bridge.attach(plus):
        assert torch.equal(encode(plus, image=[image, wide]), stock_plus)
    # not a test that cannot fail: a twin with other weights changes the embeddings
    other = qwen25(seed=5)
    with TextEncoderBridge(other, receiver_processor, bundle_for(other, pipe.text_encoder)).attach(pipe):
        assert not torch.allclose(encode(pipe), stock, atol=1e-3)
    assert torch.equal(encode(pipe), stock)


def test_qwen3vl_sharer_changes_the_embeddings_and_detach_restores(pipe, sharer, sharer_processor):
    stock = encode(pipe)
    bridge = TextEncoderBridge(sharer, sharer_processor, bundle_for(sharer, pipe.text_encoder, "c2c"), strength=1.0)
    with bridge.attach(pipe):
        fused = encode(pipe)
    assert fused.shape == stock.shape and torch.isfinite(fused).all()
    assert not torch.allclose(fused, stock, atol=1e-4)
    assert set(bridge.last_report.k_change) == {0, 1} and min(bridge.last_report.k_change.values()) > 0
    assert torch.equal(encode(pipe), stock)
    assert not pipe.text_encoder._forward_pre_hooks and not pipe.text_encoder._forward_hooks
    with TextEncoderBridge(sharer, sharer_processor, bundle_for(sharer, pipe.text_encoder, "c2c"),
                           layer_strengths={0: 0.0, 1: 0.0}).attach(pipe):
        assert torch.equal(encode(pipe), stock)
    # a window over the receiver's layers: layer 0 alone fuses, so its keys move and layer 1's stay
    window = TextEncoderBridge(sharer, sharer_processor, bundle_for(sharer, pipe.text_encoder, "c2c"), layers="first1")
    with window.attach(pipe):
        assert not torch.allclose(encode(pipe), stock, atol=1e-4)
    assert window.last_report.k_change[0] > 0 and window.last_report.k_change[1] == 0.0


def test_a_pipeline_call_runs_fused(pipe, sharer, sharer_processor):
    def run():
        return pipe(prompt=PROMPTS[1], height=32, width=32, num_inference_steps=2, true_cfg_scale=1.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images
    stock = run()
    apply_text_encoder_bridge(pipe, TextEncoderBridgeConfig(bundle_for(sharer, pipe.text_encoder, "c2c")), sharer,
                              sharer_processor)
    try:
        fused = run()
    finally:
        remove_text_encoder_bridge(pipe)
    assert not torch.allclose(fused, stock, atol=1e-5)
    assert torch.equal(run(), stock)


def test_bundle_file_round_trip(tmp_path, pipe, sharer, sharer_processor):
    made = bundle_for(sharer, pipe.text_encoder, "c2c")
    path = tmp_path / "qwen3vl_to_qwen25vl.safetensors"
    save_bundle(path, made.bank, made.layer_map)
    loaded = load_bundle(path)
    with TextEncoderBridge(sharer, sharer_processor, made).attach(pipe):
        in_memory = encode(pipe)
    apply_text_encoder_bridge(pipe, TextEncoderBridgeConfig(str(path)), sharer, sharer_processor)
    try:
        from_file = encode(pipe)
    finally:
        remove_text_encoder_bridge(pipe)
    assert loaded.sharer.same_shape(encoder_signature(sharer))
    assert torch.equal(from_file, in_memory)


def test_recovered_edit_image_is_the_one_the_receiver_read(receiver_processor, image):
    inputs = receiver_processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image], return_tensors="pt")
    (recovered,) = recover_images(inputs["pixel_values"], inputs["image_grid_thw"], receiver_processor.image_processor)
    assert recovered.size == image.size            # 56 x 84 is already on the 28-pixel grid
    assert np.array_equal(np.asarray(recovered), np.asarray(image))


def test_bad_input_is_refused(pipe, edit_pipe, sharer, sharer_processor, tok, image):
    import tiny
    wan_bundle = tiny.bundle()
    with pytest.raises(BridgeSetupError, match=r"sharer .* 2 layers × 2 K/V heads × 16; the projector bundle was made "
                                               r"for 2 × 2 × 128"):
        TextEncoderBridge(sharer, sharer_processor, wan_bundle)
    # same shapes, another kind of model: the architecture tags decide, both ways
    wan_tag = ArchTag.from_config(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_channels=16, out_channels=16,
                                  text_dim=64, image_embedding=False, patch_size=(1, 2, 2), rope_axes=wan_rope_axes(16))
    wan_side = ModelSignature(2, 2, 16, "wan", arch=wan_tag)
    wan_shaped = ProjectorBundle(ProjectorBank.build("identity", wan_side, wan_side, [0, 1]),
                                 LayerMap.build("terminal", 2, 2), wan_side, wan_side)
    with pytest.raises(BridgeSetupError, match="differs in kind: a Wan DiT vs a text encoder"):
        TextEncoderBridge(sharer, sharer_processor, wan_shaped)
    qwen_tag = TextEncoderArch.from_config("qwen2.5-vl", "custom", hidden_size=256, intermediate_size=512, num_layers=2,
                                           num_heads=2, num_kv_heads=2, head_dim=128, vocab_size=151936,
                                           rope_theta=1000000, vision_patch=14, mrope_sections=(16, 24, 24))
    qwen_side = ModelSignature(2, 2, 128, "qwen", arch=qwen_tag)
    qwen_shaped = ProjectorBundle(ProjectorBank.build("identity", qwen_side, qwen_side, [0, 1]),
                                  LayerMap.build("terminal", 2, 2), qwen_side, qwen_side)
    with pytest.raises(BridgeSetupError, match="differs in kind: a text encoder vs a Wan DiT"):
        Bridge(LiveSharer(tiny.wan(seed=2), SharerInputs(tiny.embeds(1))), qwen_shaped).attach(tiny.wan())
    with pytest.raises(BridgeSetupError, match="expected a transformers Qwen2.5-VL or Qwen3-VL model.*got WanTransformer3DModel"):
        TextEncoderBridge(tiny.wan(), sharer_processor, wan_bundle)
    bundle = bundle_for(sharer, pipe.text_encoder, "c2c")
    with pytest.raises(BridgeSetupError, match="expected a c2c_core.ProjectorBundle"):
        TextEncoderBridge(sharer, sharer_processor, "projector.safetensors")
    with pytest.raises(BridgeSetupError, match="strength=3.0; expected a number from 0 to 2.0"):
        TextEncoderBridge(sharer, sharer_processor, bundle, strength=3.0)
    with pytest.raises(BridgeSetupError, match="layers='5-6'.*goes past the last layer 1"):
        TextEncoderBridge(sharer, sharer_processor, bundle, layers="5-6")
    with pytest.raises(BridgeSetupError, match="WanPipeline has no text_encoder"):
        TextEncoderBridge(sharer, sharer_processor, bundle).attach(tiny.wan_pipe(transformer=tiny.wan()))
    with pytest.raises(BridgeSetupError, match="the receiver is a qwen3-vl model; expected Qwen-Image's text encoder"):
        TextEncoderBridge(sharer, sharer_processor, bundle_for(sharer, sharer, "c2c")).attach(qwen3(seed=4), tok)
    qwen2_lm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TEXT))
    with pytest.raises(BridgeSetupError, match=r"got Qwen2ForCausalLM \(model_type 'qwen2'\)"):
        TextEncoderBridge(sharer, sharer_processor, bundle).attach(qwen2_lm, tokenizer=tok)
    # an edit prompt whose sharer cannot read images, and a receiver call with image placeholders but no image
    with TextEncoderBridge(sharer, tok, bundle).attach(edit_pipe):
        with pytest.raises(BridgeSetupError, match="sharer_processor is a Qwen2Tokenizer without an image processor"):
            encode(edit_pipe, image=image)
    with TextEncoderBridge(sharer, sharer_processor, bundle).attach(edit_pipe) as bridge:
        ids = tok(["<|vision_start|><|image_pad|><|vision_end|>x"], return_tensors="pt")
        with pytest.raises(BridgeSetupError, match="no pixel_values; pass the edit image"):
            edit_pipe.text_encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        assert bridge.encoder is edit_pipe.text_encoder
    assert not edit_pipe.text_encoder._forward_pre_hooks


def test_qwen3vl_sharer_reads_the_edit_image_on_its_own_grid(edit_pipe, sharer, sharer_processor):
    """Qwen2.5-VL merges 28-pixel cells, Qwen3-VL 32-pixel ones: a 56 × 140 edit image is 2 × 5 receiver tokens and,
    resized by the sharer's processor to 64 × 128, 2 × 4 sharer tokens. Each receiver image token reads the sharer
    cell whose centre is nearest, each text token the same text token of the sharer (one tokenizer)."""
    wide = Image.fromarray((np.random.RandomState(1).rand(56, 140, 3) * 255).astype("uint8"))
    stock = encode(edit_pipe, image=wide)
    bridge = TextEncoderBridge(sharer, sharer_processor, bundle_for(sharer, edit_pipe.text_encoder, "c2c"))
    with bridge.attach(edit_pipe):
        fused = encode(edit_pipe, image=wide)
    assert torch.isfinite(fused).all() and not torch.allclose(fused, stock, atol=1e-4)
    (index,) = bridge.last_alignment.tolist()
    start = len(edit_pipe.tokenizer(edit_pipe.prompt_template_encode.split("<|image_pad|>")[0])["input_ids"])
    assert index[:start] == list(range(start))
    assert index[start:start + 10] == [start + row * 4 + col for row in (0, 1) for col in (0, 1, 2, 2, 3)]
    assert index[start + 10:] == list(range(start + 8, len(index) - 2))


def prompt_batch(seed, prompt=PROMPTS[1]):
    g = torch.Generator().manual_seed(seed)
    return PromptBatch(x0=torch.randn(1, 16, 16, generator=g), noise=torch.randn(1, 16, 16, generator=g),
                       sigma=0.3 + 0.4 * (seed % 2), img_shapes=[[(1, 4, 4)]], prompt=[prompt])


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


# -- ComfyUI and diffusers agree on the same tiny weights ---------------------------------------------------------

def comfy_encoder(tiny, spec, seed, path):
    """A tiny encoder built with ComfyUI's own classes (tools/make_tiny_qwen.py), saved in the layout the host loads
    (Qwen3-VL: transformers' keys), loaded back as CLIPLoader would; returns (clip, the saved state dict)."""
    import comfy.ops
    import comfy.sd
    from safetensors.torch import save_file
    options = tiny.clip_model_options(spec)
    clip_class = next(v for k, v in options.items() if k.endswith("_class"))
    model_options = {k: v for k, v in options.items() if k.endswith("_model_config")}
    model_options.update(model_name=tiny.QWEN25_NAME if spec["kind"] == "qwen25_vl" else tiny.QWEN3VL_NAME,
                         custom_operations=comfy.ops.disable_weight_init)
    model = clip_class(device="cpu", dtype=torch.float32, model_options=model_options).transformer
    tiny.initialise(model, seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if spec["kind"] == "qwen3_vl":
        state = {("model.language_model." + k[len("model."):]) if k.startswith("model.") else "model." + k: v
                 for k, v in state.items()}
    save_file(state, str(path))
    clip = comfy.sd.load_clip(ckpt_paths=[str(path)], embedding_directory=None,
                              clip_type=comfy.sd.CLIPType.QWEN_IMAGE, model_options=options)
    return clip, state


def test_comfyui_and_diffusers_agree_on_the_same_weights(comfyui_root, request, tmp_path, tok):
    """The same tiny Qwen2.5-VL receiver and Qwen3-VL sharer, built with ComfyUI's classes and loaded into
    transformers, and one bundle: ComfyUI's stock text encode equals diffusers' encode_prompt, and the Bridged Qwen
    Text Encode node's conditioning equals the TextEncoderBridge's, to float32 rounding (1e-4 on values of order 1: the hosts use different attention kernels). ComfyUI detects Qwen-Image's
    encoder by its 4 K/V heads × 128, so the receiver is 512 wide (head_dim 128 needs hidden = heads × 128 in
    transformers); the sharer is tools/make_tiny_qwen.py's."""
    if not (comfyui_root / "comfy" / "text_encoders" / "qwen3vl.py").is_file():
        pytest.skip("this ComfyUI has no Qwen3-VL text encoder (comfy/text_encoders/qwen3vl.py)")
    request.getfixturevalue("comfy")          # booted only on a host that has the classes
    import host
    tiny = host._load_tool("make_tiny_qwen")
    from comfy_extras.nodes_qwen import TextEncodeQwenImageEdit

    from bridge_helpers import pack_nodes
    pack_nodes()
    from dit_cache_bridge.nodes.text_encode import BridgedQwenTextEncode

    config = dict(vocab_size=152064, hidden_size=512, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
    receiver_clip, receiver_state = comfy_encoder(tiny, {"kind": "qwen25_vl", "vision": tiny.VISION, "config": config},
                                                  7, tmp_path / "receiver.safetensors")
    sharer_spec = tiny.SPECS[tiny.SHARER]
    sharer_clip, sharer_state = comfy_encoder(tiny, sharer_spec, 8, tmp_path / "sharer.safetensors")

    receiver = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(config, rope_parameters=dict(rope_type="default", mrope_section=[16, 24, 24], rope_theta=1e6)),
        vision_config=dict(VISION, out_hidden_size=512, fullatt_block_indexes=[0]), tie_word_embeddings=True)).eval()
    missing, unexpected = receiver.load_state_dict({"model.language_model." + k[len("model."):]: v
                                                     for k, v in receiver_state.items() if k.startswith("model.")},
                                                    strict=False)
    assert not unexpected and not [k for k in missing if ".visual." not in k and k != "lm_head.weight"]
    s = sharer_spec["config"]
    vision = sharer_spec["vision"]
    sharer_model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(
        text_config=dict(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                         num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
                         num_key_value_heads=s["num_key_value_heads"], head_dim=128, rope_parameters=dict(
                             rope_type="default", mrope_section=[24, 20, 20], mrope_interleaved=True, rope_theta=5e6)),
        vision_config=dict(depth=vision["depth"], hidden_size=vision["hidden_size"], num_heads=vision["num_heads"],
                           intermediate_size=vision["intermediate_size"], out_hidden_size=s["hidden_size"],
                           deepstack_visual_indexes=vision["deepstack"]))).eval()
    missing, unexpected = sharer_model.load_state_dict(sharer_state, strict=False)
    assert not unexpected and missing == ["lm_head.weight"]
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=receiver, tokenizer=tok, transformer=None)

    prompt = "a red cube with 'C2C' written on it"
    stock_comfy = TextEncodeQwenImageEdit.execute(clip=receiver_clip, prompt=prompt, image=None).args[0][0][0]
    stock = encode(pipe, prompt)
    assert (stock - stock_comfy).abs().max() < 1e-4, (stock - stock_comfy).abs().max()   # two attention kernels

    # one network, one tag: a bundle made in either host is accepted by the other
    from dit_cache_bridge.c2c_comfy import compat
    for clip, model in ((receiver_clip, receiver), (sharer_clip, sharer_model)):
        assert compat.qwen_encoder(clip).arch == encoder_signature(model).arch
    bundle = bundle_for(sharer_model, receiver, "c2c")
    fused_comfy = BridgedQwenTextEncode.execute(receiver_clip, sharer_clip, bundle, prompt, "text", 1.0, "all",
                                                "").args[0][0][0]
    with TextEncoderBridge(sharer_model, tok, bundle).attach(pipe):
        fused = encode(pipe, prompt)
    assert (fused_comfy - stock_comfy).abs().max() > 0.1, "the fusion moved the conditioning"
    assert (fused - fused_comfy).abs().max() < 1e-4, (fused - fused_comfy).abs().max()


def test_token_pieces_spell_the_text_in_bytes(tok):
    """Alignment spans are UTF-8 bytes (as in the ComfyUI host): a token split inside a character keeps its bytes."""
    text = "<|im_start|>user\nnaïve 東京 🐈 sign: 'OPEN'<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    assert b"".join(pieces) == text.encode("utf-8")
    assert any(len(p.decode("utf-8", errors="replace")) != len(p.decode("utf-8", errors="ignore")) for p in pieces), \
        "some token ends inside a character"


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


def test_bad_prompt_samples_are_refused(tmp_path):
    from c2c_core.samples import TrainingDataError
    from c2c_diffusers.training import save_training_sample
    with pytest.raises(BridgeSetupError, match=r"x0 has shape \(1, 4, 8, 8\); expected one image latent"):
        save_prompt_sample(tmp_path, torch.zeros(1, 4, 8, 8), "a cat")
    with pytest.raises(BridgeSetupError, match="needs both the image and its image_latents"):
        save_prompt_sample(tmp_path, torch.zeros(1, 4, 1, 8, 8), "a cat", image=np.zeros((8, 8, 3), np.uint8))
    bad = tmp_path / "nonfinite"
    save_prompt_sample(bad, torch.full((1, 4, 1, 8, 8), float("nan")), "a cat")
    with pytest.raises(TrainingDataError, match=r"index 0 \(sample_00001.safetensors\).*NaN or Inf.*Fix: delete"):
        open_prompt_set(bad)
    wan = tmp_path / "wan"        # the Wan pair's samples are not a text-encoder pair's
    save_training_sample(wan, torch.zeros(1, 16, 2, 4, 4), torch.zeros(1, 8, 64), SharerInputs(torch.zeros(1, 8, 64)))
    with pytest.raises(TrainingDataError, match=r"sample_00001.safetensors was written by the diffusers host; this is "
                                                r"the diffusers-qwen-image host.*save_prompt_sample"):
        open_prompt_set(wan)
