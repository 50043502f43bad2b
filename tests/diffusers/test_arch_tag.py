"""The architecture tag (c2c_core.arch) is host-neutral: ComfyUI and diffusers tag one network alike.

A bundle trained in one host must be accepted in the other, and refused for another pair of the same
shapes in both; so the tag is read from configuration numbers that both hosts hold, checked here on the
same tiny weights loaded by the real ComfyUI and converted to diffusers.
"""
import importlib

import pytest
from safetensors.torch import load_file

import tiny
from c2c_diffusers import convert, models


@pytest.mark.usefixtures("comfy")
@pytest.mark.parametrize("name", ["tiny_wan_t2v_a", "tiny_wan_i2v", "tiny_wan22_ti2v"])
def test_comfyui_and_diffusers_tag_the_same_weights_alike(tiny_models, name):
    from bridge_helpers import load_model, pack_nodes
    pack_nodes()
    compat = importlib.import_module("dit_cache_bridge.c2c_comfy.compat")
    theirs = compat.wan_signature(load_model(tiny_models.path(name))).arch
    ours = models.signature(convert.from_comfy(load_file(tiny_models.path(name)))).arch
    assert ours.to_dict() == theirs.to_dict()       # two copies of c2c_core here: compare the file form
    assert (ours.family, ours.variant) == {"tiny_wan_t2v_a": ("wan2.1", "t2v"), "tiny_wan_i2v": ("wan2.1", "i2v"),
                                           "tiny_wan22_ti2v": ("wan2.2-ti2v", "t2v")}[name]


def test_chronoedit_is_tagged_as_the_wan_i2v_architecture_it_is():
    """ChronoEdit's temporal RoPE positions are a run-time matter (re-rotation), not part of the tag."""
    chrono, wan_i2v = models.arch_tag(tiny.chronoedit()), models.arch_tag(tiny.wan(**{**tiny.I2V}))
    assert chrono == wan_i2v and chrono.image_embedding and chrono.in_channels == 36
    assert models.arch_tag(tiny.wan()).differences(chrono) == ["variant t2v vs i2v", "in_channels 16 vs 36",
                                                               "image_embedding no vs yes"]
    no_clip = models.arch_tag(tiny.wan(in_channels=36))      # Wan2.2-I2V-A14B: image channels, no CLIP input
    assert no_clip.differences(chrono) == ["image_embedding no vs yes"]


def test_the_tag_read_from_a_diffusers_checkpoints_header_is_the_models(tmp_path):
    from safetensors.torch import save_file
    from c2c_core.arch import arch_from_weights
    from c2c_core.tensorfile import read_header
    for transformer in (tiny.wan(), tiny.chronoedit()):
        path = tmp_path / "t.safetensors"
        save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, path)
        shapes = {name: shape for name, (shape, _) in read_header(path)[1].items()}
        assert arch_from_weights(shapes, transformer.config.num_attention_heads) == models.arch_tag(transformer)


def tagged(bundle, sharer, receiver):
    """``bundle`` tagged as made for the two given transformers."""
    from c2c_core.bundle import tag_bank
    import dataclasses
    s, r = models.signature(sharer), models.signature(receiver)
    tag_bank(bundle.bank, s, r)
    return dataclasses.replace(bundle, sharer=bundle.bank.sharer, receiver=bundle.bank.receiver)


def test_the_diffusers_bridge_refuses_a_projector_for_another_pair_of_the_same_shapes():
    """A bundle made for a T2V receiver attached to an I2V one of the same shapes: refused, both sides."""
    from c2c_diffusers import Bridge, BridgeSetupError, LiveSharer, SharerInputs
    t2v, i2v = tiny.wan(1), tiny.wan(2, in_channels=36)
    bundle = tagged(tiny.bundle("weighted"), tiny.wan(3), t2v)
    sharer = LiveSharer(tiny.wan(3), SharerInputs(tiny.embeds(10), tiny.embeds(11)))
    with pytest.raises(BridgeSetupError, match=r"a projector made for a receiver .* but the receiver model is .*which "
                                               r"differs in variant t2v vs i2v, in_channels 16 vs 36\. Use the projector "
                                               r"trained for this pair"):
        Bridge(sharer, bundle).attach(i2v)
    wrong_sharer = LiveSharer(tiny.wan(4, ffn_dim=1024), SharerInputs(tiny.embeds(10), tiny.embeds(11)))
    with pytest.raises(BridgeSetupError, match=r"a projector made for a sharer .*differs in ffn_dim 512 vs 1024"):
        Bridge(wrong_sharer, bundle).attach(t2v)
    bridge = Bridge(sharer, bundle).attach(t2v)       # the pair it was made for
    bridge.detach()


def test_the_api_uses_a_two_bank_bundles_backward_bank():
    """BridgeConfig(direction='bidirectional') without backward_projector takes the bundle's own backward bank."""
    from c2c_core.bundle import with_backward
    from c2c_diffusers.api import BridgeConfig, WanChronoEditBridge
    wan_pipe, chrono_pipe = tiny.wan_pipe(tiny.wan(1)), tiny.chronoedit_pipe(tiny.chronoedit())
    forward = tiny.bundle("weighted")
    backward = tiny.bundle("gating")
    both = with_backward(forward, backward)
    bridge = WanChronoEditBridge(BridgeConfig(projector=both, direction="bidirectional"), wan_pipe, chrono_pipe)
    assert bridge.backward is both.backward
    explicit = WanChronoEditBridge(BridgeConfig(projector=both, direction="bidirectional", backward_projector=backward),
                                   wan_pipe, chrono_pipe)
    assert explicit.backward is backward
