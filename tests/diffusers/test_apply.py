"""diffusers' own shape (issue 20): C2CBridgeConfig + apply_c2c_bridge(transformer, config, sharer=…) /
remove_c2c_bridge(transformer), as apply_first_block_cache does; bit-exact after remove; stacks with
FirstBlockCache and model CPU offload."""
import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

import tiny
from c2c_diffusers import (BridgeSetupError, C2CBridgeConfig, LiveSharer, SharerInputs, apply_c2c_bridge,
                           remove_c2c_bridge)

STEPS = 3


def sharer():
    return LiveSharer(tiny.wan(2), SharerInputs(tiny.embeds(10), tiny.embeds(11)))


def test_apply_fuses_and_remove_gives_the_transformer_back_bit_for_bit(tmp_path):
    from c2c_core import save_bundle
    pipe = tiny.wan_pipe(tiny.wan(1))
    plain = tiny.run_pipe(pipe, steps=STEPS)
    bundle = tiny.bundle("weighted")
    save_bundle(tmp_path / "p.safetensors", bundle.bank, bundle.layer_map)
    bridge = apply_c2c_bridge(pipe.transformer, C2CBridgeConfig(projector=str(tmp_path / "p.safetensors")),
                              sharer=sharer(), scheduler=pipe.scheduler)
    fused = tiny.run_pipe(pipe, steps=STEPS)
    remove_c2c_bridge(pipe.transformer)
    assert bridge.last_report.model_calls == 2 * STEPS and bridge.last_report.sharer_forwards == 2 * STEPS
    assert (fused - plain).abs().max() > 1e-3
    assert torch.equal(tiny.run_pipe(pipe, steps=STEPS), plain)
    remove_c2c_bridge(pipe.transformer)         # nothing left to remove: a no-op
    off = apply_c2c_bridge(pipe.transformer, C2CBridgeConfig(projector=bundle, strength=0.0), sharer=sharer())
    assert torch.equal(tiny.run_pipe(pipe, steps=STEPS), plain)
    remove_c2c_bridge(pipe.transformer)         # a run without bridge.session() closes at remove (or a restart)
    assert off.last_report.model_calls == 2 * STEPS


def test_apply_stacks_with_first_block_cache_in_either_order():
    pipe = tiny.wan_pipe(tiny.wan(1))
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.05))
    cached = tiny.run_pipe(pipe, steps=STEPS)
    bundle = tiny.bundle("weighted")
    off = apply_c2c_bridge(pipe.transformer, C2CBridgeConfig(projector=bundle, strength=0.0), sharer=sharer())
    assert torch.equal(tiny.run_pipe(pipe, steps=STEPS), cached), "strength 0 under the cache is the cache alone"
    remove_c2c_bridge(pipe.transformer)
    assert off.last_report.model_calls == 2 * STEPS
    on = apply_c2c_bridge(pipe.transformer, C2CBridgeConfig(projector=bundle), sharer=sharer())
    fused = tiny.run_pipe(pipe, steps=STEPS)
    remove_c2c_bridge(pipe.transformer)
    assert torch.isfinite(fused).all() and (fused - cached).abs().max() > 1e-3 and on.last_report.sharer_forwards > 0
    assert torch.equal(tiny.run_pipe(pipe, steps=STEPS), cached)

    fresh = tiny.wan_pipe(tiny.wan(1))                   # the bridge first, the cache on top
    apply_c2c_bridge(fresh.transformer, C2CBridgeConfig(projector=bundle), sharer=sharer())
    apply_first_block_cache(fresh.transformer, FirstBlockCacheConfig(threshold=0.05))
    assert torch.equal(tiny.run_pipe(fresh, steps=STEPS), fused)


def test_apply_on_a_pipeline_survives_model_cpu_offload():
    pipe = tiny.wan_pipe(tiny.wan(1))
    plain = tiny.run_pipe(pipe, steps=2)
    pipe.enable_model_cpu_offload(device="cpu")
    bridge = apply_c2c_bridge(pipe, C2CBridgeConfig(projector=tiny.bundle("weighted")), sharer=sharer())
    for _ in range(2):      # diffusers re-creates accelerate's hooks after every call
        fused = tiny.run_pipe(pipe, steps=2)
        assert not torch.equal(fused, plain)
    remove_c2c_bridge(pipe)
    assert bridge.last_report.model_calls == 4 and bridge.last_report.sharer_forwards == 4, "the second run fused"
    assert torch.equal(tiny.run_pipe(pipe, steps=2), plain)
    with pytest.raises(BridgeSetupError, match=r"carries accelerate hooks .* Attach to the pipeline instead"):
        apply_c2c_bridge(pipe.transformer, C2CBridgeConfig(projector=tiny.bundle("weighted")), sharer=sharer())


def test_apply_refuses_a_wrong_config_or_strength():
    transformer = tiny.wan(1)
    with pytest.raises(BridgeSetupError, match=r"^apply_c2c_bridge\(module, config, sharer=…\): config is a dict; "
                                               r"expected a C2CBridgeConfig\.$"):
        apply_c2c_bridge(transformer, {"projector": None}, sharer=sharer())
    with pytest.raises(BridgeSetupError, match=r"^C2CBridgeConfig\.strength=3\.0; expected a number from 0 to 2\.0\. "
                                               r"Pass a value in that range\.$"):
        apply_c2c_bridge(transformer, C2CBridgeConfig(projector=tiny.bundle(), strength=3.0), sharer=sharer())


def test_apply_stacks_with_group_offloading():
    from diffusers.hooks import apply_group_offloading
    pipe = tiny.wan_pipe(tiny.wan(1))
    plain = tiny.run_pipe(pipe, steps=2)
    apply_group_offloading(pipe.transformer, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1)
    assert torch.equal(tiny.run_pipe(pipe, steps=2), plain)
    bundle = tiny.bundle("weighted")
    off = apply_c2c_bridge(pipe.transformer, C2CBridgeConfig(projector=bundle, strength=0.0), sharer=sharer())
    assert torch.equal(tiny.run_pipe(pipe, steps=2), plain)
    remove_c2c_bridge(pipe.transformer)
    assert off.last_report.model_calls == 4
    on = apply_c2c_bridge(pipe.transformer, C2CBridgeConfig(projector=bundle), sharer=sharer())
    fused = tiny.run_pipe(pipe, steps=2)
    remove_c2c_bridge(pipe.transformer)
    assert on.last_report.sharer_forwards == 4 and (fused - plain).abs().max() > 1e-3
    assert torch.equal(tiny.run_pipe(pipe, steps=2), plain)
