"""Verdicts of the seed regression on recorded observations of both contracts and the bug.

The recorded inputs are what a host would report for poison at file index 9 of the VMM's
default layout (slot 2: base gfn 0x40, pgoff 8 -> gfn 0x41, gpa 0x41000). The seed's RFC
reports gfn 9 (the file index) and, for a 2 MiB folio, 512 signals with lsb 12.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from host_stack import kvm_uapi as u
from host_stack import live_child as lc
from host_stack import mm_uapi as m
from host_stack import seed_oracle as so
from host_stack import seed_regression as sr
from host_stack.capabilities import HostReport
from host_stack.vmm import DEFAULT_LAYOUT
from host_stack.witness import SigbusRecord
from outcome import Verdict

SLOT_HVA = {1: 0x7F0000000000, 2: 0x7F0000100000, 3: 0x7F0000200000}
GMEM_MAP = 0x7F1000000000
EXP = so.SeedExpectation.from_layout(DEFAULT_LAYOUT, 9, SLOT_HVA, GMEM_MAP)
EXP_2M = so.SeedExpectation.from_layout(DEFAULT_LAYOUT, 9, SLOT_HVA, GMEM_MAP, order=9)
AR = m.BUS_MCEERR_AR
TID = 4242
PID = 4240


def _sig(code: int, addr: int, lsb: int, tid: int = TID) -> SigbusRecord:
    """A SIGBUS as the witness records it (pid, errno and times fixed: the judges ignore them)."""
    return SigbusRecord(PID, tid, m.SIGBUS, code, 0, addr, lsb, 1_000_000, 1_700_000_000_000_000_000)


def test_expectation_follows_the_layout() -> None:
    assert (EXP.gfn, EXP.gpa, EXP.lsb, EXP.buggy_gfn) == (0x41, 0x41000, 12, 9)
    assert EXP.hva == SLOT_HVA[2] + 0x1000  # gfn 0x41 is page 1 of slot 2
    assert EXP.user_hva == GMEM_MAP + 9 * 0x1000
    assert EXP_2M.lsb == 21


def _fault(
    gpa: int, *, err: int = u.EHWPOISON, flags: int = u.KVM_MEMORY_EXIT_FLAG_PRIVATE, size: int = 4096
) -> so.GuestAccessObservation:
    return so.GuestAccessObservation(err, u.KVM_EXIT_MEMORY_FAULT, so.MemoryFaultSeen(gpa, size, flags), (), TID)


def _signals(*sigs: SigbusRecord) -> so.GuestAccessObservation:
    return so.GuestAccessObservation(None, None, None, sigs, TID)


def _lines(verdict: Verdict) -> str:
    return "\n".join(c.line() for c in verdict.failures)


@pytest.mark.parametrize("flags", [0, u.KVM_MEMORY_EXIT_FLAG_PRIVATE])
def test_memory_fault_exit_with_exact_gpa_passes(flags: int) -> None:
    verdict = so.judge_guest_access(EXP, _fault(0x41000, flags=flags))
    assert verdict.status == "PASS", verdict.summary()
    assert verdict.evidence["contract"] == "memory_fault_exit"
    assert [c.name for c in verdict.checks] == ["KVM_RUN errno", "memory_fault.gpa", "memory_fault.size",
                                                "memory_fault.flags"]


def test_sigbus_with_hva_and_lsb_passes() -> None:
    verdict = so.judge_guest_access(EXP, _signals(_sig(AR, EXP.hva, 12, TID)))
    assert verdict.status == "PASS", verdict.summary()
    assert verdict.evidence["contract"] == "sigbus"


def test_one_signal_for_a_2m_folio_passes_at_page_or_folio_start() -> None:
    folio_start = EXP_2M.hva & ~((1 << 21) - 1)
    for addr in (EXP_2M.hva, folio_start):
        verdict = so.judge_guest_access(EXP_2M, _signals(_sig(AR, addr, 21, TID)))
        assert verdict.status == "PASS", verdict.summary()


def test_seed_wrong_gfn_in_memory_fault_fails_naming_expected_and_actual() -> None:
    verdict = so.judge_guest_access(EXP, _fault(EXP.buggy_gfn << 12))
    (check,) = verdict.failures
    assert check.line() == ("FAIL memory_fault.gpa: expected 0x41000 (gfn 0x41 = base_gfn + index 9 - pgoff), "
                            "actual 0x9000 (the v11 RFC's gfn = file index)")


def test_seed_wrong_gfn_in_sigbus_fails() -> None:
    wrong_hva = EXP.hva - ((EXP.gfn - EXP.buggy_gfn) << 12)
    verdict = so.judge_guest_access(EXP, _signals(_sig(AR, wrong_hva, 12, TID)))
    assert verdict.status == "FAIL"
    text = _lines(verdict)
    assert f"vCPU SIGBUS: si_addr: expected {EXP.hva:#x}, actual {wrong_hva:#x}" in text, text
    assert "the gfn its hva belongs to: expected 0x41, actual 0x9 (the file index used as gfn)" in text, text


def test_seed_per_page_signals_for_a_2m_folio_fail() -> None:
    base = EXP_2M.hva & ~((1 << 21) - 1)
    sigs = [_sig(AR, base + i * 4096, 12, TID) for i in range(512)]
    verdict = so.judge_guest_access(EXP_2M, _signals(*sigs))
    assert verdict.status == "FAIL"
    text = _lines(verdict)
    assert f"SIGBUS count: expected 1 (BUS_MCEERR_AR at {EXP_2M.hva:#x}, lsb 21), actual 512 (lsb values [12])" in text
    assert "si_addr_lsb: expected 21, actual 12" in text, text


def test_a_vcpu_signal_without_a_known_vcpu_thread_is_not_judged_on_its_thread() -> None:
    obs = so.GuestAccessObservation(None, None, None, (_sig(AR, EXP.hva, 12, TID + 1),), None)
    verdict = so.judge_guest_access(EXP, obs)
    assert verdict.status == "PASS", verdict.summary()
    assert "vCPU SIGBUS: receiving thread" not in [c.name for c in verdict.checks]


@pytest.mark.parametrize(
    ("obs", "needle"),
    [
        (_fault(0x41000, err=14), "KVM_RUN errno: expected EHWPOISON (133), actual EFAULT (14)"),
        (_fault(0x41000, size=2 << 20), "memory_fault.size: expected 0x1000, actual 0x200000"),
        (_fault(0x41000, flags=0x10), "memory_fault.flags: expected 0 or PRIVATE (0x8), actual 0x10"),
        (so.GuestAccessObservation(None, u.KVM_EXIT_HLT, None), "actual KVM_RUN errno 0, exit HLT, 0 SIGBUS"),
        (_signals(_sig(m.BUS_MCEERR_AO, EXP.hva, 12, TID)), "si_code: expected 4 (BUS_MCEERR_AR), actual 5"),
        (_signals(_sig(AR, EXP.hva, 12, TID + 1)), "receiving thread: expected vCPU thread 4242, actual thread 4243"),
    ],
)
def test_other_wrong_answers_fail(obs: so.GuestAccessObservation, needle: str) -> None:
    verdict = so.judge_guest_access(EXP, obs)
    assert verdict.status == "FAIL"
    assert needle in _lines(verdict), _lines(verdict)


def test_user_touch_verdicts() -> None:
    good = so.judge_user_touch(EXP, [_sig(AR, EXP.user_hva, 12)])
    assert good.status == "PASS", good.summary()
    any_thread = so.judge_user_touch(EXP, [_sig(AR, EXP.user_hva, 12, TID + 1)])
    assert any_thread.status == "PASS", any_thread.summary()  # the toucher's thread is not judged
    bad = so.judge_user_touch(EXP, [_sig(AR, EXP.user_hva, 21)])
    assert bad.status == "FAIL" and "si_addr_lsb: expected 12, actual 21" in _lines(bad)
    none = so.judge_user_touch(EXP, [])
    assert none.status == "FAIL" and "actual 0 (lsb values [])" in _lines(none)


def test_live_regression_cancels_with_the_unmet_requirement() -> None:
    """A capability report that says 0 (so this runs on every host): the sentence the Avocado
    test cancels with names the requirement and the probed fact."""
    no_gmem = HostReport(kernel_release="6.18.44", kvm_device=True, kvm_reason=None, kvm_vendor_module="kvm_pvm",
                         kvm_api_version=12, cap_guest_memfd=0)
    with pytest.raises(lc.ChildCancelled) as exc:
        sr.run_seed_regression(report=no_gmem)
    assert exc.value.reason == ("unmet host requirement guest_memfd: "
                                "host KVM lacks guest_memfd: KVM_CAP_GUEST_MEMFD is 0")


@pytest.mark.kvm
@pytest.mark.host_requires(*sr.SEED_REQUIREMENTS)
def test_live_regression_runs_and_passes() -> None:
    verdict = sr.run_seed_regression()
    assert verdict.status == "PASS", verdict.summary()
    assert verdict.checks[0].name.startswith(f"{so.GUEST_ACCESS}: "), verdict.checks[0].name
    assert verdict.warnings == (), f"expected every poisoned frame unpoisoned, got {verdict.warnings}"


# --- the live path's plumbing, with stand-in children (this host cannot poison) -------------
READY = '{"event": "ready", "layout": [], "slot_hva": {}, "gmem_map_addr": 0, "index": 9, "tid": 1, "t_mono_ns": 0}'
INJECTED = (
    '{"event": "injected", "t_mono_ns": 1, "record": {"method": "madvise", "pid": 1, "va": 4096, '
    '"pfn": 4660, "length": 4096, "t_start_ns": 1, "t_end_ns": 2, "t_wall_ns": 3}}'
)


@pytest.fixture
def standin_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Make the seed child a shell script; it records its pid so the test can always kill it.

    ``via_executable`` swaps ``sys.executable`` (what every version of the live path runs;
    the witness would run it too, so only for tests that never get that far), otherwise the
    child's argv.
    """
    pidfile = tmp_path / "child.pid"
    monkeypatch.setattr(lc, "CHILD_TIMEOUT", 2.0)

    def use(body: str, *, via_executable: bool = False) -> None:
        script = tmp_path / "child.sh"
        script.write_text(f"#!/bin/sh\necho $$ > {pidfile}\n{body}\n")
        script.chmod(0o755)
        if via_executable:
            monkeypatch.setattr(sys, "executable", str(script))
        else:
            monkeypatch.setattr(sr, "_child_argv", lambda mode: [str(script), mode])

    yield use
    if pidfile.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def _observe_within(seconds: float, **kwargs: object) -> BaseException | sr._ChildRun:
    """Run ``_observe('guest')`` in a thread: a hang is a test failure, not a hung suite."""
    outcome: list[BaseException | sr._ChildRun] = []

    def run() -> None:
        try:
            outcome.append(sr._observe("guest", **kwargs))  # type: ignore[arg-type]
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"expected _observe to give up within {seconds}s, it still waits on the child"
    return outcome[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="the witness needs ptrace rights over the child")
