"""Refresh every k steps, recorded mode, Wan2.2's two experts and CPU offload with accelerate."""
import pytest
import torch

import tiny
from c2c_core import FusionSchedule, RefreshPolicy
from c2c_core.recording import DiskStore, load_recording, save_recording
from c2c_diffusers import Bridge, BridgeSetupError, KVRecorder, LiveSharer, RecordedSharer, SharerInputs


def twin_inputs():
    return SharerInputs(tiny.embeds(10), tiny.embeds(11))


@pytest.mark.parametrize("refresh, forwards", [(1, 8), (2, 4), (3, 4)])
def test_refresh_every_k_steps_reuses_the_sharers_kv(refresh, forwards):
    pipe = tiny.wan_pipe(tiny.wan(1))
    bridge = Bridge(LiveSharer(tiny.wan(2), twin_inputs()), tiny.bundle("weighted"),
                    refresh=RefreshPolicy(every=refresh)).attach(pipe)
    out = tiny.run_pipe(pipe, steps=4)
    bridge.detach()
    assert bridge.last_report.sharer_forwards == forwards     # cond and uncond per refreshed step
    assert bridge.last_report.model_calls == 8 and torch.isfinite(out).all()


def test_fusion_window_runs_the_sharer_only_inside_it():
    pipe = tiny.wan_pipe(tiny.wan(1))
    bridge = Bridge(LiveSharer(tiny.wan(2), twin_inputs()), tiny.bundle("weighted"),
                    schedule=FusionSchedule(start=0.0, end=0.5)).attach(pipe)
    tiny.run_pipe(pipe, steps=4)
    bridge.detach()
    assert 0 < bridge.last_report.sharer_forwards < 8


def test_recorded_twin_replays_bit_identically_from_ram_and_disk(tmp_path):
    pipe = tiny.wan_pipe(tiny.wan(1))
    plain = tiny.run_pipe(pipe, steps=3)
    sharer = tiny.wan_pipe(tiny.wan(1))
    with KVRecorder(sharer.transformer, layers=[0, 1], storage_dtype="fp32") as recorder:
        tiny.run_pipe(sharer, steps=3)
    recording = recorder.recording
    assert recording.steps == 3 and recording.kinds == (0, 1) and recording.sigmas[-1] == 0.0
    save_recording(tmp_path / "rec.safetensors", recording)
    for rec in (recording, load_recording(tmp_path / "rec.safetensors")):
        bridge = Bridge(RecordedSharer(rec), tiny.bundle("identity")).attach(pipe)
        assert torch.equal(tiny.run_pipe(pipe, steps=3), plain)
        bridge.detach()
        assert bridge.last_report.strength == {0: 1.0, 1: 1.0}
    other = tiny.wan_pipe(tiny.wan(2))
    with KVRecorder(other.transformer, layers=[0, 1], store=DiskStore(tmp_path / "steps")) as recorder:
        tiny.run_pipe(other, steps=3)
    bridge = Bridge(RecordedSharer(recorder.recording), tiny.bundle("identity"), strength=0.5).attach(pipe)
    assert (tiny.run_pipe(pipe, steps=3) - plain).abs().max() > 1e-3
    bridge.detach()


def test_a_recording_shorter_than_the_run_is_refused():
    sharer = tiny.wan_pipe(tiny.wan(1))
    with KVRecorder(sharer.transformer, layers=[0, 1]) as recorder:
        tiny.run_pipe(sharer, steps=2)
    pipe = tiny.wan_pipe(tiny.wan(1))
    bridge = Bridge(RecordedSharer(recorder.recording), tiny.bundle("identity")).attach(pipe)
    with pytest.raises(BridgeSetupError, match="K/V recording.*Record with the receiver's .*num_inference_steps"):
        tiny.run_pipe(pipe, steps=3)
    bridge.detach()


def test_wan22_two_experts_both_fuse_and_detach():
    high, low = tiny.wan(1), tiny.wan(4)
    pipe = tiny.wan_pipe(high, low, boundary_ratio=0.5)
    plain = tiny.run_pipe(pipe, steps=4)
    bridge = Bridge(LiveSharer(tiny.wan(2), twin_inputs()), tiny.bundle("weighted")).attach(pipe)
    assert bridge.receivers == [high, low]
    fused = tiny.run_pipe(pipe, steps=4)
    bridge.detach()
    assert bridge.last_report.model_calls == 8 and bridge.last_report.sharer_forwards == 8
    assert not torch.equal(fused, plain)
    assert torch.equal(tiny.run_pipe(pipe, steps=4), plain)


@pytest.fixture
def offload_calls(monkeypatch):
    """Counts accelerate's CpuOffload pre_forward calls on the receiver (the real hook still runs)."""
    from accelerate.hooks import CpuOffload
    calls = []
    real = CpuOffload.pre_forward

    def spy(self, module, *args, **kwargs):
        calls.append(type(module).__name__)
        return real(self, module, *args, **kwargs)
    monkeypatch.setattr(CpuOffload, "pre_forward", spy)
    return calls


