"""Training-sample files (c2c_core.samples): one format for both hosts, read strictly, drawn reproducibly."""
import json
import struct

import pytest
import torch

from c2c_core import save_tensors_with_meta
from c2c_core.samples import (FORMAT_VERSION, ROLES, SAMPLE_KEY, Conditioning, SampleDraws, SampleHost,
                              TrainingDataError, TrainingSet, save_sample, seed_of)

HOST = SampleHost("testhost", ("receiver_positive", "sharer_positive"), "the test writer")
OTHER = SampleHost("otherhost", ("receiver_positive", "sharer_positive"), "the other writer")
SHAPE = (1, 16, 2, 4, 4)


def latent(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def roles(seed=0, **extra):
    g = torch.Generator().manual_seed(100 + seed)
    return {"receiver_positive": Conditioning({"cross_attn": torch.randn(1, 5, 8, generator=g)}, {"strength": 0.5}),
            "sharer_positive": Conditioning({"cross_attn": torch.randn(1, 6, 8, generator=g),
                                             "reference.0": torch.randn(1, 3, generator=g)}, {"name": "x"}), **extra}


def header(path):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length])


def test_a_sample_round_trips_its_latent_tensors_and_values_without_pickle(tmp_path):
    path = save_sample(tmp_path, HOST, latent(1), roles(1), dropped=["sharer_positive.hook (Hook)"])
    assert path.name == "sample_00001.safetensors"
    meta = json.loads(header(path)["__metadata__"][SAMPLE_KEY])
    assert (meta["format_version"], meta["host"], meta["latent_shape"]) == (FORMAT_VERSION, "testhost", list(SHAPE))
    assert meta["roles"]["sharer_positive"] == {"tensors": ["cross_attn", "reference.0"], "values": {"name": "x"}}
    assert meta["dropped"] == ["sharer_positive.hook (Hook)"]
    data = TrainingSet.open(tmp_path, HOST)
    sample = data[0]
    assert len(data) == 1 and data.latent_shape(0) == SHAPE and data.roles(0) == ["receiver_positive", "sharer_positive"]
    assert torch.equal(sample.latent, latent(1)) and sample.index == 0 and sample.path == path
    for role, cond in roles(1).items():
        assert cond.values == sample.roles[role].values
        assert cond.tensors.keys() == sample.roles[role].tensors.keys()
        assert all(torch.equal(t, sample.roles[role].tensors[n]) for n, t in cond.tensors.items())


def test_saving_never_overwrites_and_numbers_on(tmp_path, monkeypatch):
    import c2c_core.samples as samples
    save_sample(tmp_path, HOST, latent(), roles())
    (tmp_path / "sample_00007.safetensors").write_bytes(b"someone else's")
    assert save_sample(tmp_path, HOST, latent(), roles()).name == "sample_00008.safetensors"
    monkeypatch.setattr(samples, "_next_index", lambda folder: 1)      # another writer took the number meanwhile
    assert save_sample(tmp_path, HOST, latent(), roles()).name == "sample_00002.safetensors"
    assert (tmp_path / "sample_00007.safetensors").read_bytes() == b"someone else's"


@pytest.mark.parametrize("bad, message", [
    (dict(latent=torch.zeros(2, 16, 2, 4, 4)), r"expected one float video latent \(1, C, T, H, W\)"),
    (dict(roles={"receiver_positive": Conditioning()}), r"\['sharer_positive'\] missing"),
    (dict(roles=roles(extra_role=Conditioning())), r"\['extra_role'\] unknown"),
    (dict(roles=roles(receiver_negative=Conditioning({"ids": torch.ones(3, dtype=torch.long)}))),
     r"receiver_negative tensor 'ids' .*expected a float tensor"),
    (dict(roles=roles(receiver_negative=Conditioning({"a/b": torch.ones(3)}))), r"tensor 'a/b'"),
    (dict(roles=roles(receiver_negative=Conditioning(values={"x": float("nan")}))), r"values \['x'\] are not JSON"),
])
def test_what_cannot_be_read_back_is_refused_when_saving(tmp_path, bad, message):
    with pytest.raises(TrainingDataError, match=message):
        save_sample(tmp_path, HOST, bad.get("latent", latent()), bad.get("roles", roles()))
    assert not any(tmp_path.iterdir())


