"""GGUF models through the bridge, loaded by city96/ComfyUI-GGUF's own Unet Loader (GGUF) on the real host.

Users run Wan as community GGUF conversions; ComfyUI-GGUF loads them as a GGUFModelPatcher whose Linear weights
stay quantized (GGMLTensor) and are dequantized on the fly in every forward. tools/install_host.py installs the
pinned ComfyUI-GGUF into the test hosts and tools/make_tiny_gguf.py writes Q8_0, Q4_0 and F16 copies of the
tiny model A. Bit-exact where the math promises it: a GGUF twin sharer hands the receiver its own K/V (live and
recorded), strength 0 never touches them, and a GGUF model in a mixed pair (GGUF receiver with a safetensors
sharer, and the reverse) fuses exactly like a stock model holding the weights its quantized layers compute with.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from bridge_helpers import empty_latent, ksample, load_model, pack_nodes

LATENT = (1, 16, 1, 8, 8)       # 1 latent frame of 8x8: 16 tokens
SAMPLING = dict(cfg=4.0, seed=7, steps=2)


def sample(model, conds, **overrides):
    return ksample(model, conds["pos"], conds["neg"], latent=empty_latent(LATENT), **(SAMPLING | overrides))


@pytest.fixture(scope="module")
def gguf_files(comfy, tiny_models) -> list:
    """ComfyUI-GGUF loaded as ComfyUI loads a custom node, and the tiny GGUF files; skips only where no
    ComfyUI-GGUF source exists (no package registry ships it: tools/install_host.py)."""
    import host
    import nodes
    from make_tiny_gguf import TINY_GGUF_FILES

    install_host = host.install_host
    folder = install_host.gguf_folder(comfy.path)
    if not (folder / "__init__.py").is_file():
        if install_host.gguf_source() is None:
            pytest.skip(f"ComfyUI-GGUF is not in {folder.parent}: no package registry ships it; put "
                        f"{install_host.GGUF_TARBALL} in {install_host.DEFAULT_HOSTS_DIR} and run make host")
        pytest.fail(f"{install_host.GGUF_TARBALL} is in {install_host.DEFAULT_HOSTS_DIR} but ComfyUI-GGUF is not "
                    f"installed in {folder.parent}: run make host", pytrace=False)
    if "UnetLoaderGGUF" not in nodes.NODE_CLASS_MAPPINGS:
        assert asyncio.run(nodes.load_custom_node(str(folder))), f"ComfyUI-GGUF failed to import from {folder}"
    missing = [name for name in TINY_GGUF_FILES if not (tiny_models.diffusion_models / name).is_file()]
    assert not missing, f"tools/make_tiny_models.py did not write {missing} (is the gguf package installed?)"
    return [tiny_models.diffusion_models / name for name in TINY_GGUF_FILES]


def load_gguf(name: str):
    """A model through ComfyUI-GGUF's Unet Loader (GGUF) node, as a user's graph loads it."""
    import nodes
    return nodes.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]().load_unet(name)[0]


def load_dequantized(gguf_model):
    """A stock ModelPatcher (ComfyUI's own ops) holding the float32 weights a GGUF model's layers compute with:
    each tensor through ComfyUI-GGUF's ``get_weight``, the dequantization its ops run in every forward."""
    import comfy.sd
    from dit_cache_bridge.c2c_comfy import compat

    dm = compat.diffusion_model(gguf_model)
    layer = dm.blocks[0].self_attn.k       # any GGUF layer: get_weight depends on the tensor alone
    # The parameters themselves: ComfyUI-GGUF's state_dict() has its own copies and extra entries.
    state = {key: layer.get_weight(tensor, torch.float32).detach().clone() for key, tensor in dm.named_parameters()}
    return comfy.sd.load_diffusion_model_state_dict(state)


@pytest.fixture(scope="module")
def models(gguf_files, tiny_models):
    import host
    from make_tiny_gguf import T2V_A_F16, T2V_A_Q4_0, T2V_A_Q8_0
    pack_nodes()        # the pack as package dit_cache_bridge, for compat below and in the tests
    found = {"Q8_0": load_gguf(T2V_A_Q8_0), "Q8_0_twin": load_gguf(T2V_A_Q8_0), "Q4_0": load_gguf(T2V_A_Q4_0),
             "Q4_0_twin": load_gguf(T2V_A_Q4_0), "F16": load_gguf(T2V_A_F16),
             "a": load_model(tiny_models.path(host.T2V_A)), "b": load_model(tiny_models.path(host.T2V_B))}
    found.update({f"{name}_dequantized": load_dequantized(found[name]) for name in ("Q8_0", "Q4_0")})
    return found


@pytest.fixture(scope="module")
def conds():
    from comfy_test_nodes import wan_conditioning
    return {"pos": wan_conditioning(1), "neg": wan_conditioning(2, length=5),
            "sharer_pos": wan_conditioning(3), "sharer_neg": wan_conditioning(4, length=5)}


@pytest.fixture(scope="module")
def stock(models, conds):
    """Stock KSampler output of a model of ``models``, computed once."""
    outputs = {}

    def run(name):
        if name not in outputs:
            outputs[name] = sample(models[name], conds)
        return outputs[name]
    return run


def projector(sharer, receiver, kind):
    return pack_nodes().CreateC2CProjector.execute(sharer, receiver, kind, "identity", "all", alpha=0.5,
                                                   hidden_dim=0, seed=0).args[0]


def live(sharer, conds, own_conds=False):
    pos, neg = (conds["pos"], conds["neg"]) if own_conds else (conds["sharer_pos"], conds["sharer_neg"])
    return pack_nodes().CaptureKVCache.execute(sharer, pos, neg, layers="auto", refresh_every=1,
                                               rope_alignment="auto").args[0]


def recorded(sharer, conds, own_conds=False):
    """Record KV Cache over the receiver's own sampling settings, stored in float32."""
    pos, neg = (conds["pos"], conds["neg"]) if own_conds else (conds["sharer_pos"], conds["sharer_neg"])
    return pack_nodes().RecordKVCache.execute(sharer, pos, neg, empty_latent(LATENT), SAMPLING["seed"],
                                              SAMPLING["steps"], SAMPLING["cfg"], "euler", "simple", 1.0,
                                              layers="all", storage_dtype="fp32", storage="ram").args[0]


def bridged(receiver, source, proj, conds, strength=1.0):
    fused = pack_nodes().FuseCaches.execute(receiver, source, proj, strength, 0.0, 1.0).args[0]
    return sample(fused, conds)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "F16"])
