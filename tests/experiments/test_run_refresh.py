"""experiments/run_refresh.py still runs: its dry run (untrained tiny pairs, 2 videos, 4 steps) in process, once,
the schedules it samples run the sharer where they say (read from the bridge's own refresh report), and --only
samples the rows it names again and keeps the others."""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow      # ~15 s of CPU on the 2-core machine (ComfyUI boot included)

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
if str(EXPERIMENTS) not in sys.path:
    sys.path.append(str(EXPERIMENTS))       # run_refresh imports its sibling modules by file name, as a script does

import run_refresh  # noqa: E402


def dry(out: Path, report: str, *argv) -> dict:
    """run_refresh's dry run in this process, quietly, into ``out`` (it sets torch to one thread: restored)."""
    import torch
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return run_refresh.main(["--dry-run", *argv, "--out", str(out), "--results", str(out / report),
                                     "--bench", str(out / "no_bench.json")])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dry_run(comfy, tmp_path_factory):
    from bridge_helpers import pack_nodes
    pack_nodes()                            # the pack as the suite loads it; the script uses this host
    out = tmp_path_factory.mktemp("refresh")
    data = dry(out, "REFRESH.md", "--pairs", "still,rule")
    return data, (out / "REFRESH.md").read_text(encoding="utf-8"), out


def runs_of(data, pair):
    return next(p for p in data["pairs"] if p["pair"] == pair)["runs"]


def test_dry_run_samples_every_planned_schedule_on_both_miniatures(dry_run):
    data, report, _ = dry_run
    assert data["dry_run"] and data["steps"] == 4
    assert [p["pair"] for p in data["pairs"]] == ["still", "rule"]      # denoise samples as rule does
    planned = [s.name for s in run_refresh.plan(signals=("input",), thresholds={"input": (0.2,)}, budgets=(2,),
                                                every=(2,), windows=((0.5, 1.0),), switch=(2,), steps=4)]
    for pair in data["pairs"]:
        names = list(pair["runs"])
        assert names[:len(planned)] == planned
        assert names[len(planned):] == [f"best placement of {n}" for n in (1, 2, 3)]
        assert f"## {pair['pair']}" in report
        for name, run in pair["runs"].items():
            assert len(run["quality"]) == 2 and run["cpu_seconds"] > 0, name
    assert "Dry run" in report


def test_schedules_run_the_sharer_where_they_say(dry_run):
    data, _, _ = dry_run
    for pair in ("still", "rule"):
        runs = runs_of(data, pair)
        steps = {name: run["sharer_steps"][0] for name, run in runs.items()}
        assert steps["refresh 1"] == [0, 1, 2, 3] and steps["every 2"] == [0, 2]
        assert steps["receiver alone"] == [] and runs["receiver alone"]["mean_forwards"] == 0
        assert runs["switch at 2"]["mean_forwards"] == 2                   # the sharer's own two steps, no fusion
        assert steps["switch at 2 + fusion"] == [0] and runs["switch at 2 + fusion"]["mean_forwards"] == 3
        assert len(steps["budget 2 input"]) <= 2
        placements = next(p for p in data["pairs"] if p["pair"] == pair)["placements"]
        for n, placement in placements.items():
            assert len(placement["steps"]) == int(n) and placement["steps"][0] == 0
            assert steps[f"best placement of {n}"] == placement["steps"]       # the fixed tracker runs exactly there


def test_gain_kept_is_measured_against_refresh_1(dry_run):
    data, _, _ = dry_run
    for pair in ("still", "rule"):
        runs = runs_of(data, pair)
        assert runs["refresh 1"]["gain_kept"] == pytest.approx(1.0)
        assert runs["receiver alone"]["gain_kept"] == pytest.approx(0.0)


def test_only_samples_the_named_rows_again_and_keeps_the_rest(dry_run):
    data, _, out = dry_run
    again = dry(out, "AGAIN.md", "--pairs", "rule", "--only", "budget")
    assert [p["pair"] for p in again["pairs"]] == ["still", "rule"]      # the other pair is kept
    before, after = runs_of(data, "rule"), runs_of(again, "rule")
    assert next(p for p in again["pairs"] if p["pair"] == "rule")["reruns"][-1]["rows"] == \
        ["receiver alone", "budget 2 input"]
    assert list(after) == list(before)                                          # same rows, same order
    for name in before:
        if name not in ("receiver alone", "budget 2 input"):
            assert after[name] == json.loads(json.dumps(before[name])), name      # kept as they were
    assert after["budget 2 input"]["quality"] == before["budget 2 input"]["quality"]   # sampled again: same seeds
    assert after["budget 2 input"]["cpu_seconds"] != before["budget 2 input"]["cpu_seconds"]
    assert "Rows sampled again by `python experiments/run_refresh.py --dry-run --pairs rule --only budget" in \
        (out / "AGAIN.md").read_text(encoding="utf-8")


def test_only_without_an_earlier_run_says_what_to_run_first(tmp_path):
    with pytest.raises(SystemExit, match="has no results for 'rule': run `python experiments/run_refresh.py "
                                         "--pairs rule --merge` first"):
        dry(tmp_path, "R.md", "--pairs", "rule", "--only", "budget")
