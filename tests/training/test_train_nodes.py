"""Save C2C Training Sample and Train C2C Projector as a workflow runs them (inside torch.inference_mode)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.usefixtures("comfy"), pytest.mark.slow]


def run_node(node, **inputs):
    """Execute a V3 node the way ComfyUI's executor does: under inference_mode."""
    with torch.inference_mode():
        return node.execute(**inputs)


@pytest.fixture(scope="module", autouse=True)
def remove_bundles_afterwards(pack):
    """The node writes into the models root shared with other tests; leave nothing behind."""
    from dit_cache_bridge.nodes import train as train_nodes
    yield
    for path in Path(train_nodes.projector_folder()).glob("tiny_pair_*.safetensors"):
        path.unlink()


@pytest.fixture(scope="module")
def conds():
    from comfy_test_nodes import wan_conditioning
    return {"positive": wan_conditioning(1), "negative": wan_conditioning(2, length=5),
            "sharer_positive": wan_conditioning(3), "sharer_negative": wan_conditioning(4, length=5)}


@pytest.fixture(scope="module")
def dataset_name(pack, conds, comfy):
    name = "tiny_pair"
    shutil.rmtree(comfy.output_dir / "c2c_training" / name, ignore_errors=True)
    for seed in range(3):
        latent = {"samples": torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(seed))}
        (folder,) = run_node(pack.SaveC2CTrainingSample, latent=latent, folder=name, **conds).args
        assert folder == name
    return name


def train_inputs(**overrides):
    inputs = dict(dataset="tiny_pair", loss="distill", steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=0,
                  schedule="cosine", checkpoint_every=2, seed=0, output_name="tiny_pair_c2c", resume=True,
                  negative_share=0.1)
    return inputs | overrides


def test_save_node_writes_one_file_per_latent(pack, dataset_name, comfy):
    files = sorted((comfy.output_dir / "c2c_training" / dataset_name).iterdir())
    assert [f.name for f in files] == [f"sample_{i:05d}.safetensors" for i in range(1, 7)]


def test_train_node_returns_a_projector_fuse_caches_uses_and_a_loss_plot(pack, helpers, models, conds,
                                                                         dataset_name, comfy):
    from bridge_helpers import ksample
    a, b = models["a"], models["b"]
    projector = helpers.make_projector(pack, b, a, "c2c")
    shutil.rmtree(comfy.output_dir / "c2c_training" / "checkpoints" / "tiny_pair_c2c", ignore_errors=True)
    trained, plot = run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=projector,
                             **train_inputs()).args
    assert plot.dim() == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3 and 0.0 <= float(plot.min())
    assert (comfy.output_dir / "c2c_training" / "tiny_pair_c2c_loss.png").is_file()
    assert trained.provenance["steps"] == 4 and not trained.bank.training
    loaded = pack.LoadC2CProjector.execute("tiny_pair_c2c.safetensors").args[0]
    assert all(torch.equal(v, trained.bank.state_dict()[k]) for k, v in loaded.bank.state_dict().items())

    src = pack.CaptureKVCache.execute(sharer=b, positive=conds["sharer_positive"], negative=conds["sharer_negative"]).args[0]
    fused = pack.FuseCaches.execute(model=a, kv_source=src, projector=trained, strength=1.0, start_percent=0.0,
                                    end_percent=1.0).args[0]
    out = ksample(fused, conds["positive"], conds["negative"])
    assert torch.isfinite(out).all() and not torch.equal(out, ksample(a, conds["positive"], conds["negative"]))

    # queued again: resumes at the final checkpoint and returns the same weights without training
    again, _ = run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=projector, **train_inputs()).args
    assert all(torch.equal(v, trained.bank.state_dict()[k]) for k, v in again.bank.state_dict().items())
    assert again.provenance["final_loss"] == trained.provenance["final_loss"]


def test_new_samples_change_the_train_node_fingerprint(pack, conds, comfy):
    name = "fingerprint_set"
    shutil.rmtree(comfy.output_dir / "c2c_training" / name, ignore_errors=True)
    run_node(pack.SaveC2CTrainingSample, latent={"samples": torch.zeros(1, 16, 3, 8, 8)}, folder=name, **conds)
    before = pack.TrainC2CProjector.fingerprint_inputs(dataset=name, steps=4)
    assert before == pack.TrainC2CProjector.fingerprint_inputs(dataset=name, steps=4)
    run_node(pack.SaveC2CTrainingSample, latent={"samples": torch.zeros(1, 16, 3, 8, 8)}, folder=name, **conds)
    assert pack.TrainC2CProjector.fingerprint_inputs(dataset=name, steps=4) != before


