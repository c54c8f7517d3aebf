"""Every guest_memfd uAPI case of the table, for real on /dev/kvm."""

from __future__ import annotations

import dataclasses
import errno

import pytest

from host_stack.gmem_uapi_cases import (
    CASES,
    HOST_REQUIREMENTS,
    KnownErrno,
    Outcome,
    UapiCase,
    case_by_id,
    judge_outcome,
    run_case,
)
from host_stack.kvm import KvmSystem

# The live cases need guest_memfd; the judge itself is tested below on recorded answers, everywhere.
live = [pytest.mark.kvm, pytest.mark.host_requires(*HOST_REQUIREMENTS)]


@pytest.mark.usefixtures("no_fd_leak")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@live[0]
@live[1]
def test_case(kvm_system: KvmSystem, case: UapiCase) -> None:
    result = run_case(case, kvm_system)
    if result.status == "not_applicable":
        pytest.skip(result.message)
    # A documented errno of another kernel is a finding (carried, listed), not a failure.
    assert result.status in ("pass", "finding"), result.message
    if result.status == "finding":
        (finding,) = result.findings
        assert finding.id == f"uapi-errno-{case.id}" and finding.evidence["documented_on"], finding
        assert result.actual_errno in {a.errno for a in case.alternatives}, result.message


@live[0]
@live[1]
def test_a_wrong_expectation_fails_with_expected_and_actual(kvm_system: KvmSystem) -> None:
    # The runner must be able to fail: the same action with a wrong expected errno.
    real = case_by_id("create.size_unaligned")
    wrong = UapiCase(real.id, real.description, errno.EEXIST, "kernel", real.basis, real.action)
    result = run_case(wrong, kvm_system)
    assert result.status == "fail"
    assert "expected EEXIST" in result.message and "got EINVAL" in result.message


@live[0]
@live[1]
def test_a_documented_alternative_is_a_finding_with_both_kernels(kvm_system: KvmSystem) -> None:
    real = case_by_id("create.size_unaligned")
    alt = dataclasses.replace(
        real, expected_errno=errno.EEXIST, kernels="kernel A",
        alternatives=(KnownErrno(errno.EINVAL, "kernel B", "read in some source"),),
    )  # fmt: skip
    result = run_case(alt, kvm_system)
    assert result.status == "finding", result.message
    assert result.ok and result.to_json()["findings"][0]["id"] == "uapi-errno-create.size_unaligned"
    for text in ("expected EEXIST", "kernel A", "got EINVAL", "kernel B", "read in some source"):
        assert text in result.message, f"expected {text!r} in {result.message!r}"


# --- the judge on recorded kernel answers (every host, guest_memfd or not) ---------------------


def test_a_wrong_expectation_fails_on_a_recorded_answer() -> None:
    real = case_by_id("create.size_unaligned")
    wrong = dataclasses.replace(real, expected_errno=errno.EEXIST)
    result = judge_outcome(wrong, Outcome(errno.EINVAL))  # what 6.18 PVM and 7.3.4 answered
    assert result.status == "fail" and not result.ok
    assert "expected EEXIST" in result.message and "got EINVAL" in result.message, result.message


def test_a_recorded_alternative_is_a_finding_with_both_kernels() -> None:
    real = case_by_id("create.size_unaligned")
    alt = dataclasses.replace(
        real, expected_errno=errno.EEXIST, kernels="kernel A",
        alternatives=(KnownErrno(errno.EINVAL, "kernel B", "read in some source"),),
    )  # fmt: skip
    result = judge_outcome(alt, Outcome(errno.EINVAL))
    assert result.status == "finding" and result.ok, result.message
    assert result.to_json()["findings"][0]["id"] == "uapi-errno-create.size_unaligned"


def test_enotty_from_a_host_that_claims_guest_memfd_fails() -> None:
    """The table never turns the answer of the case under test into "cannot run": ENOTTY fails."""
    result = judge_outcome(case_by_id("create.ok"), Outcome(errno.ENOTTY))
    assert result.status == "fail", result.message
    assert "expected success" in result.message and "got ENOTTY" in result.message, result.message


def test_an_undocumented_errno_fails_and_names_the_documented_ones() -> None:
    case = dataclasses.replace(
        case_by_id("bind.same_range_twice"), alternatives=(KnownErrno(errno.EINVAL, "kernel B", "x"),)
    )
    result = judge_outcome(case, Outcome(errno.EPERM))
    assert result.status == "fail" and not result.findings
    assert "got EPERM" in result.message and "EINVAL (Invalid argument) is documented on kernel B" in result.message


def test_the_right_errno_with_a_failed_extra_check_fails() -> None:
    case = case_by_id("mmap.punch_live")
    result = judge_outcome(case, Outcome(0, ["page 5: expected 0x0, got 0x1"]))
    assert result.status == "fail" and "page 5" in result.message


def test_unknown_case_id_lists_known_ids() -> None:
    with pytest.raises(KeyError, match=r"create\.ok"):
        case_by_id("nope")
