"""What the newer hosts' run leaves to the pinned host (docs/testing.md, "What runs on every host").

``make test`` runs the whole suite on the pinned ComfyUI and, on every newer one, the tests marked ``host``
(tests/conftest.py marks every test that uses a host fixture). The tests named here use a host, but the part of
their outcome a host could change is already tested on every host by the test named in the reason; they get
the marker ``pinned_host`` instead of ``host`` and run on the pinned host only. Nothing else leaves the newer
hosts: a whole ``make test`` collection fails on an entry that matches no test, or a test that uses no host.

Keys: a module path, ``path::test`` (all its cases) or ``path::test[case]`` (one case); ``CASES_ON_NEWER_HOSTS``
names the cases of a parametrised test that stay on every host instead.
"""
from __future__ import annotations

PINNED_HOST_ONLY: dict[str, str] = {
    # Developer tools that run on the pinned host by design (Makefile: `make demo` uses .host/ComfyUI); the pack
    # paths they drive run on every host in tests/pack and tests/test_host.py.
    "tests/test_demo.py": "make demo runs on the pinned host; its graph's nodes run on every host in tests/pack",
    "tests/test_demo_assets.py": "make demo's assets, trained and linked for the pinned host's demo",
    # Script plumbing (rows, tables, extrapolation, report files) around bridge runs that tests/pack runs on
    # every host.
    "tests/benchmarks/test_gpu_check.py": "the GPU check's CPU dry run; its modes run on every host in tests/pack",
    "tests/benchmarks/test_bench_bridge.py": "the benchmark's smoke run; its modes run on every host in tests/pack",
    "tests/experiments/test_run_refresh.py":
        "the refresh experiment's dry run; the refresh schedules run on every host in tests/pack/test_refresh.py",
    # No ComfyUI at all: diffusers scripts in a subprocess; the tiny_models fixture (which needs a host to make
    # missing models) only finds the files.
    "tests/diffusers/test_example.py::test_example_runs_with_tiny_models": "the diffusers example; no ComfyUI runs",
    "tests/diffusers/test_training.py::test_cli_trains_from_sample_files_and_writes_a_loadable_bundle":
        "tools/train_projector_diffusers.py; no ComfyUI runs",
    # Training plumbing around forward passes that tests/training/test_training.py trains through on every host
    # (test_kill_and_resume_gives_bit_identical_weights: resuming is bit-identical there).
    "tests/training/test_distributed.py": "torch.distributed ranks agree; the loop runs on every host in test_training",
    "tests/training/test_cli.py::test_cli_trains_writes_a_bundle_and_resumes":
        "the CLI's bundle and --resume/--restart; it boots every host in test_cli_refuses_a_folder_without_samples",
}

# Parametrised tests whose cases differ in what the pack computes (a projector kind, a storage), not in what the
# host does: every case runs on the pinned host, the cases named here on every host. "path::test" -> case ids.
CASES_ON_NEWER_HOSTS: dict[str, tuple[str, ...]] = {
    # the projector kind is c2c_core math; every CFG layout (the host's batching) stays, with the c2c projector
    "tests/pack/test_lockstep.py::test_lockstep_is_bit_identical_to_buffered_live":
        ("1.0-neg-c2c", "4.0-neg-c2c", "4.0-neg_same_length-c2c"),
    # one or all layers of the same model is the pack's layer selection; the wide sharer is another model shape
    "tests/pack/test_lockstep.py::test_lockstep_holds_one_layer_whatever_the_number_of_fused_layers":
        ("a-all", "wide-all"),
    # nearest or trilinear is c2c_core's resampling of the sharer's grid
    "tests/pack/test_chronoedit_pair.py::test_sharer_on_its_own_grid_is_resampled": ("trilinear",),
    # a RAM recording is the pack's own; the disk one lives in the host's temp folder
    "tests/pack/test_chronoedit_pair.py::test_record_then_replay_equals_live_when_trajectories_coincide": ("disk",),
    # a fixed schedule is c2c_core's; the adaptive and budget ones decide from the host's K/V changes
    "tests/diffusers/test_comfy_crosscheck.py::test_both_hosts_run_the_sharer_at_the_same_steps": ("adaptive", "budget3"),
}


class PinnedHostOnly:
    """Which host tests the tables above leave to the pinned host (``claims``), and whether every entry still
    matches a test (``check``, after a whole collection)."""

    def __init__(self, pinned: dict[str, str] = PINNED_HOST_ONLY,
                 kept: dict[str, tuple[str, ...]] = CASES_ON_NEWER_HOSTS):
        self.pinned, self.kept = pinned, kept
        self.matched: dict[str, list[str]] = {key: [] for key in [*pinned, *kept]}

    def claims(self, item) -> bool:
        """True for a host test (a collected item) that runs on the pinned host only."""
        nodeid = item.nodeid
        path, test = nodeid.split("::")[0], nodeid.split("[")[0]
        for key in (path, test, nodeid):
            if key in self.pinned:
                self.matched[key].append(nodeid)
                return True
        if test in self.kept:
            self.matched[test].append(nodeid)
            return nodeid not in {f"{test}[{case}]" for case in self.kept[test]}
        return False

    def check(self) -> None:
        """Raise ValueError for a stale entry (a renamed test, a changed case id): it would move nothing, or
        every case of a test that should keep one on the newer hosts."""
        for key, found in self.matched.items():
            if not found:
                raise ValueError(f"tests/newer_hosts.py: {key!r} matches no test that uses a host")
            absent = [case for case in self.kept.get(key, ()) if f"{key}[{case}]" not in found]
            if absent:
                raise ValueError(f"tests/newer_hosts.py: {key!r} has no case {absent[0]!r}")
