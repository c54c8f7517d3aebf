"""Every guest_memfd uAPI case of the table, for real on /dev/kvm."""

from __future__ import annotations

import dataclasses
import errno

import pytest

from host_stack.gmem_uapi_cases import (
    CASES,
    HOST_REQUIREMENTS,
    TABLE_NAME,
    KnownErrno,
    Outcome,
    UapiCase,
    case_by_id,
    judge_outcome,
    run_case,
    run_table,
)
from host_stack.kvm import KvmSystem
from outcome import Verdict

# The live cases need guest_memfd; the judge itself is tested below on recorded answers, everywhere.
live = [pytest.mark.kvm, pytest.mark.host_requires(*HOST_REQUIREMENTS)]


@pytest.mark.usefixtures("no_fd_leak")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@live[0]
@live[1]
def test_case(kvm_system: KvmSystem, case: UapiCase) -> None:
    verdict = run_case(case, kvm_system)
    if verdict.status == "CANNOT RUN":
        pytest.skip(str(verdict.reason))
    # A documented errno of another kernel passes and carries a finding (listed, never hidden).
    assert verdict.status == "PASS", verdict.summary()
    for finding in verdict.findings:
        assert finding.id == f"uapi-errno-{case.id}" and finding.evidence["documented_on"], finding
        assert verdict.evidence["actual_errno"] in {a.errno for a in case.alternatives}, verdict.summary()


@live[0]
@live[1]
@pytest.mark.usefixtures("no_fd_leak")
def test_the_table_is_one_verdict_of_every_case(kvm_system: KvmSystem) -> None:
    table = run_table(kvm_system)
    assert (table.scenario, table.status) == (TABLE_NAME, "PASS"), table.summary()
    idle = table.evidence.get("did_not_run", {})
    ran = {c.name.split(":", 1)[0] for c in table.checks}
    assert ran | set(idle) == {c.id for c in CASES} and not ran & set(idle), (ran, idle)
    assert all(why.startswith("CANNOT RUN: ") for why in idle.values()), idle


@live[0]
@live[1]
def test_a_wrong_expectation_fails_with_expected_and_actual(kvm_system: KvmSystem) -> None:
    # The runner must be able to fail: the same action with a wrong expected errno.
    real = case_by_id("create.size_unaligned")
    wrong = UapiCase(real.id, real.description, errno.EEXIST, "kernel", real.basis, real.action)
    verdict = run_case(wrong, kvm_system)
    (check,) = verdict.failures
    assert verdict.status == "FAIL"
    assert check.expected.startswith("EEXIST") and check.actual.startswith("EINVAL"), check.line()


@live[0]
@live[1]
def test_a_documented_alternative_is_a_finding_with_both_kernels(kvm_system: KvmSystem) -> None:
    real = case_by_id("create.size_unaligned")
    alt = dataclasses.replace(
        real, expected_errno=errno.EEXIST, kernels="kernel A",
        alternatives=(KnownErrno(errno.EINVAL, "kernel B", "read in some source"),),
    )  # fmt: skip
    verdict = run_case(alt, kvm_system)
    assert verdict.status == "PASS", verdict.summary()
    (finding,) = verdict.findings
    assert finding.id == "uapi-errno-create.size_unaligned"
    for text in ("expected EEXIST", "kernel A", "got EINVAL", "kernel B", "read in some source"):
        assert text in finding.text, f"expected {text!r} in {finding.text!r}"


# --- the judge on recorded kernel answers (every host, guest_memfd or not) ---------------------


def test_a_wrong_expectation_fails_on_a_recorded_answer() -> None:
    real = case_by_id("create.size_unaligned")
    wrong = dataclasses.replace(real, expected_errno=errno.EEXIST)
    verdict = judge_outcome(wrong, Outcome(errno.EINVAL))  # what 6.18 PVM and 7.3.4 answered
    assert verdict.status == "FAIL" and not verdict.passed
    (check,) = verdict.failures
    assert check.line() == (f"FAIL {wrong.description} [kernel]: expected EEXIST (File exists) (known on "
                            f"{wrong.kernels}), actual EINVAL (Invalid argument)"), check.line()


def test_a_recorded_alternative_is_a_finding_with_both_kernels() -> None:
    real = case_by_id("create.size_unaligned")
    alt = dataclasses.replace(
        real, expected_errno=errno.EEXIST, kernels="kernel A",
        alternatives=(KnownErrno(errno.EINVAL, "kernel B", "read in some source"),),
    )  # fmt: skip
    verdict = judge_outcome(alt, Outcome(errno.EINVAL))
    assert verdict.status == "PASS", verdict.summary()
    assert "the documented answer of kernel B (read in some source)" in verdict.checks[0].actual
    assert verdict.to_dict()["findings"][0]["id"] == "uapi-errno-create.size_unaligned"


def test_enotty_from_a_host_that_claims_guest_memfd_fails() -> None:
    """The table never turns the answer of the case under test into "cannot run": ENOTTY fails."""
    verdict = judge_outcome(case_by_id("create.ok"), Outcome(errno.ENOTTY))
    assert verdict.status == "FAIL", verdict.summary()
    (check,) = verdict.failures
    assert check.expected.startswith("success") and check.actual.startswith("ENOTTY"), check.line()


def test_an_undocumented_errno_fails_and_names_the_documented_ones() -> None:
    case = dataclasses.replace(
        case_by_id("bind.same_range_twice"), alternatives=(KnownErrno(errno.EINVAL, "kernel B", "x"),)
    )
    verdict = judge_outcome(case, Outcome(errno.EPERM))
    assert verdict.status == "FAIL" and not verdict.findings
    (check,) = verdict.failures
    assert check.actual == "EPERM (Operation not permitted); EINVAL (Invalid argument) is documented on kernel B"


def test_the_right_errno_with_a_failed_extra_check_fails() -> None:
    case = case_by_id("mmap.punch_live")
    verdict = judge_outcome(case, Outcome(0, ["page 5: expected 0x0, got 0x1"]))
    assert verdict.status == "FAIL"
    assert [c.actual for c in verdict.failures] == ["page 5: expected 0x0, got 0x1"]


def test_a_table_of_recorded_verdicts_folds_into_one() -> None:
    """How run_table folds: a failed case fails the table, a case that cannot run is evidence."""
    passed = judge_outcome(case_by_id("create.ok"), Outcome(0))
    failed = judge_outcome(case_by_id("create.size_zero"), Outcome(0))
    idle = Verdict.did_not_run("mmap.ok", "CANNOT RUN", "needs guest_memfd flags 0x1, KVM_CAP_GUEST_MEMFD_FLAGS=0x0")
    table = Verdict.combine(TABLE_NAME, [passed, failed, idle])
    assert table.status == "FAIL" and [c.name.split(":")[0] for c in table.failures] == ["create.size_zero"]
    assert table.evidence["did_not_run"] == {"mmap.ok": f"CANNOT RUN: {idle.reason}"}
    assert Verdict.combine(TABLE_NAME, [idle]).status == "CANNOT RUN"


def test_unknown_case_id_lists_known_ids() -> None:
    with pytest.raises(KeyError, match=r"create\.ok"):
        case_by_id("nope")
