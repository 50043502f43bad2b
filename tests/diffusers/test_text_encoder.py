"""The text-encoder bridge for diffusers' Qwen-Image pipelines (c2c_diffusers/text_encoder.py).

Tiny random transformers Qwen2.5-VL (receiver) and Qwen3-VL (sharer) built from configs (tiny_qwen.py: hidden 64,
2 layers, 4 query heads over 2 K/V heads of 16), with the Qwen tokenizer files ComfyUI ships; a tiny
Qwen-Image DiT and VAE complete the pipelines. Prompt embeddings are compared bit for bit where the
math promises it: strength 0 and an identity twin (the receiver's own copy as sharer) are the stock
encoder exactly, text-only, batched with padding and with an edit image.
"""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from c2c_core import LayerMap, ModelSignature, ProjectorBank, load_bundle, save_bundle, wan_rope_axes
from c2c_core.arch import ArchTag, TextEncoderArch
from c2c_core.bundle import ProjectorBundle
from c2c_diffusers import Bridge, BridgeSetupError, LiveSharer, SharerInputs, TextEncoderBridge, TextEncoderBridgeConfig
from c2c_diffusers import apply_text_encoder_bridge, remove_text_encoder_bridge
from c2c_diffusers.text_encoder import encoder_signature, recover_images, token_pieces

transformers = pytest.importorskip("transformers")
from diffusers import (FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline,  # noqa: E402
                       QwenImagePipeline)
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,  # noqa: E402
                          Qwen3VLForConditionalGeneration)
import tiny_qwen  # noqa: E402
from tiny_qwen import PROMPTS, TEXT, VISION, bundle_for, encode, qwen3, qwen25  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tok():
    return tiny_qwen.tokenizer()


@pytest.fixture(scope="module")
def receiver_processor(tok):
    return tiny_qwen.receiver_processor(tok)


@pytest.fixture(scope="module")
def sharer_processor(tok):
    return tiny_qwen.sharer_processor(tok)


@pytest.fixture(scope="module")
def dit_vae():
    return tiny_qwen.dit(), tiny_qwen.vae()


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


# -- ComfyUI and diffusers agree on the same tiny weights ---------------------------------------------------------

@pytest.fixture(scope="module")
def crosscheck(comfyui_root, request, tmp_path_factory, tok):
    """The same tiny Qwen2.5-VL receiver and Qwen3-VL sharer, built with ComfyUI's classes and loaded into
    transformers: (receiver CLIP, sharer CLIP, receiver model, sharer model, a QwenImagePipeline on the receiver).
    ComfyUI detects Qwen-Image's encoder by its 4 K/V heads × 128, so the receiver is 512 wide (head_dim 128 needs
    hidden = heads × 128 in transformers); the sharer is tools/make_tiny_qwen.py's."""
    if not (comfyui_root / "comfy" / "text_encoders" / "qwen3vl.py").is_file():
        pytest.skip("this ComfyUI has no Qwen3-VL text encoder (comfy/text_encoders/qwen3vl.py)")
    request.getfixturevalue("comfy")          # booted only on a host that has the classes
    import host
    from bridge_helpers import comfy_qwen_encoder
    tiny = host._load_tool("make_tiny_qwen")
    tmp_path = tmp_path_factory.mktemp("crosscheck")

    config = dict(vocab_size=152064, hidden_size=512, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4)
    receiver_spec = {"kind": "qwen25_vl", "vision": tiny.VISION, "config": config}
    receiver_clip, receiver_state = comfy_qwen_encoder(tiny, receiver_spec, 7, tmp_path / "receiver.safetensors")
    sharer_spec = tiny.SPECS[tiny.SHARER]
    sharer_clip, sharer_state = comfy_qwen_encoder(tiny, sharer_spec, 8, tmp_path / "sharer.safetensors")

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
    return receiver_clip, sharer_clip, receiver, sharer_model, pipe


CROSSCHECK_PROMPT = "a red cube with 'C2C' written on it"


def comfy_encodes(receiver_clip, sharer_clip, bundle, prompt=CROSSCHECK_PROMPT):
    """(ComfyUI's stock text encode, the Bridged Qwen Text Encode node's with ``bundle``), first conditioning tensor."""
    from comfy_extras.nodes_qwen import TextEncodeQwenImageEdit

    from bridge_helpers import pack_nodes
    pack_nodes()
    from dit_cache_bridge.nodes.text_encode import BridgedQwenTextEncode
    stock = TextEncodeQwenImageEdit.execute(clip=receiver_clip, prompt=prompt, image=None).args[0][0][0]
    fused = BridgedQwenTextEncode.execute(receiver_clip, sharer_clip, bundle, prompt, "text", 1.0, "all",
                                          "").args[0][0][0]
    return stock, fused


