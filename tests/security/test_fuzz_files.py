"""≥ 10,000 mutated real bundles and recordings end in the loaders' documented exceptions.

The fuzzer runs in a fresh interpreter (fuzz_files.py) so its peak resident memory measures only
the loading: every file is a few kilobytes, so anything beyond a small bound is an allocation the
file does not justify (the 1 PB ``hidden_dim`` kind). Every mutation class hits every source file
(three bundle kinds, two recording dtypes) in turn: at least CASES/60 times each, asserted per class and file.

``C2C_FUZZ_CASES`` sets the number of cases: 10,000 by default (what CI runs, ~20 s of CPU); more for a
long run (``C2C_FUZZ_CASES=200000``), fewer for a quick local check (the per-class bound scales with it).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow      # 10 000 fuzzed files

FUZZER = Path(__file__).with_name("fuzz_files.py")
CASES = int(os.environ.get("C2C_FUZZ_CASES", "10000"))
#: peak RSS growth allowed over the fuzzer's own baseline (torch, hypothesis and the sources loaded)
RSS_BOUND_MB = 100


def test_ten_thousand_mutated_files_end_in_documented_errors_within_a_memory_bound():
    done = subprocess.run([sys.executable, str(FUZZER), str(CASES)], capture_output=True, text=True,
                          timeout=max(600, CASES // 10))
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["cases"] >= CASES
    pairs = {f"{how}@{source}" for how in report["mutations"] for source in report["sources"]}
    assert len(report["mutations"]) == 8 and len(report["sources"]) == 5, report
    thin = {p: report["per_class"].get(p, 0) for p in pairs if report["per_class"].get(p, 0) < max(1, CASES // 60)}
    assert not thin, f"mutation classes that hit a source file too rarely: {thin}"
    loaded = sum(n for k, n in report["outcomes"].items() if k.endswith(":loaded"))
    refused = report["cases"] - loaded
    assert loaded > 0 and refused > 0.8 * report["cases"], report["outcomes"]
    assert report["outcomes"].get("data:NonFiniteWeightsError", 0) > 0
    assert report["peak_rss_mb"] - report["baseline_rss_mb"] < RSS_BOUND_MB, report
    assert report["slowest_s"] < 2.0, report  # a refusal never builds what a header merely claims
