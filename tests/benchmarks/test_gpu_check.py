"""benchmarks/gpu_check.py's CPU dry run: the GPU command's code path at tiny shapes, so that the first
device minutes are not spent finding a typo. Runs in-process on the suite's CPU ComfyUI (~20 s)."""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))        # gpu_check imports bench_setup by file name, as a script does

import gpu_check  # noqa: E402

EIGHT_MINUTES = 480.0

pytestmark = pytest.mark.slow      # the dry run measures every mode of every phase


@pytest.fixture(scope="module")
def dry_run(comfy):
    """The tiny dry run, once for the module: its rows and what it printed."""
    import torch
    threads, printed = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            rows = gpu_check.main(["--device", "cpu", "--tiny", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)      # one thread for the dry run (a shared CPU), the suite's own after
    return rows, printed.getvalue()


def test_dry_run_measures_every_mode_of_every_phase(dry_run):
    rows, _ = dry_run
    expected = [(p.label, p.layers, m) for p in gpu_check.phases(True, 10) for m in p.modes]
    assert [(r.shape, r.layers, r.mode) for r in rows] == expected
    assert {m for _, _, m in expected} == set(gpu_check.MODES) | set(gpu_check.FIT_MODES)
    for row in rows:
        assert row.skipped == "", row
        assert row.seconds_per_step > 0, row
        assert row.host_ram is not None, row
        assert row.steps == (4 if row.mode == "refresh 4" else 2), row


def test_dry_run_fills_every_column_and_says_na_for_vram_on_cpu(dry_run):
    rows, printed = dry_run
    table = gpu_check.table(rows)
    assert table in printed
    lines = table.splitlines()
    assert lines[0] == "| " + " | ".join(gpu_check.COLUMNS) + " |"
    columns = list(zip(*[[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]))
    named = dict(zip(gpu_check.COLUMNS, columns))
    assert set(named["VRAM allocated peak (GB)"]) == {"n/a"} == set(named["VRAM reserved peak (GB)"])
    assert all(float(cell) >= 0 for cell in named["host RAM peak (GB)"])
    assert {cell for cell in named["weights on device"]} == {"100%", "unloaded after the run"}
    depth = named["s/step at full depth"]
    assert any("extrapolated ×4/2" in cell for cell in depth) and any("(measured)" in cell for cell in depth)
    assert any("--reserve-vram" in cell for cell in named["note"])
    for name, cells in named.items():
        assert any(cells), f"column {name!r} is empty in every row"


def test_dry_run_extrapolates_to_full_depth_by_layer_count(dry_run):
    rows, _ = dry_run
    for row in rows:
        assert row.full_depth_seconds == pytest.approx(row.seconds_per_step * row.full_layers / row.layers)


def test_dry_run_prints_the_device_the_h100_estimate_and_the_fit_answer(dry_run):
    _, printed = dry_run
    assert "device: cpu" in printed
    assert "expected for --device cuda on one H100" in printed and "in all" in printed
    assert "fits fully loaded" in printed and "partial loading as on a 48 GB card" in printed


def test_gpu_command_is_expected_to_fit_eight_minutes_with_margin(comfy):
    args = gpu_check.parse(["--device", "cuda"])
    total = sum(seconds for _, seconds in gpu_check.plan(gpu_check.phases(False, args.layers_14b), args.steps))
    assert total <= 0.75 * EIGHT_MINUTES
    assert total < args.budget_s < EIGHT_MINUTES


def test_an_exhausted_budget_skips_every_phase_with_a_row_saying_so(comfy, capsys):
    rows = gpu_check.main(["--device", "cpu", "--tiny", "--threads", "0", "--budget-s", "0"])     # no model drawn
    assert len(rows) == sum(len(p.modes) for p in gpu_check.phases(True, 10))
    assert {r.skipped for r in rows} == {"skipped: time budget"}
    assert "| skipped: time budget |" in capsys.readouterr().out


def test_budget_scales_what_is_left_by_how_slow_the_check_has_run():
    now = [0.0]
    budget = gpu_check.Budget(100.0, clock=lambda: now[0])
    assert budget.allows(100.0) and not budget.allows(101.0)
    now[0] = 40.0
    budget.done(expected=20.0, took=40.0)           # twice as slow as expected so far
    assert budget.slowness() == 2.0
    assert budget.allows(30.0) and not budget.allows(31.0)
    budget.done(expected=100.0, took=10.0)          # faster than expected never shrinks the estimates
    assert budget.slowness() == 1.0


@pytest.fixture(scope="module")
def tiny_pair(comfy):
    return gpu_check.Pair(gpu_check.phases(True, 10)[0], "cpu", "weighted")


def test_the_watchdogs_interrupt_ends_a_running_mode_as_a_skipped_row(tiny_pair):
    import comfy.model_management as mm
    mm.interrupt_current_processing(True)           # what Budget.arm's timer does at the limit
    try:
        row = gpu_check.measure(tiny_pair, "receiver alone", 2, gpu_check.Device("cpu"))
    finally:
        mm.interrupt_current_processing(False)
    assert row.skipped == "skipped: time budget (interrupted at the limit)"
    assert row.seconds_per_step is None and row.host_ram is not None


def test_a_failing_mode_becomes_a_failed_row_and_the_check_goes_on(tiny_pair, capsys):
    row = gpu_check.measure(tiny_pair, "no such mode", 2, gpu_check.Device("cpu"))
    assert row.skipped == "failed: ValueError: unknown mode 'no such mode'"
    assert "Traceback" in capsys.readouterr().err
    assert gpu_check.measure(tiny_pair, "receiver alone", 2, gpu_check.Device("cpu")).seconds_per_step > 0


def test_replay_without_a_recording_of_its_length_is_skipped_not_failed(tiny_pair):
    row = gpu_check.measure(tiny_pair, "replay", 2, gpu_check.Device("cpu"))
    assert row.skipped == "skipped: no recording (record did not run)"


def test_the_check_refuses_to_start_without_greenlet(monkeypatch):
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None if name == "greenlet" else real(name))
    with pytest.raises(SystemExit, match="greenlet is missing"):
        gpu_check.main(["--device", "cpu", "--tiny"])


def test_a_phase_whose_models_cannot_be_made_fails_its_rows_and_the_check_goes_on(comfy, monkeypatch):
    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory\ndetails")
    monkeypatch.setattr(gpu_check, "Pair", out_of_memory)
    phase = gpu_check.phases(True, 10)[0]
    args = gpu_check.parse(["--device", "cpu", "--tiny"])
    rows = gpu_check.run_phase(phase, args, gpu_check.Device("cpu"), gpu_check.Budget(60.0))
    assert [r.mode for r in rows] == list(phase.modes)
    assert {r.skipped for r in rows} == {"failed: drawing the models: RuntimeError: CUDA out of memory"}