def test_comfyui_and_diffusers_agree_on_the_same_weights(crosscheck, tok):
    """One bundle on the crosscheck's weights: ComfyUI's stock text encode equals diffusers' encode_prompt, and the
    Bridged Qwen Text Encode node's conditioning equals the TextEncoderBridge's, to float32 rounding (1e-4 on values
    of order 1: the hosts use different attention kernels)."""
    receiver_clip, sharer_clip, receiver, sharer_model, pipe = crosscheck
    bundle = bundle_for(sharer_model, receiver, "c2c")
    stock_comfy, fused_comfy = comfy_encodes(receiver_clip, sharer_clip, bundle)
    stock = encode(pipe, CROSSCHECK_PROMPT)
    assert (stock - stock_comfy).abs().max() < 1e-4, (stock - stock_comfy).abs().max()   # two attention kernels

    # one network, one tag: a bundle made in either host is accepted by the other
    from dit_cache_bridge.c2c_comfy import compat
    for clip, model in ((receiver_clip, receiver), (sharer_clip, sharer_model)):
        assert compat.qwen_encoder(clip).arch == encoder_signature(model).arch
    with TextEncoderBridge(sharer_model, tok, bundle).attach(pipe):
        fused = encode(pipe, CROSSCHECK_PROMPT)
    assert (fused_comfy - stock_comfy).abs().max() > 0.1, "the fusion moved the conditioning"
    assert (fused - fused_comfy).abs().max() < 1e-4, (fused - fused_comfy).abs().max()


def test_a_projector_trained_in_python_fuses_the_same_numbers_in_comfyui(crosscheck, tok):
    """A few training steps in Python (c2c_diffusers.text_training through c2c_core.train.run_training, on a tiny
    Qwen-Image DiT reading the crosscheck receiver's 512-wide embeddings), the bundle saved to models/c2c_projectors
    and loaded by Load C2C Projector: Bridged Qwen Text Encode fuses what the TextEncoderBridge fuses with that
    file, within the crosscheck's tolerance, and the trained fusion is neither the stock encoding nor the
    untrained projector's. (Trained in ComfyUI, loaded in Python: tests/training/test_text_training.py.)"""
    import folder_paths

    from bridge_helpers import pack_nodes
    from c2c_core import TrainConfig, velocity_loss
    from c2c_core.train import run_training
    from c2c_diffusers.text_training import bridged_prompt_velocity
    receiver_clip, sharer_clip, receiver, sharer_model, pipe = crosscheck
    for model in (receiver, sharer_model):
        model.requires_grad_(False)
    trainer = QwenImagePipeline(scheduler=None, vae=None, text_encoder=receiver, tokenizer=tok,
                                transformer=tiny_qwen.dit(text_width=512).requires_grad_(False))
    bundle = bundle_for(sharer_model, receiver, "c2c")
    initial = {k: v.clone() for k, v in bundle.bank.state_dict().items()}
    with TextEncoderBridge(sharer_model, tok, bundle).attach(trainer) as bridge:
        untrained = encode(trainer, CROSSCHECK_PROMPT)
        run_training(bundle.bank, bundle.layer_map, lambda step: tiny_qwen.prompt_batch(step, CROSSCHECK_PROMPT),
                     velocity_loss(bridged_prompt_velocity(bridge, trainer)), TrainConfig(steps=3, lr=1e-2))
    assert any(not torch.equal(initial[k], v) for k, v in bundle.bank.state_dict().items()), "the bank trained"
    nodes = pack_nodes()
    folder = Path(folder_paths.get_folder_paths("c2c_projectors")[0])
    folder.mkdir(parents=True, exist_ok=True)
    save_bundle(folder / "trained_in_python_qwen.safetensors", bundle.bank, bundle.layer_map)
    loaded = nodes.LoadC2CProjector.execute("trained_in_python_qwen.safetensors").args[0]
    stock_comfy, fused_comfy = comfy_encodes(receiver_clip, sharer_clip, loaded)
    with TextEncoderBridge(sharer_model, tok, load_bundle(folder / "trained_in_python_qwen.safetensors")).attach(pipe):
        fused = encode(pipe, CROSSCHECK_PROMPT)
    assert (fused - fused_comfy).abs().max() < 1e-4, (fused - fused_comfy).abs().max()
    assert (fused_comfy - stock_comfy).abs().max() > 0.1, "the trained fusion moved the conditioning"
    assert (fused - untrained).abs().max() > 1e-3, "the trained projector fuses other numbers than its initialisation"


def test_token_pieces_spell_the_text_in_bytes(tok):
    """Alignment spans are UTF-8 bytes (as in the ComfyUI host): a token split inside a character keeps its bytes."""
    text = "<|im_start|>user\nnaïve 東京 🐈 sign: 'OPEN'<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    assert b"".join(pieces) == text.encode("utf-8")
    assert any(len(p.decode("utf-8", errors="replace")) != len(p.decode("utf-8", errors="ignore")) for p in pieces), \
        "some token ends inside a character"
