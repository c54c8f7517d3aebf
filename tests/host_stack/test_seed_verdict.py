"""Verdicts of the seed regression on recorded observations of both contracts and the bug.

The recorded inputs are what a host would report for poison at file index 9 of the VMM's
default layout (slot 2: base gfn 0x40, pgoff 8 -> gfn 0x41, gpa 0x41000). The seed's RFC
reports gfn 9 (the file index) and, for a 2 MiB folio, 512 signals with lsb 12.
"""

from __future__ import annotations

import pytest

from host_stack import kvm_uapi as u
from host_stack import seed_regression as sr
from host_stack.vmm import DEFAULT_LAYOUT

SLOT_HVA = {1: 0x7F0000000000, 2: 0x7F0000100000, 3: 0x7F0000200000}
GMEM_MAP = 0x7F1000000000
EXP = sr.SeedExpectation.from_layout(DEFAULT_LAYOUT, 9, SLOT_HVA, GMEM_MAP)
EXP_2M = sr.SeedExpectation.from_layout(DEFAULT_LAYOUT, 9, SLOT_HVA, GMEM_MAP, order=9)
AR = sr.BUS_MCEERR_AR
TID = 4242


def test_expectation_follows_the_layout() -> None:
    assert (EXP.gfn, EXP.gpa, EXP.lsb, EXP.buggy_gfn) == (0x41, 0x41000, 12, 9)
    assert EXP.hva == SLOT_HVA[2] + 0x1000  # gfn 0x41 is page 1 of slot 2
    assert EXP.user_hva == GMEM_MAP + 9 * 0x1000
    assert EXP_2M.lsb == 21


def _fault(
    gpa: int, *, err: int = u.EHWPOISON, flags: int = u.KVM_MEMORY_EXIT_FLAG_PRIVATE, size: int = 4096
) -> sr.GuestAccessObservation:
    return sr.GuestAccessObservation(err, u.KVM_EXIT_MEMORY_FAULT, sr.MemoryFaultSeen(gpa, size, flags), (), TID)


def _signals(*sigs: sr.SigbusSeen) -> sr.GuestAccessObservation:
    return sr.GuestAccessObservation(None, None, None, sigs, TID)


@pytest.mark.parametrize("flags", [0, u.KVM_MEMORY_EXIT_FLAG_PRIVATE])
def test_memory_fault_exit_with_exact_gpa_passes(flags: int) -> None:
    verdict = sr.judge_guest_access(EXP, _fault(0x41000, flags=flags))
    assert verdict.ok, verdict.messages
    assert verdict.contract == "memory_fault_exit"


def test_sigbus_with_hva_and_lsb_passes() -> None:
    verdict = sr.judge_guest_access(EXP, _signals(sr.SigbusSeen(AR, EXP.hva, 12, TID)))
    assert verdict.ok, verdict.messages
    assert verdict.contract == "sigbus"


def test_one_signal_for_a_2m_folio_passes_at_page_or_folio_start() -> None:
    folio_start = EXP_2M.hva & ~((1 << 21) - 1)
    for addr in (EXP_2M.hva, folio_start):
        verdict = sr.judge_guest_access(EXP_2M, _signals(sr.SigbusSeen(AR, addr, 21, TID)))
        assert verdict.ok, verdict.messages


def test_seed_wrong_gfn_in_memory_fault_fails_naming_expected_and_actual() -> None:
    verdict = sr.judge_guest_access(EXP, _fault(EXP.buggy_gfn << 12))
    assert not verdict.ok
    text = " ".join(verdict.messages)
    assert "expected gpa 0x41000" in text and "got 0x9000" in text and "file index" in text


def test_seed_wrong_gfn_in_sigbus_fails() -> None:
    wrong_hva = EXP.hva - ((EXP.gfn - EXP.buggy_gfn) << 12)
    verdict = sr.judge_guest_access(EXP, _signals(sr.SigbusSeen(AR, wrong_hva, 12, TID)))
    assert not verdict.ok
    text = " ".join(verdict.messages)
    assert f"expected si_addr {EXP.hva:#x}" in text and f"got {wrong_hva:#x}" in text


def test_seed_per_page_signals_for_a_2m_folio_fail() -> None:
    base = EXP_2M.hva & ~((1 << 21) - 1)
    sigs = [sr.SigbusSeen(AR, base + i * 4096, 12, TID) for i in range(512)]
    verdict = sr.judge_guest_access(EXP_2M, _signals(*sigs))
    assert not verdict.ok
    text = " ".join(verdict.messages)
    assert "expected 1 SIGBUS" in text and "lsb 21" in text and "got 512" in text
    assert "expected si_addr_lsb 21, got 12" in text


@pytest.mark.parametrize(
    ("obs", "needle"),
    [
        (_fault(0x41000, err=14), "expected errno EHWPOISON"),
        (_fault(0x41000, size=2 << 20), "expected size 4096"),
        (_fault(0x41000, flags=0x10), "expected flags 0 or PRIVATE"),
        (sr.GuestAccessObservation(None, u.KVM_EXIT_HLT, None), "got KVM_RUN errno 0, exit HLT"),
        (_signals(sr.SigbusSeen(sr.BUS_MCEERR_AO, EXP.hva, 12, TID)), "BUS_MCEERR_AR"),
        (_signals(sr.SigbusSeen(AR, EXP.hva, 12, TID + 1)), "vCPU thread 4242"),
    ],
)
def test_other_wrong_answers_fail(obs: sr.GuestAccessObservation, needle: str) -> None:
    verdict = sr.judge_guest_access(EXP, obs)
    assert not verdict.ok
    assert needle in " ".join(verdict.messages)


def test_user_touch_verdicts() -> None:
    good = sr.judge_user_touch(EXP, [sr.SigbusSeen(AR, EXP.user_hva, 12)])
    assert good.ok, good.messages
    bad = sr.judge_user_touch(EXP, [sr.SigbusSeen(AR, EXP.user_hva, 21)])
    assert not bad.ok and "expected si_addr_lsb 12, got 21" in " ".join(bad.messages)
    none = sr.judge_user_touch(EXP, [])
    assert not none.ok and "got 0" in " ".join(none.messages)


@pytest.mark.kvm
def test_live_regression_runs_or_names_what_is_missing(kvm_unavailable: str | None) -> None:
    if kvm_unavailable is not None:
        pytest.skip(kvm_unavailable)
    try:
        result = sr.run_seed_regression()
    except sr.SeedCancelled as exc:
        assert exc.reason  # the sentence the Avocado test cancels with
        pytest.skip(exc.reason)
    assert result.ok, result.to_json()