@pytest.mark.parametrize("offload_first", [True, False])
def test_model_cpu_offload_keeps_both_the_bridge_and_accelerate_in_either_order(offload_calls, offload_first):
    pipe = tiny.wan_pipe(tiny.wan(1))
    plain = tiny.run_pipe(pipe, steps=2)
    bridge = Bridge(LiveSharer(tiny.wan(2), twin_inputs()), tiny.bundle("weighted"))
    if offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
        bridge.attach(pipe)
    else:
        bridge.attach(pipe)
        pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):          # diffusers re-creates accelerate's hooks after every call: the bridge must survive
        offload_calls.clear()
        with bridge.session():
            fused = tiny.run_pipe(pipe, steps=2)
        assert bridge.last_report.model_calls == 4 and bridge.last_report.sharer_forwards == 4
        assert offload_calls.count("WanTransformer3DModel") == 4
        assert not torch.equal(fused, plain)
    bridge.detach()
    offload_calls.clear()
    assert torch.equal(tiny.run_pipe(pipe, steps=2), plain)
    assert offload_calls.count("WanTransformer3DModel") == 4


def test_a_bare_transformer_with_offload_hooks_is_refused():
    pipe = tiny.wan_pipe(tiny.wan(1))
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(BridgeSetupError, match=r"carries accelerate hooks .* Attach to the pipeline instead"):
        Bridge(LiveSharer(tiny.wan(2), twin_inputs()), tiny.bundle("weighted")).attach(pipe.transformer)


def test_a_recording_from_another_noise_schedule_is_refused():
    sharer = tiny.wan_pipe(tiny.wan(1))
    with KVRecorder(sharer.transformer, layers=[0, 1]) as recorder:
        tiny.run_pipe(sharer, steps=3)
    pipe = tiny.wan_pipe(tiny.wan(1))
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=3.0)
    bridge = Bridge(RecordedSharer(recorder.recording), tiny.bundle("identity")).attach(pipe)
    with pytest.raises(BridgeSetupError, match=r"step 2 is at sigma .* but the K/V recording's is at"):
        tiny.run_pipe(pipe, steps=3)
    bridge.detach()


def test_bf16_models_fuse_with_a_bf16_copy_of_the_bank_and_the_twin_stays_bit_identical():
    pipe = tiny.wan_pipe(tiny.wan(1).to(torch.bfloat16))
    plain = tiny.run_pipe(pipe, steps=2)
    twin = Bridge(LiveSharer(tiny.wan(1).to(torch.bfloat16), twin_inputs()), tiny.bundle("identity")).attach(pipe)
    assert torch.equal(tiny.run_pipe(pipe, steps=2), plain)
    twin.detach()
    bundle = tiny.bundle("full", seed=1, hidden_dim=16)
    bridge = Bridge(LiveSharer(tiny.wan(2).to(torch.bfloat16), twin_inputs()), bundle).attach(pipe)
    fused = tiny.run_pipe(pipe, steps=2)
    bridge.detach()
    assert torch.isfinite(fused).all() and not torch.equal(fused, plain)
    assert all(p.dtype == torch.float32 for p in bundle.bank.parameters()), "the user's bank is never cast"


def test_every_source_run_implements_the_host_contract():
    """Live, lockstep (bidirectional) and recorded runs are c2c_core.contract.KVSourceRun, as ComfyUI's are."""
    from c2c_core.contract import KVSourceRun
    from c2c_diffusers.lockstep import LockstepRun
    from c2c_diffusers.live import LiveSharerRun
    from c2c_diffusers.recorded import RecordedRun
    sharer = tiny.wan_pipe(tiny.wan(2))
    with KVRecorder(sharer.transformer, layers=[0, 1], storage_dtype="fp32") as recorder:
        tiny.run_pipe(sharer, steps=2)
    pipe = tiny.wan_pipe(tiny.wan(1))
    sources = ((LiveSharer(tiny.wan(2), twin_inputs()), LiveSharerRun),
               (LiveSharer(tiny.wan(2), twin_inputs(), backward=tiny.bundle("weighted")), LockstepRun),
               (RecordedSharer(recorder.recording), RecordedRun))
    for source, kind in sources:
        bridge = Bridge(source, tiny.bundle("weighted")).attach(pipe)
        with bridge.session():
            tiny.run_pipe(pipe, steps=2)
            run = bridge.source_run
            assert type(run) is kind and isinstance(run, KVSourceRun)
        bridge.detach()
        assert bridge.last_report.model_calls == 4


def test_a_bridge_with_its_arguments_swapped_is_refused_with_the_order():
    with pytest.raises(BridgeSetupError, match=r"Bridge\(source, bundle, …\): bundle is a LiveSharer \(the arguments "
                                               r"are swapped: the source comes first\)"):
        Bridge(tiny.bundle("weighted"), LiveSharer(tiny.wan(2), twin_inputs()))
