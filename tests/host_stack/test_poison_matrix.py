"""The shared-gmem poison matrix: predictions, verdicts on recorded rows, and the live run.

Recorded observations use the matrix's layout (file index 9 behind slot 2 of the default
layout: base gfn 0x40, pgoff 8 -> gfn 0x41, gpa 0x41000). The live run needs memory failure;
where the host lacks it, it must cancel with the capability probe's own sentence.
"""

from __future__ import annotations

import dataclasses
import errno

import pytest

from host_stack import kvm_uapi as u
from host_stack import live_child as lc
from host_stack import matrix_oracle as mo
from host_stack import mm_uapi as m
from host_stack import poison_matrix as pm
from host_stack import seed_oracle as so
from host_stack.capabilities import HostReport
from host_stack.vmm import DEFAULT_LAYOUT
from host_stack.witness import SigbusRecord
from outcome import Check, Verdict

SLOT_HVA = {1: 0x7F0000000000, 2: 0x7F0000100000, 3: 0x7F0000200000}
GMEM_MAP = 0x7F1000000000
HVA = GMEM_MAP + 9 * 0x1000
EXP = so.SeedExpectation.from_layout(DEFAULT_LAYOUT, 9, SLOT_HVA, GMEM_MAP)
AR, AO = m.BUS_MCEERR_AR, m.BUS_MCEERR_AO
TID = 7  # the vCPU thread of the recorded rows
FAULT = so.GuestAccessObservation(u.EHWPOISON, u.KVM_EXIT_MEMORY_FAULT, so.MemoryFaultSeen(0x41000, 4096, 0), (), TID)


def _sig(code: int, addr: int, lsb: int, tid: int = TID) -> SigbusRecord:
    """A SIGBUS as the witness records it (pid, errno and times fixed: the judges ignore them)."""
    return SigbusRecord(5, tid, m.SIGBUS, code, 0, addr, lsb, 1_000_000, 1_700_000_000_000_000_000)