def test_train_node_leaves_its_input_projector_untouched(pack, helpers, models, dataset_name):
    a, b = models["a"], models["b"]
    projector = helpers.make_projector(pack, b, a, "full")
    before = {k: v.clone() for k, v in projector.bank.state_dict().items()}
    trained, _ = run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=projector,
                          **train_inputs(output_name="tiny_pair_full", resume=False, steps=2)).args
    assert all(torch.equal(before[k], v) for k, v in projector.bank.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in trained.bank.state_dict().items())


# --- bad input: each names the node, the input and the fix -------------------------------------
def test_empty_or_missing_dataset_folder_is_refused(pack, helpers, models, comfy):
    a, b = models["a"], models["b"]
    (comfy.output_dir / "c2c_training" / "empty").mkdir(parents=True, exist_ok=True)
    projector = helpers.make_projector(pack, b, a, "c2c")
    for name, found in (("empty", "holds no .safetensors samples"), ("nowhere", "does not exist")):
        with pytest.raises(ValueError, match=rf"Train C2C Projector › dataset: .*{found}.*Fix: save samples into "
                                             rf"output/c2c_training/{name}/"):
            run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=projector, **train_inputs(dataset=name))


def test_projector_for_another_pair_is_refused(pack, helpers, models, dataset_name):
    a, b, wide = models["a"], models["b"], models["wide"]
    projector = helpers.make_projector(pack, wide, a, "full", mapping="terminal")
    with pytest.raises(ValueError, match=r"Train C2C Projector › projector: a projector made for a sharer of 3 layers "
                                         r"× 4 heads × 128, but the sharer model has 2 layers.*Fix: load the projector"):
        run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=projector, **train_inputs())


def test_projector_with_nothing_to_learn_is_refused(pack, helpers, models, dataset_name):
    a, b = models["a"], models["b"]
    projector = helpers.make_projector(pack, b, a, "identity")
    with pytest.raises(ValueError, match=r"Train C2C Projector › projector: a 'identity' projector, which has nothing "
                                         r"to learn.*Fix: set Create C2C Projector's kind to c2c, full or gating"):
        run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=projector, **train_inputs())


def test_kv_loss_between_different_widths_is_refused(pack, helpers, models, dataset_name):
    a, wide = models["a"], models["wide"]
    projector = helpers.make_projector(pack, wide, a, "full", mapping="terminal")
    with pytest.raises(ValueError, match=r"Train C2C Projector › loss: 'kv' for models of different attention widths"):
        run_node(pack.TrainC2CProjector, sharer=wide, receiver=a, projector=projector, **train_inputs(loss="kv"))


def test_bad_names_and_settings_are_refused(pack, helpers, models, dataset_name, conds):
    a, b = models["a"], models["b"]
    projector = helpers.make_projector(pack, b, a, "c2c")
    with pytest.raises(ValueError, match=r"Train C2C Projector › output_name: '../evil'"):
        run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=projector,
                 **train_inputs(output_name="../evil"))
    with pytest.raises(ValueError, match=r"Train C2C Projector › warmup_steps: 4; expected fewer than steps \(4\)"):
        run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=projector, **train_inputs(warmup_steps=4))
    with pytest.raises(ValueError, match=r"Save C2C Training Sample › folder: 'a/b'"):
        run_node(pack.SaveC2CTrainingSample, latent={"samples": torch.zeros(1, 16, 3, 8, 8)}, folder="a/b", **conds)


def test_a_sample_folder_named_checkpoints_is_refused_by_both_nodes(pack, helpers, models, conds, comfy):
    """output/c2c_training/checkpoints/ holds Train C2C Projector's checkpoints: no sample folder may share it."""
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    a, b = models["a"], models["b"]
    (comfy.output_dir / "c2c_training").mkdir(parents=True, exist_ok=True)
    listing = sorted(p.name for p in (comfy.output_dir / "c2c_training").iterdir())
    expected = ("expected a sample folder other than output/c2c_training/checkpoints/, where Train C2C Projector "
                "keeps its checkpoints. Fix: rename it, e.g. 'wan_chronoedit'")
    with pytest.raises(BridgeInputError) as info:
        run_node(pack.SaveC2CTrainingSample, latent={"samples": torch.zeros(1, 16, 3, 8, 8)}, folder="checkpoints",
                 **conds)
    assert str(info.value) == f"Save C2C Training Sample › folder: 'checkpoints'; {expected}"
    with pytest.raises(BridgeInputError) as info:
        run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=helpers.make_projector(pack, b, a, "c2c"),
                 **train_inputs(dataset="Checkpoints"))
    assert str(info.value) == f"Train C2C Projector › dataset: 'Checkpoints'; {expected}"
    assert sorted(p.name for p in (comfy.output_dir / "c2c_training").iterdir()) == listing


