"""The design document's Python API (/work/shared/SEED.md, issue 20) runs as written, with tiny pipelines:
``from wan_chronoedit import WanChronoEditBridge, WanChronoEditConfig`` over the same implementation as
BridgeConfig; from_pretrained over save_pretrained folders; save/load/train of the projectors; every bad
input a clear error before any sampling."""
import math

import pytest
import torch

import tiny
from c2c_diffusers import BridgeConfig, BridgeSetupError, SharerInputs
from c2c_diffusers.api import WanChronoEditBridge as ApiBridge

STEPS = 3


@pytest.fixture(scope="module")
def models():
    return tiny.wan_pipe(tiny.wan(1)), tiny.chronoedit_pipe(tiny.chronoedit(3))


def design_example(fusion_direction, target_model, wan_model, chronoedit_model, num_inference_steps=50):
    """The document's example, its `...` filled with tiny tensors (and ChronoEdit's input image)."""
    from wan_chronoedit import WanChronoEditBridge, WanChronoEditConfig

    # 1. Create configuration
    config = WanChronoEditConfig(
        projector_type="gating",  # Learned gating
        fusion_direction=fusion_direction,  # Combine both models
    )

    # 3. Create bridge
    bridge = WanChronoEditBridge(
        config=config,
        wan_model=wan_model,
        chronoedit_model=chronoedit_model,
    )

    # 4. Generate with fused caches
    output = bridge.generate_with_fusion(
        wan_inputs={"video_latents": tiny.latent(0), "text_embeddings": tiny.embeds(10)},
        chronoedit_inputs={"video_latents": tiny.latent(0), "text_embeddings": tiny.embeds(12), "image": tiny.image()},
        target_model=target_model,
        num_inference_steps=num_inference_steps,
    )
    return bridge, output


@pytest.mark.parametrize("fusion_direction,target_model", [("chrono_to_wan", "wan"), ("wan_to_chrono", "chronoedit"),
                                                           ("bidirectional", "wan"), ("bidirectional", "chronoedit")])
def test_the_design_example_runs_verbatim(models, fusion_direction, target_model):
    wan, chrono = models
    bridge, output = design_example(fusion_direction, target_model, wan, chrono)
    frames = output.frames
    assert frames.shape == (1, tiny.FRAMES, tiny.HEIGHT, tiny.WIDTH, 3) and frames.dtype.kind == "f"
    assert (frames == frames).all(), "a decoded video without NaN"
    report = bridge.last_report
    assert (report.model_calls, report.sharer_forwards) == (50, 50), "no guidance without negative embeddings"
    assert bridge.receiver is (wan if target_model == "wan" else chrono)
    assert (bridge.last_backward_report is not None) == (fusion_direction == "bidirectional")


@pytest.mark.parametrize("fusion_direction,target_model,into", [("chrono_to_wan", "chronoedit", "wan"),
                                                                ("wan_to_chrono", "wan", "chronoedit")])
def test_a_target_the_direction_does_not_fuse_into_is_refused(models, fusion_direction, target_model, into):
    wan, chrono = models
    message = (f"target_model='{target_model}', but the config fuses one way into '{into}' (fusion_direction="
               f"'{fusion_direction}', BridgeConfig target='{into}'); pass target_model='{into}', or a config that "
               f"fuses into '{target_model}' or both ways (fusion_direction='bidirectional').")
    with pytest.raises(BridgeSetupError, match=f"^{_re(message)}$"):
        design_example(fusion_direction, target_model, wan, chrono)


def _re(text):
    import re
    return re.escape(text)


