"""benchmarks/bench_bridge.py still runs, and measures what its tables claim: the smoke shape end to end in
process (a few seconds), plus the timing harness's round order and paired ratios on a stand-in clock."""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow      # ~15 s of CPU on the 2-core machine (ComfyUI boot included)

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))        # bench_bridge imports bench_setup by file name, as a script does

import bench_bridge  # noqa: E402


class Clock:
    """A stand-in for Bench's timer: a timed run takes the seconds its table gives for the current round."""

    clock = "cpu"

    def __init__(self, seconds):
        self.seconds, self.timed_runs, self.order = seconds, 0, []

    def run(self, name):
        return lambda: self.order.append(name)

    def timed(self, fn, wall_too=False):
        fn()
        s = self.seconds[self.order[-1]][self.timed_runs // len(self.seconds)]
        self.timed_runs += 1
        return (s, None, s) if wall_too else (s, None)


def test_rounds_warm_up_rotate_and_pair_each_run_with_the_receiver_of_its_round():
    seconds = {"receiver alone": [1.0, 2.0, 4.0], "sharer alone": [1.0, 1.0, 1.0], "bridged": [1.5, 2.6, 4.4]}
    clock = Clock(seconds)
    times = bench_bridge.interleaved(clock, {n: clock.run(n) for n in seconds}, rounds=3, warmup=1)
    names, order = list(seconds), clock.order
    assert order[:3] == names                                       # the warm-up round, untimed
    assert order[3:6] == names and order[6:9] == names[1:] + names[:1] and order[9:] == names[2:] + names[:2]
    assert clock.timed_runs == 9
    assert times["bridged"]["seconds"] == [1.5, 2.6, 4.4]
    ratio = bench_bridge.paired(times, "bridged", "receiver alone")
    assert ratio["all"] == pytest.approx([1.5, 1.3, 1.1])           # per round, not median ÷ median (1.3)
    assert (ratio["median"], ratio["min"], ratio["max"]) == pytest.approx((1.3, 1.1, 1.5))
    both = bench_bridge.paired(times, "bridged", "receiver alone", "sharer alone")
    assert both["all"] == pytest.approx([0.75, 2.6 / 3, 4.4 / 5])


def test_c2c_standing_is_stated_for_every_shape_and_the_default_width_meets_both_targets():
    rows = bench_bridge.c2c_standing()
    assert list(rows) == list(bench_bridge.C2C_SHAPES)
    fixed = [r["fixed_512"]["fraction_of_block"] for r in rows.values()]
    assert fixed == sorted(fixed, reverse=True)           # a fixed width falls behind the block as the model grows
    assert not rows["dim 512, 32 tokens (the earlier CPU runs)"]["fixed_512"]["meets_1_15"]
    assert not rows["dim 1024, 256 tokens (this CPU benchmark)"]["fixed_512"]["reuse_within_5_percent"]
    assert [r["default"]["hidden"] for r in rows.values()] == [64, 128, 192, 512]
    for name, r in rows.items():                          # the default scales: both targets at every shape
        assert r["default"]["meets_1_15"] and r["default"]["reuse_within_5_percent"], name
        assert r["default"]["fraction_of_block"] <= r["fixed_512"]["fraction_of_block"], name


@pytest.fixture(scope="module")
def smoke(comfy, tmp_path_factory):
    """The smoke shape once for the module: its results and what it printed."""
    import torch
    threads, printed = torch.get_num_threads(), io.StringIO()
    out = tmp_path_factory.mktemp("bench")
    try:
        with contextlib.redirect_stdout(printed):
            results = bench_bridge.main(["--shape", "smoke", "--steps", "4", "--repeats", "2", "--cfg", "4",
                                         "--sweep-repeats", "1", "--threads", "1", "--out", str(out),
                                         "--policies", "every2,every4,adaptive,budget2"])
    finally:
        torch.set_num_threads(threads)
    return results, printed.getvalue(), out


def test_smoke_run_writes_its_outputs_and_tables(smoke):
    results, printed, out = smoke
    assert (out / "bench_bridge.json").is_file() and (out / "bench_bridge.png").is_file()
    ratios = results["ratios"]["4.0"]
    assert ratios["warmup_rounds"] == 1 and ratios["rounds"] == 2
    assert bench_bridge.table(ratios) in printed
    for name, times in ratios["times"].items():
        assert len(times["seconds"]) == 2 and all(s > 0 for s in times["seconds"]), name


def test_policy_rows_run_the_sharer_as_often_as_they_say(smoke):
    results, _, _ = smoke
    forwards = results["ratios"]["4.0"]["sharer_forwards"]
    policies = {name for name in forwards if name.startswith("refresh ")}
    assert policies == {f"refresh {p}, {kind}" for p in ("every 2", "every 4", "adaptive", "budget 2")
                        for kind in ("weighted", "c2c")}
    for kind in ("weighted", "c2c"):
        assert forwards[f"refresh every 2, {kind}"] == 2 and forwards[f"refresh every 4, {kind}"] == 1
        assert 1 <= forwards[f"refresh budget 2, {kind}"] <= 2
        assert 1 <= forwards[f"refresh adaptive, {kind}"] <= 4
    assert forwards["lockstep, weighted"] == 4


def test_sweep_refresh_every_4_runs_a_whole_cycle_and_replay_kv_is_measured(smoke):
    sweep = bench_bridge.SWEEP_REFRESH
    results, _, _ = smoke
    sw = results["sweep"]
    assert sw["steps"][f"refresh every {sweep}"] == sweep
    assert sw["modes"][f"refresh every {sweep}"]["sharer_forwards"] == [1] * len(sw["fused_layers"])
    lockstep = sw["modes"]["lockstep"]["captured_kv_bytes"]
    replay = sw["modes"]["replay"]["captured_kv_bytes"]
    # one fused layer's K/V of both CFG branches at a time, as lockstep holds, in the recording's bf16 (half fp32)
    assert replay == [kv // 2 for kv in lockstep]
    hosts = sw["modes"]["replay"]["replay_host_bytes"]
    assert hosts == sorted(hosts) and hosts[0] > 0        # the reader's copy of a step grows with the layers
