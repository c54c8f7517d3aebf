"""Poison behind a private gfn: the interlock, the oracle and the clean-up judged on recorded data
everywhere; run for real on a KVM that creates software-protected VMs and can poison (the test
command's private lab-host batch, or ``gmemtest labhost test --kvm sw-protected
tests/host_stack/test_private_poison.py``)."""

from __future__ import annotations

import errno
from dataclasses import replace
from pathlib import Path

import pytest

from host_stack import kvm_uapi as u
from host_stack import mm_uapi as m
from host_stack import private_oracle as po
from host_stack.capabilities import HostReport
from host_stack.injectors import InjectionRecord, InjectionRefused, cleanup_warnings
from host_stack.live_child import ChildCancelled
from host_stack.pagemap import PageFlags
from host_stack.private_frames import SpteRequest, parse_spte_requested, prove_private_frame
from host_stack.private_poison import release_frame, run_private_matrix, run_private_seed
from host_stack.vmm import DEFAULT_LAYOUT, private_gfns
from host_stack.vmm import guest_pattern as pattern

# Two lines of a 7.3.4 trace buffer, as L1 printed them (the first a fault of the payload page).
TRACE = """\
          python-140     [001] ...1.    10.93: kvm_mmu_spte_requested: gfn 1 pfn 11e55f level 1 access 7
          python-140     [001] ...1.    10.95: kvm_mmu_spte_requested: gfn 41 pfn 126fbb level 1 access 7
"""
GFN, INDEX, TID, PFN = 0x41, 9, 140, 0x126FBB
# uptodate | dirty | referenced: what a private guest_memfd page showed in L1 (7.3.4)
PRIVATE_FLAGS = PageFlags(PFN, 1 << m.KPF_UPTODATE | 1 << m.KPF_DIRTY | 1 << m.KPF_REFERENCED)


def _round(pfn: int = PFN) -> list[SpteRequest]:
    return [SpteRequest(TID, 0x21, 0x126FBA, 1), SpteRequest(TID, GFN, pfn, 1), SpteRequest(TID, 0x71, 0x126FBC, 1)]


def _read_back() -> dict[int, tuple[int, int]]:
    return {g: (pattern(g), pattern(g)) for g in (0x21, GFN, 0x71)}


def test_the_trace_names_the_frame_kvm_mapped_for_each_gfn() -> None:
    assert parse_spte_requested(TRACE) == [SpteRequest(140, 0x1, 0x11E55F, 1), SpteRequest(140, GFN, PFN, 1)]


def test_a_frame_seen_in_two_fault_rounds_with_private_flags_is_proven() -> None:
    frame = prove_private_frame(GFN, INDEX, TID, rounds=[_round(), _round()], read_back=_read_back(),
                                flags=PRIVATE_FLAGS)
    assert (frame.pfn, frame.gpa) == (PFN, 0x41000) and "2 fault rounds" in frame.proof


@pytest.mark.parametrize(("rounds", "read_back", "flags", "reason", "words"), [
    ([_round()], _read_back(), PRIVATE_FLAGS, "not-proven", "at least 2 fault round(s)"),
    ([_round(), _round(PFN + 5)], _read_back(), PRIVATE_FLAGS, "not-proven", "successive rounds"),
    ([_round(), [SpteRequest(TID + 1, GFN, PFN, 1)]], _read_back(), PRIVATE_FLAGS, "not-proven", "got 0"),
    ([_round(), [SpteRequest(TID, GFN, PFN, 2)]], _read_back(), PRIVATE_FLAGS, "not-proven", "level 2"),
    ([_round(), [*_round(), SpteRequest(TID, 0x22, PFN, 1)]], _read_back(), PRIVATE_FLAGS, "not-proven",
     "also given to gfn(s) 0x22"),
    ([_round(), _round()], {**_read_back(), GFN: (pattern(GFN), 0)}, PRIVATE_FLAGS, "not-proven",
     "did not keep the guest's data"),
    ([_round(), _round()], _read_back(), PageFlags(PFN, PRIVATE_FLAGS.raw | 1 << m.KPF_MMAP), "user-mapped",
     "mapped by a process"),
    ([_round(), _round()], _read_back(), PageFlags(PFN, PRIVATE_FLAGS.raw | 1 << m.KPF_ANON), "not-guest-memfd",
     "anonymous"),
    ([_round(), _round()], _read_back(), PageFlags(PFN, PRIVATE_FLAGS.raw | 1 << m.KPF_SLAB), "slab", "slab"),
    ([_round(), _round()], _read_back(), PageFlags(PFN, PRIVATE_FLAGS.raw | 1 << m.KPF_HWPOISON),
     "already-poisoned", "already"),
    ([_round(), _round()], _read_back(), PageFlags(PFN + 1, PRIVATE_FLAGS.raw), "not-proven", "kpageflags were read"),
])
def test_an_unproven_frame_is_refused_with_the_reason(rounds: list[list[SpteRequest]],
                                                      read_back: dict[int, tuple[int, int]], flags: PageFlags,
                                                      reason: str, words: str) -> None:
    with pytest.raises(InjectionRefused) as refused:
        prove_private_frame(GFN, INDEX, TID, rounds=rounds, read_back=read_back, flags=flags)
    assert refused.value.reason == reason and words in str(refused.value), str(refused.value)