def test_a_missing_or_empty_folder_is_refused(tmp_path):
    with pytest.raises(TrainingDataError, match=r"training-sample folder .*nowhere does not exist"):
        TrainingSet.open(tmp_path / "nowhere", HOST)
    with pytest.raises(TrainingDataError, match=r"holds no \.safetensors samples"):
        TrainingSet.open(tmp_path, HOST)


def test_a_sample_of_the_other_host_is_refused_saying_why_and_how(tmp_path):
    save_sample(tmp_path, OTHER, latent(), roles())
    with pytest.raises(TrainingDataError, match=r"written by the otherhost host; this is the testhost host, whose latent "
                                                r"space and image conditioning differ\. Save the sample with the test writer"):
        TrainingSet.open(tmp_path, HOST)


def test_samples_of_the_earlier_diffusers_format_are_refused_with_the_fix(tmp_path):
    save_tensors_with_meta(tmp_path / "s0.safetensors", {"x0": latent()}, {"format_version": 1, "tensors": ["x0"]},
                           "c2c_diffusers_training_sample")
    with pytest.raises(TrainingDataError, match=r"written by an earlier c2c_diffusers .*write it again with the test writer"):
        TrainingSet.open(tmp_path, HOST)


def test_files_that_are_not_samples_or_disagree_with_their_metadata_are_refused(tmp_path):
    save_tensors_with_meta(tmp_path / "a" / "bundle.safetensors", {"w": torch.ones(2)}, {"x": 1}, "c2c_bundle")
    with pytest.raises(TrainingDataError, match=r"bundle\.safetensors is not a training sample"):
        TrainingSet.open(tmp_path / "a", HOST)
    path = save_sample(tmp_path / "b", HOST, latent(), roles())
    meta = json.loads(header(path)["__metadata__"][SAMPLE_KEY])
    meta["roles"]["receiver_positive"]["tensors"].append("missing_one")
    save_tensors_with_meta(path, {"latent": latent(), "receiver_positive.cross_attn": torch.ones(1, 5, 8),
                                  "sharer_positive.cross_attn": torch.ones(1, 6, 8),
                                  "sharer_positive.reference.0": torch.ones(1, 3)}, meta, SAMPLE_KEY)
    with pytest.raises(TrainingDataError, match=r"tensors \['receiver_positive\.missing_one'\] are missing and \[\] "
                                                r"unexpected; the file does not match its metadata"):
        TrainingSet.open(tmp_path / "b", HOST)
    meta["format_version"] = 9
    save_tensors_with_meta(path, {"latent": latent()}, meta, SAMPLE_KEY)
    with pytest.raises(TrainingDataError, match=r"sample format 9; expected 1 or 2\. Update DiT Cache Bridge"):
        TrainingSet.open(tmp_path / "b", HOST)
    del meta["roles"]["sharer_positive"]
    meta["format_version"] = 2
    save_tensors_with_meta(path, {"latent": latent()}, meta, SAMPLE_KEY)
    with pytest.raises(TrainingDataError, match=r"names roles \['receiver_positive'\]; expected \['receiver_positive', "
                                                r"'sharer_positive'\]\. Re-save it with the test writer"):
        TrainingSet.open(tmp_path / "b", HOST)


def test_nan_latents_are_refused_on_open_and_nan_conditioning_on_use_naming_index_file_and_fix(tmp_path):
    bad = latent(3)
    bad[0, 2, 1, 1, 1] = float("inf")
    save_sample(tmp_path / "a", HOST, latent(), roles())
    save_sample(tmp_path / "a", HOST, bad, roles())
    with pytest.raises(TrainingDataError) as refused:
        TrainingSet.open(tmp_path / "a", HOST)
    e = refused.value
    assert e.found == f"the latents of samples index 1 (sample_00002.safetensors) in {tmp_path / 'a'} hold NaN or Inf values"
    assert e.expected.startswith("finite values") and e.fix.startswith(f"delete sample_00002.safetensors from {tmp_path / 'a'}")
    assert str(e) == f"{e.found}; expected {e.expected}. Fix: {e.fix}" and "the test writer" in e.fix
    cond = roles()
    cond["sharer_positive"].tensors["cross_attn"][0, 1, 2] = float("nan")
    save_sample(tmp_path / "b", HOST, latent(), cond)
    data = TrainingSet.open(tmp_path / "b", HOST)
    with pytest.raises(TrainingDataError, match=r"sample index 0 \(sample_00001\.safetensors\): tensor "
                                                r"'sharer_positive\.cross_attn' holds NaN or Inf values; expected finite"):
        data[0]