@pytest.mark.parametrize("name, latent, text, found, expected, fix", [
    ("other_channels", (1, 48, 3, 8, 8), 4096, "the latent has 48 channels", "the models' 16-channel latent (wan2.1)",
     "save samples for these models with Save C2C Training Sample (its latent encoded by these models' VAE), or "
     "pick the dataset made for them"),
    ("other_text", (1, 16, 3, 8, 8), 512, "receiver_negative has text embeddings 512 wide",
     "the receiver's text width 4096 ({arch})",
     "save samples with the receiver's own text encoder through Save C2C Training Sample, or pick the dataset "
     "made for these models"),
])
def test_a_dataset_made_for_other_models_is_refused_before_training(pack, helpers, models, conds, comfy, name,
                                                                    latent, text, found, expected, fix):
    from dit_cache_bridge.c2c_comfy import compat
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    a, b = models["a"], models["b"]
    folder = comfy.output_dir / "c2c_training" / name
    shutil.rmtree(folder, ignore_errors=True)
    save_unchecked(folder, torch.zeros(latent), conds | {"negative": [[torch.zeros(1, 5, text), {}]]})
    with pytest.raises(BridgeInputError) as info:
        run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=helpers.make_projector(pack, b, a, "c2c"),
                 **train_inputs(dataset=name, output_name=f"tiny_pair_{name}", resume=False))
    arch = compat.wan_signature(a).arch.describe()
    assert str(info.value) == (f"Train C2C Projector › dataset: sample index 0 (sample_00001.safetensors) in {folder}: "
                               f"{found}; expected {expected.format(arch=arch)}. Fix: {fix}")
    assert not (comfy.output_dir / "c2c_training" / "checkpoints" / f"tiny_pair_{name}").exists(), "nothing written"


def test_a_huge_latent_is_blamed_on_the_data_not_the_projector(pack, helpers, models, conds, comfy):
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    a, b = models["a"], models["b"]
    folder = comfy.output_dir / "c2c_training" / "huge_latent"
    shutil.rmtree(folder, ignore_errors=True)
    save_unchecked(folder, torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1e30, conds)
    with pytest.raises(BridgeInputError, match=r"Train C2C Projector › dataset: the latents of samples index 0 "
                                               r"\(sample_00001\.safetensors, up to [0-9.e+]+\) in .*huge_latent hold "
                                               r"values far beyond any VAE latent; this is the data, not the projector; "
                                               r"expected latent values within ±10000 \(a latent from VAE Encode or a "
                                               r"sampler\)\. Fix: delete sample_00001\.safetensors from .*huge_latent"):
        run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=helpers.make_projector(pack, b, a, "c2c"),
                 **train_inputs(dataset="huge_latent"))


def test_resuming_a_checkpoint_whose_optimizer_step_is_nan_is_refused_and_writes_nothing(pack, helpers, models,
                                                                                         dataset_name, comfy):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from dit_cache_bridge.c2c_comfy.errors import BridgeInputError
    from dit_cache_bridge.nodes import train as train_nodes
    a, b = models["a"], models["b"]
    projector = helpers.make_projector(pack, b, a, "full")
    inputs = train_inputs(output_name="tiny_pair_nan_step", resume=False, steps=2, checkpoint_every=1)
    run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=projector, **inputs)
    state = comfy.output_dir / "c2c_training" / "checkpoints" / "tiny_pair_nan_step" / "step_000002.state.safetensors"
    with safe_open(str(state), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(state))
    tensors["optimizer.0.step"] = torch.tensor(float("nan"))
    save_file(tensors, str(state), metadata=metadata)
    bundles = sorted(Path(train_nodes.projector_folder()).iterdir())
    with pytest.raises(BridgeInputError) as info:
        run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=projector, **(inputs | {"resume": True}))
    assert str(info.value) == (f"Train C2C Projector › resume: {state}: optimizer step of parameter 0 holds NaN or Inf; "
                               f"expected finite values (the run it comes from diverged, or the file was damaged). "
                               f"Resume from an earlier checkpoint, or start a new run (resume off); expected a "
                               f"checkpoint of this output_name, intact and made with these settings. Fix: use the "
                               f"settings of the interrupted run, switch resume off, or pick a new output_name")
    assert sorted(Path(train_nodes.projector_folder()).iterdir()) == bundles