def _expectation() -> po.PrivateExpectation:
    private = private_gfns(DEFAULT_LAYOUT)
    return po.PrivateExpectation.from_layout(DEFAULT_LAYOUT, INDEX, private, {g: pattern(g) for g in private})


def _observation(**changes: object) -> po.PrivateObservation:
    """What L1 recorded on 7.3.4 with the rebuilt KVM (the prototype run of this check)."""
    exp = _expectation()
    obs = po.PrivateObservation(
        kill="default", kill_get=0, pfn=PFN, proof="two rounds", injected_pfn=PFN, poisoned=True,
        call_errno=errno.EBUSY, hardware_corrupted_kib=(0, 4), run_errno=u.EHWPOISON,
        exit_reason=u.KVM_EXIT_MEMORY_FAULT, memory_fault={"gpa": 0x41000, "size": 0x1000, "flags": 0x8},
        after=dict(exp.after),
        cleanup=po.CleanupSteps(unpoison_before_punch=errno.EBUSY, punch_errno=0, unpoison_after_punch=0,
                                poisoned_after=False, hardware_corrupted_kib=(0, 0)))
    return replace(obs, **changes)  # type: ignore[arg-type]


def test_the_oracle_expects_the_gfn_and_every_other_page_as_it_was() -> None:
    exp = _expectation()
    assert (exp.gfn, exp.gpa, exp.buggy_gfn) == (0x41, 0x41000, 9)
    assert exp.after[0x21] == pattern(0x21) and exp.after[0x40] == 0x414E0008 and 0x41 not in exp.after


def test_the_recorded_run_passes_with_both_kernel_behaviours_as_findings() -> None:
    verdict = po.judge_private(po.PRIVATE_SEED_NAME, _expectation(), _observation())
    assert verdict.passed, verdict.summary()
    assert {f.id for f in verdict.findings} == {"poison-injection-ebusy-yet-poisoned", po.UNPOISON_FINDING_ID}


@pytest.mark.parametrize(("changes", "failed", "actual"), [
    ({"memory_fault": {"gpa": 0x9000, "size": 0x1000, "flags": 0x8}}, "memory_fault.gpa", "the v11 RFC"),
    ({"memory_fault": {"gpa": 0x41000, "size": 0x1000, "flags": 0}}, "memory_fault.flags", "0x0"),
    ({"run_errno": errno.EFAULT}, "KVM_RUN errno", "EFAULT"),
    ({"injected_pfn": PFN + 1}, "the poisoned frame is the one proven", hex(PFN + 1)),
    ({"after": None, "after_error": "KVM_RUN failed"}, "the VM still runs", "KVM_RUN failed"),
    ({"cleanup": po.CleanupSteps(poisoned_after=True, hardware_corrupted_kib=(0, 4))}, "clean-up", "True"),
])
def test_what_the_oracle_does_not_expect_fails_by_name(changes: dict[str, object], failed: str, actual: str) -> None:
    verdict = po.judge_private(po.PRIVATE_SEED_NAME, _expectation(), _observation(**changes))
    assert not verdict.passed
    assert any(failed in c.name and actual in c.actual for c in verdict.failures), verdict.summary()


def test_a_sigbus_anywhere_fails_the_row_and_matches_no_contract() -> None:
    from host_stack.signal_trace import GeneratedSignal

    row = po.judge_private_row("corrupt-pfn.late.private", _expectation(),
                               _observation(generated=(GeneratedSignal(7, 4, TID, "python", False, "delivered"),)))
    assert not row.passed and row.evidence["matches"] == []
    ok = po.judge_private_row("corrupt-pfn.late.private", _expectation(), _observation())
    assert ok.passed and ok.evidence["matches"] == ["kill_mappers", "delayed"]