def test_the_signature_read_from_a_gguf_model_is_its_safetensors_originals(models, qtype):
    from dit_cache_bridge.c2c_comfy import compat
    weight = compat.diffusion_model(models[qtype]).blocks[0].self_attn.k.weight
    assert type(models[qtype]).__name__ == "GGUFModelPatcher" and type(weight).__name__ == "GGMLTensor"
    assert weight.tensor_type.name == qtype          # the K projection is stored in the file's type
    gguf_sig, safetensors_sig = compat.wan_signature(models[qtype]), compat.wan_signature(models["a"])
    assert gguf_sig == safetensors_sig and gguf_sig.arch == safetensors_sig.arch
    assert (gguf_sig.num_layers, gguf_sig.num_heads, gguf_sig.head_dim) == (2, 2, 128)


def test_a_live_gguf_twin_sharer_through_an_identity_projector_is_bit_identical_to_stock(models, conds, stock):
    receiver, twin = models["Q4_0"], models["Q4_0_twin"]
    out = bridged(receiver, live(twin, conds, own_conds=True), projector(twin, receiver, "identity"), conds)
    assert torch.equal(out, stock("Q4_0"))
    assert not torch.equal(stock("Q4_0"), stock("a"))   # the quantization shows: this is not the float32 model


def test_strength_zero_leaves_a_gguf_receiver_bit_identical_to_stock(models, conds, stock):
    receiver, sharer = models["Q4_0"], models["b"]
    out = bridged(receiver, live(sharer, conds), projector(sharer, receiver, "weighted"), conds, strength=0.0)
    assert torch.equal(out, stock("Q4_0"))