def test_a_silent_child_times_out_with_its_stderr(standin_child: Callable[..., None]) -> None:
    standin_child("echo 'Traceback: TinyVm exploded' >&2\nexec sleep 600", via_executable=True)
    outcome = _observe_within(15)
    assert isinstance(outcome, lc.ChildError), f"expected ChildError, got {outcome!r}"
    text = str(outcome)
    assert "expected a 'ready' event within 2.0s" in text and "Traceback: TinyVm exploded" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="the witness needs ptrace rights over the child")
def test_a_child_that_hangs_after_injecting_is_still_unpoisoned(
    standin_child: Callable[..., None], tmp_path: Path
) -> None:
    debugfs = tmp_path / "standin-debugfs"  # a stand-in for debugfs, named as such
    (debugfs / "hwpoison").mkdir(parents=True)
    (debugfs / m.HWPOISON_UNPOISON_PFN).write_text("")
    standin_child(f"echo '{READY}'\nread go\necho '{INJECTED}'\nexec sleep 600")
    outcome = _observe_within(15, debugfs=debugfs)
    assert isinstance(outcome, lc.ChildError), f"expected ChildError, got {outcome!r}"
    assert (debugfs / m.HWPOISON_UNPOISON_PFN).read_text() == "0x1234", "expected unpoison in finally"