def test_the_private_column_has_madvise_as_not_meaningful_and_names_the_contracts() -> None:
    rows = [po.judge_private_row(r, _expectation(), _observation()) for r in po.PRIVATE_ROWS]
    matrix = po.judge_private_matrix(rows)
    assert matrix.passed and po.MADVISE_ROW in matrix.evidence["did_not_run"]
    assert "NOT MEANINGFUL" in matrix.evidence["did_not_run"][po.MADVISE_ROW]
    assert any(f.id.endswith("-private") for f in matrix.findings)
    ebusy = [f for f in matrix.findings if f.id == "poison-injection-ebusy-yet-poisoned"]
    assert len(ebusy) == 1 and ebusy[0].evidence["rows"] == list(po.PRIVATE_ROWS), ebusy  # once, naming both rows
    assert [line["row"] for line in matrix.evidence["table"]] == [*po.PRIVATE_ROWS, po.MADVISE_ROW]


def _record() -> InjectionRecord:
    return InjectionRecord(method="corrupt-pfn", pid=140, va=0, gpa=0x41000, pfn=PFN, length=4096, t_start_ns=0,
                           t_end_ns=0, t_wall_ns=0)


def test_a_frame_that_stays_poisoned_is_a_warning_naming_it(tmp_path: Path) -> None:
    (tmp_path / "hwpoison" / "unpoison-pfn").mkdir(parents=True)  # writing it fails (EISDIR)
    done = release_frame(_record(), tmp_path, still_poisoned=lambda _pfn: True)
    assert done.cleanup_failed
    (warning,) = cleanup_warnings([done])
    assert f"pfn {PFN:#x}" in warning and "gpa 0x41000" in warning and "EISDIR" in warning, warning


def test_a_frame_already_unpoisoned_is_left_alone(tmp_path: Path) -> None:
    done = release_frame(_record(), tmp_path, still_poisoned=lambda _pfn: False)
    assert not done.cleanup_failed and not cleanup_warnings([done])


def test_without_a_software_protected_vm_both_checks_cannot_run_with_the_probed_reason() -> None:
    stock = HostReport(kernel_release="7.3.4+deb13-amd64", kvm_device=True, kvm_reason=None,
                       kvm_vendor_module="kvm_amd", kvm_api_version=12, cap_guest_memfd=1, guest_memfd_flags=0x3,
                       vm_types_mask=0x1,
                       supported_vm_types=(0,))
    for run in (run_private_seed, run_private_matrix):
        with pytest.raises(ChildCancelled) as cancelled:
            run(report=stock)
        assert "sw_protected_vm" in cancelled.value.reason and "KVM_CAP_VM_TYPES 0x1" in cancelled.value.reason


@pytest.mark.host_requires("kvm", "sw_protected_vm", "hwpoison", "hwpoison_inject")
def test_poison_behind_a_private_gfn_is_reported_by_kvm_alone_and_cleaned_up() -> None:
    verdict = run_private_seed()
    assert verdict.passed, verdict.summary()
    assert not verdict.warnings, verdict.warnings


@pytest.mark.host_requires("kvm", "sw_protected_vm", "hwpoison", "hwpoison_inject")
def test_the_private_column_of_the_poison_matrix_holds_under_both_kill_policies() -> None:
    verdict = run_private_matrix()
    assert verdict.passed, verdict.summary()
    assert not verdict.warnings, verdict.warnings


def test_a_run_that_broke_after_poisoning_is_an_error_that_still_names_the_frame_left_poisoned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import host_stack.private_poison as pp
    from host_stack.live_child import ChildError

    def broke(_kill: str, _debugfs: Path) -> tuple[object, list[str]]:
        exc = ChildError("private-poison child (default): expected a 'punched' event within 60.0s")
        exc.add_note(f"cleanup: cleanup of corrupt-pfn poison (pid 140 gpa 0x41000 pfn {PFN:#x}) failed: EISDIR")
        raise exc

    monkeypatch.setattr(pp, "_observe", broke)
    verdict = pp._judged(po.PRIVATE_SEED_NAME, "default", tmp_path, row=False)
    assert verdict.status == "ERROR" and "'punched'" in str(verdict.reason)
    assert len(verdict.warnings) == 1 and f"pfn {PFN:#x}" in verdict.warnings[0], verdict.warnings
