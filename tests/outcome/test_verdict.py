"""The one outcome shape: status vocabulary, JSON round trip, and its place at the bottom."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from outcome import NOT_RUN, STATUSES, Check, Finding, Verdict

OK = Check("si_addr_lsb", "12", "12", True, "guest")
BAD = Check("si_addr_lsb", "21", "12", False, "host")


def test_status_follows_the_checks_and_a_reason_stands_alone() -> None:
    assert Verdict("row", (OK,)).status == "PASS"
    assert Verdict("row", (OK, BAD)).status == "FAIL"
    assert Verdict("row").status == "FAIL", "no check at all is never a pass"
    cannot = Verdict.did_not_run("row", "CANNOT RUN", "unmet host requirement hwpoison: no memory failure")
    assert (cannot.status, cannot.passed) == ("CANNOT RUN", False)
    assert cannot.summary() == "row: CANNOT RUN: unmet host requirement hwpoison: no memory failure"
    assert set(STATUSES) == {"PASS", "FAIL", *NOT_RUN}


def test_a_finding_rides_on_a_pass_and_a_warning_shows_in_the_summary() -> None:
    finding = Finding("uapi-errno-x", "divergence", "EEXIST on 7.3.4, EINVAL here")
    v = Verdict("table", (OK,), findings=(finding,), warnings=("pfn 0x1234 left poisoned",))
    assert v.status == "PASS"
    assert "WARNING pfn 0x1234 left poisoned" in v.summary()


@pytest.mark.parametrize("verdict", [
    Verdict("row", (OK, BAD), setup={"qemu": "10.0.2"}, findings=(Finding("f", "info", "t", {"k": 1}),),
            warnings=("w",)),
    Verdict.did_not_run("row", "NOT MEANINGFUL", "served from userspace_addr"),
    Verdict("row", (OK,)),
], ids=["fail-with-everything", "not-meaningful", "pass"])
def test_json_round_trip(verdict: Verdict) -> None:
    again = Verdict.from_json(verdict.to_json())
    assert again == verdict and again.setup == verdict.setup and again.status == verdict.status


def test_a_reason_without_a_status_and_a_bad_status_are_refused() -> None:
    with pytest.raises(ValueError, match="needs a reason"):
        Verdict("row", reason="why")
    with pytest.raises(ValueError, match="none of CANNOT RUN, NOT MEANINGFUL, ERROR"):
        Verdict("row", not_run="SKIP", reason="why")  # type: ignore[arg-type]


def test_outcome_imports_no_other_package_of_the_project() -> None:
    project = {"gmemtest", "guests", "host_stack", "images", "qmp_helpers"}
    root = Path(__file__).resolve().parents[2] / "outcome"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & project, f"{path.name} imports {names}"