@pytest.mark.skipif(os.geteuid() != 0, reason="the witness needs ptrace rights over the child")
def test_a_failed_unpoison_is_a_warning_of_the_run(standin_child: Callable[..., None], tmp_path: Path) -> None:
    debugfs = tmp_path / "standin-debugfs"
    (debugfs / m.HWPOISON_UNPOISON_PFN).mkdir(parents=True)  # a directory: the write fails
    standin_child(f"echo '{READY}'\nread go\necho '{INJECTED}'")
    run = _observe_within(15, debugfs=debugfs)
    assert isinstance(run, sr._ChildRun), f"expected a finished run, got {run!r}"
    (warning,) = run.cleanup_warnings
    assert "pfn 0x1234" in warning and "unpoison-pfn 0x1234 failed" in warning
    # and when the run fails too, the warning rides on the exception
    standin_child(f"echo '{READY}'\nread go\necho '{INJECTED}'\necho 'not json'")
    outcome = _observe_within(15, debugfs=debugfs)
    assert isinstance(outcome, lc.ChildError) and "not json" in str(outcome)
    assert any("unpoison-pfn 0x1234 failed" in note for note in getattr(outcome, "__notes__", []))


def test_a_host_without_mmap_init_shared_cancels_the_seed() -> None:
    flags_0 = HostReport(
        kernel_release="7.3.4-amd64", kvm_device=True, kvm_reason=None, kvm_vendor_module="kvm_amd",
        kvm_api_version=12, cap_guest_memfd=1, guest_memfd_flags=0,
    )  # fmt: skip
    with pytest.raises(lc.ChildCancelled) as exc:
        sr.run_seed_regression(report=flags_0)
    assert exc.value.reason == (
        "unmet host requirement guest_memfd_mmap: "
        "host KVM cannot mmap guest_memfd: KVM_CAP_GUEST_MEMFD_FLAGS 0x0 lacks GUEST_MEMFD_FLAG_MMAP"
    )