def test_the_design_spelling_is_the_bridge_config_it_runs(models):
    """One code path: WanChronoEditConfig runs as its bridge_config(), bit for bit the BridgeConfig spelling."""
    from wan_chronoedit import WanChronoEditBridge, WanChronoEditConfig
    wan, chrono = models
    design = WanChronoEditConfig(projector_type="gating", projector_hidden_dim=16, fusion_alpha=0.7,
                                 layer_mapping_strategy="identity", end=0.5)
    assert design.bridge_config() == BridgeConfig(projector_kind="gating", projector_hparams={"hidden_dim": 16},
                                                  strength=0.7, mapping="identity", end=0.5)
    assert WanChronoEditBridge is ApiBridge

    def run(config, seed_bank):
        bridge = WanChronoEditBridge(config=config, wan_model=wan, chronoedit_model=chrono)
        torch.manual_seed(seed_bank)
        with torch.no_grad():
            for p in bridge.bundle.bank.parameters():
                p.copy_(torch.randn_like(p) * 0.1)
        inputs = dict(wan_inputs={"video_latents": tiny.latent(0), "text_embeddings": tiny.embeds(10),
                                  "negative_text_embeddings": tiny.embeds(11)},
                      chronoedit_inputs={"image": tiny.image()}, num_inference_steps=STEPS, output_type="latent")
        return bridge.generate_with_fusion(**inputs).frames, bridge
    a, bridge = run(design, 0)
    b, _ = run(design.bridge_config(), 0)
    assert torch.equal(a, b)
    assert bridge.bundle.bank.kind == "gating" and bridge.bundle.layer_map.layers == [0, 1]
    assert bridge.last_report.model_calls == 2 * STEPS, "negative embeddings turn guidance on"


def test_design_inputs_are_the_pipeline_keywords(models):
    """video_latents are the starting latents; the pipeline spelling with the same tensors gives the same video."""
    from wan_chronoedit import WanChronoEditBridge, WanChronoEditConfig
    wan, chrono = models
    bridge = WanChronoEditBridge(config=WanChronoEditConfig(projector_type="weighted"), wan_model=wan,
                                 chronoedit_model=chrono)
    design = bridge.generate_with_fusion(wan_inputs={"video_latents": tiny.latent(5), "text_embeddings": tiny.embeds(10)},
                                         chronoedit_inputs={"text_embeddings": tiny.embeds(12), "image": tiny.image()},
                                         num_inference_steps=STEPS, output_type="latent").frames
    keywords = bridge.generate_with_fusion(tiny.image(), prompt_embeds=tiny.embeds(10), latents=tiny.latent(5),
                                           sharer_prompt_embeds=tiny.embeds(12), height=tiny.HEIGHT, width=tiny.WIDTH,
                                           num_frames=tiny.FRAMES, guidance_scale=1.0, num_inference_steps=STEPS,
                                           output_type="latent").frames
    assert torch.equal(design, keywords)
    with pytest.raises(BridgeSetupError, match=r"^wan_inputs has the key\(s\) \['prompt'\]; expected keys from "
                                               r"\('video_latents', 'text_embeddings', 'negative_text_embeddings', "
                                               r"'image', 'image_embeds', 'condition_latents'\)\.$"):
        bridge.generate_with_fusion(wan_inputs={"prompt": "a cat"})
    with pytest.raises(BridgeSetupError, match=r"^height=48 but video_latents \(1, 16, 2, 4, 4\) make 32; leave "
                                               r"height out or pass latents of that size\.$"):
        bridge.generate_with_fusion(wan_inputs={"video_latents": tiny.latent(0)}, height=48)


def test_from_pretrained_reads_save_pretrained_folders(models, tmp_path):
    from wan_chronoedit import WanChronoEditBridge, WanChronoEditConfig
    wan, chrono = models
    wan.save_pretrained(tmp_path / "wan")
    chrono.save_pretrained(tmp_path / "chronoedit")
    loaded = WanChronoEditBridge.from_pretrained(WanChronoEditConfig(projector_type="weighted"), tmp_path / "wan",
                                                 tmp_path / "chronoedit", tokenizer=None, text_encoder=None)
    assert type(loaded.wan).__name__ == "WanPipeline" and type(loaded.chronoedit).__name__ == "ChronoEditPipeline"
    ours = WanChronoEditBridge(config=WanChronoEditConfig(projector_type="weighted"), wan_model=wan,
                               chronoedit_model=chrono)
    run = dict(wan_inputs={"video_latents": tiny.latent(0), "text_embeddings": tiny.embeds(10)},
               chronoedit_inputs={"image": tiny.image()}, num_inference_steps=2, output_type="latent")
    torch.testing.assert_close(loaded.generate_with_fusion(**run).frames, ours.generate_with_fusion(**run).frames,
                               rtol=1e-5, atol=1e-5)      # a save/load round trip of every component


