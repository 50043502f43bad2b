"""tests/newer_hosts.py: the host tests the newer hosts' run leaves to the pinned host, matched by node id, each
listed in docs/testing.md; a stale entry stops a whole collection (tests/conftest.py)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import newer_hosts

DOCS = Path(__file__).resolve().parents[1] / "docs" / "testing.md"
MODULE = "tests/pack/test_x.py"


def selection(pinned=None, kept=None):
    return newer_hosts.PinnedHostOnly(pinned or {}, kept or {})


def claimed(selection, nodeids):
    return [nodeid for nodeid in nodeids if selection.claims(SimpleNamespace(nodeid=nodeid))]


def test_a_module_a_test_and_a_case_each_claim_what_they_name():
    nodeids = [f"{MODULE}::test_a[1]", f"{MODULE}::test_a[2]", f"{MODULE}::test_b", "tests/pack/test_y.py::test_a"]
    assert claimed(selection({MODULE: "why"}), nodeids) == nodeids[:3]
    assert claimed(selection({f"{MODULE}::test_a": "why"}), nodeids) == nodeids[:2]
    assert claimed(selection({f"{MODULE}::test_a[2]": "why"}), nodeids) == [nodeids[1]]
    assert claimed(selection({f"{MODULE}::test_b": "why"}), nodeids) == [nodeids[2]]


def test_kept_cases_stay_on_the_newer_hosts_and_the_others_leave():
    chosen = selection(kept={f"{MODULE}::test_a": ("2", "4")})
    cases = [f"{MODULE}::test_a[{case}]" for case in "1234"]
    assert claimed(chosen, [*cases, f"{MODULE}::test_b"]) == [cases[0], cases[2]]
    chosen.check()


def test_an_entry_that_matches_nothing_is_an_error():
    chosen = selection({f"{MODULE}::test_renamed": "why"})
    claimed(chosen, [f"{MODULE}::test_a"])
    with pytest.raises(ValueError, match=r"'tests/pack/test_x.py::test_renamed' matches no test that uses a host"):
        chosen.check()


def test_a_kept_case_that_does_not_exist_is_an_error():
    chosen = selection(kept={f"{MODULE}::test_a": ("2", "4")})
    assert claimed(chosen, [f"{MODULE}::test_a[1]", f"{MODULE}::test_a[2]"]) == [f"{MODULE}::test_a[1]"]
    with pytest.raises(ValueError, match=r"'tests/pack/test_x.py::test_a' has no case '4'"):
        chosen.check()


def test_every_entry_is_listed_in_docs_testing_md():
    text = DOCS.read_text(encoding="utf-8")
    entries = [*newer_hosts.PINNED_HOST_ONLY, *newer_hosts.CASES_ON_NEWER_HOSTS]
    assert entries
    missing = [key for key in entries if f"`{key}`" not in text]
    assert not missing, f"docs/testing.md does not list {missing} under 'What runs on every host'"