@pytest.mark.parametrize("receiver,sharer", [("Q4_0", "b"), ("a", "Q8_0")],
                         ids=["gguf-receiver-safetensors-sharer", "safetensors-receiver-gguf-sharer"])
def test_a_mixed_pair_fuses_exactly_like_the_dequantized_weights(models, conds, stock, receiver, sharer):
    """The GGUF side dequantizes on the fly inside its own ops; the bridge sees the same K/V as from a stock
    model holding those weights, so the output is bit-identical to that pair's, and the fusion changes it."""
    def run(r, s):
        return bridged(models[r], live(models[s], conds), projector(models[s], models[r], "weighted"), conds)

    dequantized = {name: f"{name}_dequantized" if name in ("Q4_0", "Q8_0") else name for name in (receiver, sharer)}
    out = run(receiver, sharer)
    assert torch.equal(out, run(dequantized[receiver], dequantized[sharer]))
    assert torch.isfinite(out).all() and not torch.equal(out, stock(receiver))


def test_a_recorded_gguf_twin_sharer_replays_bit_identical_to_stock(models, conds, stock):
    receiver, twin = models["Q8_0"], models["Q8_0_twin"]
    out = bridged(receiver, recorded(twin, conds, own_conds=True), projector(twin, receiver, "identity"), conds)
    assert torch.equal(out, stock("Q8_0"))


def test_a_recorded_gguf_sharer_replays_into_a_safetensors_receiver_like_its_dequantized_weights(models, conds,
                                                                                                  stock):
    def run(sharer):
        s = models[sharer]
        return bridged(models["a"], recorded(s, conds), projector(s, models["a"], "weighted"), conds)

    out = run("Q4_0")
    assert torch.equal(out, run("Q4_0_dequantized"))
    assert not torch.equal(out, stock("a"))


def test_install_host_installs_comfyui_gguf_only_with_the_pinned_files_and_then_reads_its_stamp(tmp_path,
                                                                                               monkeypatch):
    import tarfile

    import host
    install_host = host.install_host

    def tarball(name: str, text: str) -> Path:
        src = tmp_path / name / f"ComfyUI-GGUF-{install_host.GGUF_COMMIT}"
        src.mkdir(parents=True)
        (src / "__init__.py").write_text(text)
        path = tmp_path / f"{name}.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            tf.add(src, arcname=src.name)
        return path, install_host.tree_digest(src)

    pinned, digest = tarball("pinned", "pinned = True\n")
    other, _ = tarball("other", "pinned = False\n")
    monkeypatch.setattr(install_host, "GGUF_TREE_SHA256", digest)
    tree = tmp_path / "ComfyUI"
    target = install_host.gguf_folder(tree)

    with pytest.raises(SystemExit, match="refusing to install it"):
        install_host.install_gguf_node(tree, other)
    assert not target.exists() and list(target.parent.iterdir()) == []      # no partial folder left behind

    install_host.install_gguf_node(tree, pinned)
    assert (target / "__init__.py").read_text() == "pinned = True\n"
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("a second run must only read the stamp"))
    install_host.install_gguf_node(tree, pinned)

    own = install_host.gguf_folder(tmp_path / "UsersComfyUI")              # a user's own ComfyUI-GGUF stays
    own.mkdir(parents=True)
    (own / "__init__.py").write_text("mine = True\n")
    install_host.install_gguf_node(tmp_path / "UsersComfyUI", pinned)
    assert (own / "__init__.py").read_text() == "mine = True\n"