def test_sample_with_mismatched_image_latent_is_refused(pack, conds):
    from comfy_test_nodes import i2v_conditioning
    wrong = i2v_conditioning(conds["sharer_positive"], torch.zeros(1, 16, 5, 8, 8))
    with pytest.raises(ValueError, match=r"Save C2C Training Sample › sharer_positive: an image latent of \(5, 8, 8\)"):
        run_node(pack.SaveC2CTrainingSample, latent={"samples": torch.zeros(1, 16, 3, 8, 8)}, folder="x",
                 **(conds | {"sharer_positive": wrong}))


def test_every_input_has_a_tooltip_and_the_training_category(pack):
    for node in (pack.SaveC2CTrainingSample, pack.TrainC2CProjector):
        schema = node.define_schema()
        assert schema.category == "DiT Cache Bridge/training"
        assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]


def save_unchecked(folder, latents, conds):
    """Samples as a script or an older version of the pack may have written them: no finiteness check."""
    from dit_cache_bridge.c2c_comfy import training
    training.save_training_samples(folder, latents, {
        "receiver_positive": conds["positive"], "receiver_negative": conds["negative"],
        "sharer_positive": conds["sharer_positive"], "sharer_negative": conds["sharer_negative"]})


def test_save_node_refuses_nan_or_inf_naming_the_input(pack, conds, comfy):
    root = comfy.output_dir / "c2c_training"
    latents = torch.zeros(1, 16, 3, 8, 8)
    latents[0, 0, 0, 0, :2] = float("nan")
    with pytest.raises(ValueError, match=r"Save C2C Training Sample › latent: 2 NaN or Inf value\(s\) in the tensor; "
                                         r"expected finite values.*Fix: fix the node that produced it"):
        run_node(pack.SaveC2CTrainingSample, latent={"samples": latents}, folder="refused_nan", **conds)
    bad = [[conds["negative"][0][0].clone(), dict(conds["negative"][0][1])]]
    bad[0][0][0, 1, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"Save C2C Training Sample › negative: 1 NaN or Inf value\(s\) in the tensor"):
        run_node(pack.SaveC2CTrainingSample, latent={"samples": torch.zeros(1, 16, 3, 8, 8)}, folder="refused_nan",
                 **(conds | {"negative": bad}))
    assert not (root / "refused_nan").exists(), "nothing written"


def test_samples_holding_nan_or_inf_are_refused_naming_the_sample(pack, helpers, models, conds, comfy):
    """A latent with NaN (written by the library's save, as a hand-made or older dataset can be) is refused when
    the dataset is opened, before any model runs; NaN/Inf in saved conditioning when the sample is first used.
    Both name the node, the dataset input, the sample's index and file, and the fix."""
    a, b = models["a"], models["b"]
    projector = helpers.make_projector(pack, b, a, "c2c")
    root = comfy.output_dir / "c2c_training"
    for name in ("nan_latent", "inf_conditioning"):
        shutil.rmtree(root / name, ignore_errors=True)
    latents = torch.randn(3, 16, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    latents[1, 4, 2, 3, 3] = float("nan")
    save_unchecked(root / "nan_latent", latents, conds)
    with pytest.raises(ValueError, match=r"Train C2C Projector › dataset: the latents of samples index 1 "
                                         r"\(sample_00002\.safetensors\) in .*nan_latent hold NaN or Inf values; "
                                         r"expected finite values .*Fix: delete sample_00002\.safetensors from "):
        run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=projector,
                 **train_inputs(dataset="nan_latent", output_name="tiny_pair_nan"))
    assert not (root / "checkpoints" / "tiny_pair_nan").exists(), "refused before training started"

    bad = [[conds["sharer_positive"][0][0].clone(), dict(conds["sharer_positive"][0][1])]]
    bad[0][0][0, 2, 5] = float("inf")
    save_unchecked(root / "inf_conditioning", latents[:1], conds | {"sharer_positive": bad})
    with pytest.raises(ValueError, match=r"Train C2C Projector › dataset: sample index 0 \(sample_00001\.safetensors\): "
                                         r"tensor 'sharer_positive\.cross_attn' holds NaN or Inf values; expected "
                                         r"finite values .*Fix: delete sample_00001\.safetensors from "):
        run_node(pack.TrainC2CProjector, sharer=b, receiver=a, projector=projector,
                 **train_inputs(dataset="inf_conditioning", output_name="tiny_pair_inf", checkpoint_every=0))
    for name in ("nan_latent", "inf_conditioning"):
        shutil.rmtree(root / name, ignore_errors=True)