def test_save_load_and_train_projectors(models, tmp_path):
    from c2c_diffusers.training import save_training_sample
    from wan_chronoedit import WanChronoEditBridge, WanChronoEditConfig
    wan, chrono = models
    bridge = WanChronoEditBridge(config=WanChronoEditConfig(projector_type="gating", projector_hidden_dim=16),
                                 wan_model=wan, chronoedit_model=chrono)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        sharer = SharerInputs(tiny.embeds(50 + i), image_embeds=torch.randn(1, 5, 1280, generator=g),
                              condition=torch.randn(1, 20, 2, 4, 4, generator=g))
        save_training_sample(tmp_path / "data", tiny.latent(30 + i), tiny.embeds(40 + i), sharer)
    before = {k: v.clone() for k, v in bridge.bundle.bank.state_dict().items()}
    result = bridge.train_projector(tmp_path / "data", steps=3, lr=1e-2)
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert any(not torch.equal(before[k], v) for k, v in bridge.bundle.bank.state_dict().items()), "the bank learned"
    assert all(p.grad is None for t in (wan.transformer, chrono.transformer) for p in t.parameters()), "models frozen"
    bridge.save_projectors(tmp_path / "p.safetensors")
    other = WanChronoEditBridge(config=WanChronoEditConfig(projector_type="gating", projector_hidden_dim=16),
                                wan_model=wan, chronoedit_model=chrono)
    other.load_projectors(tmp_path / "p.safetensors")
    trained = bridge.bundle.bank.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in other.bundle.bank.state_dict().items())


def test_bidirectional_projectors_save_as_one_file(models, tmp_path):
    from wan_chronoedit import WanChronoEditBridge, WanChronoEditConfig
    wan, chrono = models
    bridge = WanChronoEditBridge(config=WanChronoEditConfig(projector_type="weighted", fusion_direction="bidirectional"),
                                 wan_model=wan, chronoedit_model=chrono)
    bridge.save_projectors(tmp_path / "both.safetensors")
    other = WanChronoEditBridge(config=WanChronoEditConfig(fusion_direction="bidirectional"), wan_model=wan,
                                chronoedit_model=chrono)
    other.load_projectors(tmp_path / "both.safetensors")
    assert other.bundle.bank.kind == "weighted" and other.backward.bank.kind == "weighted"


# --- bad input: each a clear error naming the argument and the fix, before any sampling --------------

def test_swapped_pipelines_are_refused_by_architecture(models):
    from wan_chronoedit import WanChronoEditBridge, WanChronoEditConfig
    wan, chrono = models
    with pytest.raises(BridgeSetupError, match=r"^wan_model is a ChronoEditPipeline \(ChronoEditTransformer3DModel\) "
                                               r"and chronoedit_model a WanPipeline: the pipelines are swapped\. Pass "
                                               r"wan_model=<the Wan pipeline>, chronoedit_model=<the ChronoEdit "
                                               r"pipeline>\.$"):
        WanChronoEditBridge(config=WanChronoEditConfig(), wan_model=chrono, chronoedit_model=wan)


@pytest.mark.parametrize("value", [-0.1, 2.5, float("nan"), "0.5", True])
def test_strength_outside_its_range_is_refused_at_config(value):
    from wan_chronoedit import WanChronoEditConfig
    tail = ("; expected a number from 0 to 2.0 (0 leaves the receiver as it is, 1 takes the projected K/V; as the "
            "ComfyUI node). Pass a value in that range.")
    with pytest.raises(BridgeSetupError, match=f"^{_re(f'BridgeConfig.strength={value!r}' + tail)}$"):
        BridgeConfig(strength=value)
    with pytest.raises(BridgeSetupError, match=f"^{_re(f'BridgeConfig.backward_strength={value!r}' + tail)}$"):
        BridgeConfig(backward_strength=value)
    with pytest.raises(BridgeSetupError, match=f"^{_re(f'WanChronoEditConfig.fusion_alpha={value!r}' + tail)}$"):
        WanChronoEditConfig(fusion_alpha=value)