def test_format_1_comfyui_samples_are_read_with_their_names(tmp_path):
    """Files the ComfyUI host wrote before format 2: ``<role>.0.<name>`` tensors, one entry per role."""
    comfy = SampleHost("comfyui", ROLES, "Save C2C Training Sample")
    tensors = {"latent": latent()}
    entries = {}
    for i, role in enumerate(ROLES):
        entries[role] = [{"cross_attn": True, "tensors": ["concat_mask"], "tensor_lists": {"reference_latents": 2},
                          "clip_vision_output": role.startswith("sharer"), "values": {"strength": i}}]
        names = ["cross_attn", "concat_mask", "reference_latents.0", "reference_latents.1"]
        names += ["clip_vision_output"] if role.startswith("sharer") else []
        tensors.update({f"{role}.0.{n}": torch.full((1, 2), float(i)) for n in names})
    save_tensors_with_meta(tmp_path / "sample_00001.safetensors", tensors,
                           {"format_version": 1, "latent_shape": list(SHAPE), "roles": entries}, SAMPLE_KEY)
    sample = TrainingSet.open(tmp_path, comfy)[0]
    assert sorted(sample.roles) == sorted(ROLES)
    sharer = sample.roles["sharer_negative"]
    assert sorted(sharer.tensors) == ["clip_vision_output", "concat_mask", "cross_attn", "reference_latents.0",
                                      "reference_latents.1"]
    assert sharer.values == {"strength": 3} and float(sharer.tensors["cross_attn"][0, 0]) == 3.0
    with pytest.raises(TrainingDataError, match=r"written by the comfyui host; this is the testhost host"):
        TrainingSet.open(tmp_path, HOST)
    entries["receiver_positive"].append(entries["receiver_positive"][0])
    save_tensors_with_meta(tmp_path / "sample_00001.safetensors", tensors,
                           {"format_version": 1, "latent_shape": list(SHAPE), "roles": entries}, SAMPLE_KEY)
    with pytest.raises(TrainingDataError, match=r"receiver_positive has 2 conditioning entries; expected exactly 1"):
        TrainingSet.open(tmp_path, comfy)


# -- draws ------------------------------------------------------------------------------------------


@pytest.fixture
def five(tmp_path):
    for i in range(5):
        save_sample(tmp_path, HOST, latent(i), roles(i))
    return TrainingSet.open(tmp_path, HOST)



def same(a, b):
    return all(x.index == y.index and torch.equal(x.noise, y.noise) and x.t == y.t and x.negative == y.negative
               for x, y in zip(a, b, strict=True))


def test_draws_are_a_pure_function_of_seed_and_step(five):
    torch.manual_seed(1)
    first = SampleDraws(five, seed=4, negative_share=0.5, batch_size=3)(2)
    torch.manual_seed(2)
    again = SampleDraws(five, seed=4, negative_share=0.5, batch_size=3)(2)
    assert same(first, again)
    assert not same(first, SampleDraws(five, seed=5, negative_share=0.5, batch_size=3)(2))
    assert all(d.noise.shape == SHAPE and 0.0 <= d.t < 1.0 for d in first)
    assert seed_of(4, "item", 7) == seed_of("4", "item", "7") < 2**63


def test_every_epoch_visits_every_sample_once(five):
    draws = SampleDraws(five, seed=0)
    epochs = [sorted(draws(step)[0].index for step in range(e * 5, e * 5 + 5)) for e in range(3)]
    assert epochs == [[0, 1, 2, 3, 4]] * 3


def test_ranks_split_the_global_batch_of_one_process(five):
    one = SampleDraws(five, seed=2, negative_share=0.3, batch_size=4)
    ranks = [SampleDraws(five, seed=2, negative_share=0.3, batch_size=2, rank=r, world=2) for r in range(2)]
    for step in range(3):
        assert same(one(step), ranks[0](step) + ranks[1](step))


def test_negative_share_picks_the_negative_branch_that_often(five):
    draws = SampleDraws(five, seed=0, negative_share=0.25, batch_size=400)(0)
    assert 0.18 < sum(d.negative for d in draws) / 400 < 0.32
    assert not any(d.negative for d in SampleDraws(five, seed=0, negative_share=0.0, batch_size=50)(0))