def _obs(row: mo.MatrixRow, injection: tuple[SigbusRecord, ...] = (), **kw: object) -> mo.RowObservation:
    base = mo.RowObservation(
        hva=HVA if row.mapped else None,
        pfn=0x1234,
        injection_signals=injection,
        poisoned=True,
        hardware_corrupted_kib=(0, 4),
        call_errno=errno.EBUSY,
        guest=FAULT,
        user_signals=(_sig(AR, HVA, 12),) if row.mapped else (),
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_the_table_holds_every_variant_once() -> None:
    ids = [r.id for r in mo.ROWS]
    assert len(ids) == 16 == len(set(ids))
    assert mo.row_by_id("corrupt-pfn.early.mapped.dirty") == mo.MatrixRow("corrupt-pfn", "early", True, True)
    with pytest.raises(KeyError, match=r"madvise\.early\.mapped\.dirty"):
        mo.row_by_id("nope")


@pytest.mark.parametrize(
    ("row_id", "kill_mappers", "delayed"),
    [
        ("madvise.early.mapped.dirty", AR, None),
        ("madvise.late.mapped.dirty", AR, None),  # the caller is collected whatever its policy
        ("madvise.early.mapped.clean", None, None),
        ("madvise.early.unmapped.dirty", None, None),
        ("corrupt-pfn.early.mapped.dirty", AO, None),
        ("corrupt-pfn.late.mapped.dirty", None, None),
        ("corrupt-pfn.early.mapped.clean", None, None),
        ("corrupt-pfn.early.unmapped.dirty", None, None),
    ],
)
def test_predictions_per_contract(row_id: str, kill_mappers: int | None, delayed: int | None) -> None:
    row = mo.row_by_id(row_id)
    got = (mo.predict(row, "kill_mappers").injection_signal, mo.predict(row, "delayed").injection_signal)
    assert got == (kill_mappers, delayed), f"{row_id}: expected {(kill_mappers, delayed)}, got {got}"
    touch = AR if row.mapped else None
    assert mo.predict(row, "kill_mappers").user_touch_signal == touch == mo.predict(row, "delayed").user_touch_signal


def _judged(row: mo.MatrixRow, obs: mo.RowObservation) -> tuple[tuple[str, ...], list[str]]:
    """(matches, failed check lines) of a row judged on recorded observations."""
    verdict = mo.judge_row(row, EXP, obs)
    return tuple(verdict.evidence["matches"]), [c.line() for c in verdict.failures]


def test_an_ar_at_injection_is_kill_mappers_only() -> None:
    row = mo.row_by_id("madvise.late.mapped.dirty")
    assert _judged(row, _obs(row, (_sig(AR, HVA, 12),))) == (("kill_mappers",), [])


def test_no_signal_for_a_dirty_madvised_page_is_delayed_only() -> None:
    row = mo.row_by_id("madvise.late.mapped.dirty")
    assert _judged(row, _obs(row)) == (("delayed",), [])


def test_a_clean_row_does_not_tell_the_contracts_apart() -> None:
    row = mo.row_by_id("corrupt-pfn.early.mapped.clean")
    verdict = mo.judge_row(row, EXP, _obs(row))
    assert verdict.status == "PASS" and verdict.evidence["matches"] == ["kill_mappers", "delayed"]
    assert verdict.evidence["table"]["matches"] == ["kill_mappers", "delayed"]


@pytest.mark.parametrize(
    ("sig", "needle"),
    [
        (_sig(AR, HVA, 12), "expected si_code BUS_MCEERR_AO, got BUS_MCEERR_AR"),
        (_sig(AO, HVA + 0x1000, 12), f"expected si_addr {HVA:#x}, got {HVA + 0x1000:#x}"),
        (_sig(AO, HVA, 21), "expected si_addr_lsb 12, got 21"),
    ],
)
def test_a_wrong_signal_matches_no_contract_and_says_why(sig: SigbusRecord, needle: str) -> None:
    row = mo.row_by_id("corrupt-pfn.early.mapped.dirty")
    matches, problems = _judged(row, _obs(row, (sig,)))
    assert matches == () and len(problems) == 1
    assert "actual matches no documented contract" in problems[0] and needle in problems[0], problems
    assert "not delayed (at injection: expected no SIGBUS, got 1" in problems[0], problems


def test_a_wrong_gpa_fails_every_contract_with_the_oracle() -> None:
    row = mo.row_by_id("corrupt-pfn.late.unmapped.clean")
    guest = dataclasses.replace(FAULT, memory_fault=so.MemoryFaultSeen(0x9000, 4096, 0))
    _matches, problems = _judged(row, _obs(row, guest=guest))
    assert any("memory_fault.gpa: expected 0x41000" in p and "actual 0x9000" in p for p in problems), problems


def test_a_vcpu_sigbus_instead_of_the_memory_fault_exit_fails() -> None:
    row = mo.row_by_id("madvise.early.mapped.clean")
    guest = so.GuestAccessObservation(None, None, None, (_sig(AR, EXP.hva, 12, TID),), TID)
    _matches, problems = _judged(row, _obs(row, guest=guest))
    assert any("vCPU access: expected KVM_RUN -1/EHWPOISON with KVM_EXIT_MEMORY_FAULT at gpa 0x41000, actual sigbus"
               in p for p in problems), problems


def test_an_unpoisoned_frame_fails_whatever_the_signals() -> None:
    row = mo.row_by_id("madvise.early.mapped.clean")
    _matches, problems = _judged(row, _obs(row, poisoned=False, hardware_corrupted_kib=(4, 4)))
    assert "FAIL KPF_HWPOISON on pfn 0x1234 after the injection: expected True, actual False" in problems, problems
    assert "FAIL HardwareCorrupted growth (kB): expected >= 4, actual +0" in problems, problems


def _result(row_id: str, matches: tuple[mo.Contract, ...]) -> Verdict:
    row = mo.row_by_id(row_id)
    return mo.row_verdict(row, [Check("stand-in", "ok", "ok", True)], _obs(row), matches)


def test_the_matrix_names_the_one_contract_as_a_finding_with_the_table() -> None:
    result = mo.judge_matrix([
        _result("madvise.early.mapped.dirty", ("kill_mappers",)),
        _result("madvise.early.mapped.clean", ("kill_mappers", "delayed")),
    ])  # fmt: skip
    assert result.status == "PASS" and result.evidence["contract"] == "kill_mappers", result.summary()
    ids = [f.id for f in result.findings]
    assert ids == [mo.CONTRACT_FINDING_ID, mo.EBUSY_FINDING_ID]
    assert len(result.findings[0].evidence["table"]) == 2
    assert result.evidence["table"][0]["row"] == "madvise.early.mapped.dirty"
    assert f"matrix: {mo.CONTRACT_CHECK}" in [c.name for c in result.checks]


def test_rows_that_follow_different_contracts_fail_the_matrix() -> None:
    result = mo.judge_matrix([
        _result("madvise.early.mapped.dirty", ("kill_mappers",)),
        _result("madvise.late.mapped.dirty", ("delayed",)),
    ])  # fmt: skip
    assert result.status == "FAIL" and result.evidence["contract"] is None
    (check,) = result.failures
    assert "rows disagree" in check.actual and "madvise.late.mapped.dirty: delayed" in check.actual, check.line()


def test_a_row_that_cannot_run_is_listed_not_judged() -> None:
    idle = Verdict.did_not_run("corrupt-pfn.early.mapped.dirty", "CANNOT RUN", "no hwpoison-inject")
    result = mo.judge_matrix([_result("madvise.early.mapped.dirty", ("kill_mappers",)), idle])
    assert result.status == "PASS"
    assert result.evidence["did_not_run"] == {"corrupt-pfn.early.mapped.dirty": "CANNOT RUN: no hwpoison-inject"}
    assert result.evidence["table"][1] == {"row": "corrupt-pfn.early.mapped.dirty", "status": "CANNOT RUN"}


NO_GMEM = "unmet host requirement guest_memfd: host KVM lacks guest_memfd: KVM_CAP_GUEST_MEMFD is 0"


@pytest.mark.parametrize(("facts", "reason"), [
    ({"cap_guest_memfd": 0}, NO_GMEM),
    ({"cap_guest_memfd": 1, "guest_memfd_flags": 3, "hwpoison_reason": "madvise(MADV_HWPOISON) gave EINVAL"},
     "unmet host requirement hwpoison: madvise(MADV_HWPOISON) gave EINVAL"),
], ids=["no-guest-memfd", "no-memory-failure"])
def test_the_matrix_cancels_with_the_unmet_requirement(facts: dict[str, object], reason: str) -> None:
    """A capability report that says no (recorded answers, so this runs on every host)."""
    report = HostReport(kernel_release="6.18.44", kvm_device=True, kvm_reason=None, kvm_vendor_module="kvm_pvm",
                        kvm_api_version=12, **facts)  # type: ignore[arg-type]
    with pytest.raises(lc.ChildCancelled) as exc:
        pm.run_poison_matrix(report=report)
    assert exc.value.reason == reason


@pytest.mark.kvm
@pytest.mark.host_requires(*pm.MATRIX_REQUIREMENTS)
def test_the_live_matrix_runs_clean() -> None:
    result = pm.run_poison_matrix()
    assert result.status == "PASS", result.summary()
    assert result.evidence["contract"] is not None and not result.warnings, result.warnings
    assert result.findings[0].id == mo.CONTRACT_FINDING_ID