def test_design_config_fields_are_checked_under_their_own_names():
    from wan_chronoedit import WanChronoEditConfig
    with pytest.raises(BridgeSetupError, match=r"^WanChronoEditConfig\.fusion_direction='both'; expected one of "
                                               r"\('chrono_to_wan', 'wan_to_chrono', 'bidirectional'\)\.$"):
        WanChronoEditConfig(fusion_direction="both")
    with pytest.raises(BridgeSetupError, match=r"^WanChronoEditConfig\.projector_hidden_dim=16 with projector_type="
                                               r"'identity', which has no hidden layer; expected one of \('gating', "
                                               r"'full', 'c2c'\) or projector_hidden_dim=None\.$"):
        WanChronoEditConfig(projector_hidden_dim=16)
    with pytest.raises(BridgeSetupError, match=r"^WanChronoEditConfig\.direction='bidirectional' with mode='recorded'"):
        WanChronoEditConfig(fusion_direction="bidirectional", mode="recorded")


def test_nan_weights_in_an_in_memory_bundle_are_refused(models):
    wan, chrono = models
    bundle = tiny.bundle("gating", hidden_dim=8)
    name, weight = list(bundle.bank.state_dict().items())[2]
    weight[0, 0] = float("nan")
    with pytest.raises(BridgeSetupError, match=f"^{_re(f'BridgeConfig.projector: the projector weight {name!r} holds NaN or Inf; expected finite weights. Retrain it, or load a good bundle file.')}$"):
        ApiBridge(BridgeConfig(projector=bundle), wan, chrono)


def test_non_finite_fused_kv_raise_as_in_comfyui(models):
    """A sharer with NaN K makes NaN fused K/V: an error after the run, as ComfyUI raises, not only a note."""
    from c2c_core import health
    wan, chrono = models
    bridge = ApiBridge(BridgeConfig(projector_kind="weighted"), wan, chrono)
    block = chrono.transformer.blocks[0].attn1.to_k
    saved = block.weight.detach().clone()
    with torch.no_grad():
        block.weight.fill_(float("nan"))
    try:
        with pytest.raises(BridgeSetupError) as err:
            bridge.generate_with_fusion(tiny.image(), prompt_embeds=tiny.embeds(10), negative_prompt_embeds=tiny.embeds(11),
                                        height=tiny.HEIGHT, width=tiny.WIDTH, num_frames=tiny.FRAMES,
                                        num_inference_steps=2, output_type="latent")
    finally:
        with torch.no_grad():
            block.weight.copy_(saved)
    layers = bridge.last_report.nonfinite_layers
    assert layers and str(err.value) == (f"{health.nonfinite_hint(layers)} (Bridge strength=1.0; bridge.last_report "
                                         f"has the details).")


@pytest.mark.parametrize("side", ["height", "width"])
def test_a_size_not_divisible_by_16_is_refused_before_sampling(models, side):
    wan, chrono = models
    bridge = ApiBridge(BridgeConfig(), wan, chrono)
    size = {**dict(height=tiny.HEIGHT, width=tiny.WIDTH), side: 40}
    with pytest.raises(BridgeSetupError, match=f"^{side}=40 is not divisible by 16 \\(VAE factor 8 × patch 2\\); "
                                               f"pass {side}=32 or 48\\.$"):
        bridge.generate_with_fusion(tiny.image(), prompt_embeds=tiny.embeds(10), num_frames=tiny.FRAMES,
                                    guidance_scale=1.0, **size)
    assert bridge.last_report is None, "nothing sampled"


@pytest.mark.parametrize("name", ["prompt_embeds", "negative_prompt_embeds", "sharer_prompt_embeds"])
def test_prompt_embeddings_of_the_wrong_width_are_refused_before_sampling(models, name):
    wan, chrono = models
    bridge = ApiBridge(BridgeConfig(), wan, chrono)
    given = dict(prompt_embeds=tiny.embeds(10), negative_prompt_embeds=tiny.embeds(11))
    given[name] = tiny.embeds(12, dim=768)
    with pytest.raises(BridgeSetupError, match=f"^{name} has shape \\(1, 8, 768\\); expected batch × tokens × 4096 "
                                               f"\\(the umT5 text encoder's width that \\w+ reads\\)\\. Pass the text "
                                               f"encoder's last hidden states, or prompt= with the pipeline's encoder\\.$"):
        bridge.generate_with_fusion(tiny.image(), height=tiny.HEIGHT, width=tiny.WIDTH, num_frames=tiny.FRAMES,
                                    **given)
    assert bridge.last_report is None, "nothing sampled"



def test_an_image_to_video_sharer_without_image_features_is_refused():
    """ComfyUI would run it with its image cross-attention reading the text; diffusers cannot match that: refused."""
    from c2c_diffusers import LiveSharer
    inputs = SharerInputs(tiny.embeds(20), condition=torch.zeros(1, 20, 2, 4, 4))
    with pytest.raises(BridgeSetupError, match=r"^sharer ChronoEditTransformer3DModel has a CLIP image projection "
                                               r"\(image_dim 1280\) and SharerInputs\.image_embeds is None; pass the "
                                               r"image encoder's features \(pipe\.encode_image\(image\), or "
                                               r"WanChronoEditBridge, which encodes the image itself\)\.$"):
        LiveSharer(tiny.chronoedit(3), inputs)


def test_bare_transformers_with_a_scheduler(models):
    """Bare transformers run in a VAE-less WanPipeline: latents in, latents out; the image-to-video one shares
    from its image_embeds and condition_latents, exactly as a LiveSharer given them."""
    from c2c_diffusers import Bridge, LiveSharer
    from wan_chronoedit import WanChronoEditBridge, WanChronoEditConfig
    wan, chrono = models
    g = torch.Generator().manual_seed(0)
    image_embeds, condition = torch.randn(1, 5, 1280, generator=g), torch.randn(1, 20, 2, 4, 4, generator=g)
    bridge = WanChronoEditBridge(config=WanChronoEditConfig(projector_type="weighted"), wan_model=wan.transformer,
                                 chronoedit_model=chrono.transformer, scheduler=wan.scheduler)
    run = dict(wan_inputs={"video_latents": tiny.latent(0), "text_embeddings": tiny.embeds(10)},
               chronoedit_inputs={"text_embeddings": tiny.embeds(12), "image_embeds": image_embeds,
                                  "condition_latents": condition},
               num_inference_steps=STEPS, output_type="latent")
    fused = bridge.generate_with_fusion(**run).frames
    assert bridge.last_report.sharer_forwards == STEPS
    by_hand = Bridge(LiveSharer(chrono.transformer, SharerInputs(tiny.embeds(12), image_embeds=image_embeds,
                                                                 condition=condition)),
                     bridge.bundle).attach(wan)
    try:
        expected = wan(prompt_embeds=tiny.embeds(10), latents=tiny.latent(0), height=tiny.HEIGHT, width=tiny.WIDTH,
                       num_frames=tiny.FRAMES, guidance_scale=1.0, num_inference_steps=STEPS,
                       output_type="latent").frames
    finally:
        by_hand.detach()
    assert torch.equal(fused, expected)
    with pytest.raises(BridgeSetupError, match=r"^output_type='np' with a bare transformer \(no VAE to decode\); "
                                               r"pass output_type='latent' or the pipeline\.$"):
        bridge.generate_with_fusion(**{**run, "output_type": "np"})
    both = WanChronoEditBridge(config=WanChronoEditConfig(fusion_direction="wan_to_chrono"), wan_model=wan.transformer,
                               chronoedit_model=chrono.transformer, scheduler=wan.scheduler)
    with pytest.raises(BridgeSetupError, match=r"^target_model='chronoedit' is a bare image-to-video "
                                               r"ChronoEditTransformer3DModel: it can share but not generate \(its "
                                               r"pipeline's VAE encodes the image\)\. Pass its pipeline to generate "
                                               r"with it\.$"):
        both.generate_with_fusion(**run)


def test_a_bare_transformer_without_a_scheduler_is_refused(models):
    wan, chrono = models
    with pytest.raises(BridgeSetupError, match=r"^wan_model is a bare WanTransformer3DModel; pass scheduler= \(e\.g\. "
                                               r"the FlowMatchEulerDiscreteScheduler of its pipeline\) or the pipeline "
                                               r"itself\.$"):
        ApiBridge(BridgeConfig(), wan.transformer, chrono)
    with pytest.raises(BridgeSetupError, match=r"^chronoedit_model is a str; expected a diffusers Wan or ChronoEdit "
                                               r"pipeline"):
        ApiBridge(BridgeConfig(), wan, "nvidia/ChronoEdit-14B-Diffusers")
