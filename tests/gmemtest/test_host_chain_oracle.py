"""The host-poison rows' oracle and verdict, on a layout and observations recorded in the lab host.

The layout, frame and observations are those of a real ``host-ar-touch-4k`` run (Debian 7.3.4
L1, QEMU 10.0.2, Debian 6.1 AMD guest); the wrong answers are what a broken stack would give.
"""

from __future__ import annotations

import dataclasses

import pytest
from gmemtest_test_support import probe_sigbus

from gmemtest.observations import HostObservations, MceRecord, Observations, RamBacking, RecoveryLine
from gmemtest.oracle import AMD, INTEL, HostFrameLayout, MappingLayout, PageLayout, expect_host
from gmemtest.scenarios import ScenarioSpec, Source, Trigger, get_scenario, unsupported_under
from gmemtest.verdict import judge
from guests.profiles import get_profile
from host_stack.mceerr_trace import SentMceerr
from host_stack.mm_uapi import BUS_MCEERR_AO, BUS_MCEERR_AR, SIGBUS
from host_stack.signal_trace import GeneratedSignal
from host_stack.witness import SigbusRecord
from qmp_helpers.memslots import MemslotRegistration

LAYOUT = MappingLayout(kind="anon4k", base_va=0x7F161DFF5000, size=0x4000, page_size=0x1000,
                       pages=(PageLayout(0x7F161DFF5000, 0x2974), PageLayout(0x7F161DFF6000, 0x2961),
                              PageLayout(0x7F161DFF7000, 0x299C), PageLayout(0x7F161DFF8000, 0x296A)))
RAM_SLOT_GPA, RAM_SLOT_SIZE = 0x100000, 0x1FF00000  # QEMU 10.0.2's slot for RAM above 1 MiB of a 512 MiB q35


def memslot(gpa: int, hva: int, guest_memfd: int = -1) -> MemslotRegistration:
    """The RAM slot, registered so that ``gpa`` lies at ``hva``."""
    return MemslotRegistration(0, 3, 4 if guest_memfd >= 0 else 0, RAM_SLOT_GPA, RAM_SLOT_SIZE,
                               hva - (gpa - RAM_SLOT_GPA), guest_memfd, 0, 0)


def host_frame(gpa: int, hva: int, pfn: int, qemu_pid: int, host_page_shift: int = 12) -> HostFrameLayout:
    return HostFrameLayout(gpa=gpa, hva=hva, pfn=pfn, qemu_pid=qemu_pid, memslot=memslot(gpa, hva),
                           host_page_shift=host_page_shift)


FRAME = host_frame(gpa=0x2961040, hva=0x7F8692761040, pfn=0x117961, qemu_pid=207)
VCPU_TID = 214


def test_ar_row_on_amd_expects_both_sigbus_and_an_overflowed_srar() -> None:
    exp, host = expect_host(get_scenario("host-ar-touch-4k"), LAYOUT, FRAME, vendor=AMD, mce_bank=9)
    assert [(s.si_code, s.si_addr, s.si_addr_lsb, s.thread) for s in host.qemu_sigbus] == [
        (BUS_MCEERR_AO, 0x7F8692761000, 12, "main"), (BUS_MCEERR_AR, 0x7F8692761000, 12, "vcpu")]
    assert host.forwarded == (("BUS_MCEERR_AO", 0x7F8692761000, 0x2961000),
                              ("BUS_MCEERR_AR", 0x7F8692761000, 0x2961000))
    assert not host.guest_recovers_first
    # VAL|OVER|UC|EN|MISCV|ADDRV|POISON: the AR overflows the deferred AO record in bank 9.
    assert (exp.mce_status, exp.mce_record_addr) == (0xFC00080000000000, 0x2961000)
    assert exp.sigbus is not None and (exp.sigbus.si_code, exp.sigbus.si_addr) == (BUS_MCEERR_AR, 0x7F161DFF6000)
    assert [e.action_required for e in exp.memory_failure_events] == [False, False]  # AMD: no AR bit


def test_ao_rows_on_amd_need_the_guest_poll_and_give_guest_level_signals() -> None:
    late, host = expect_host(get_scenario("host-ao-late-touch-4k"), LAYOUT,
                             dataclasses.replace(FRAME, gpa=0x2961080, hva=0x7F8692761080), vendor=AMD, mce_bank=9)
    assert host.guest_recovers_first and len(host.qemu_sigbus) == 1
    assert late.mce_status == 0x9C00180000000000  # VAL|EN|MISCV|ADDRV|DEFERRED|POISON: no #MC
    assert late.sigbus is not None and late.sigbus.si_addr == LAYOUT.base_va + 0x1238  # the byte touched
    early_spec = get_scenario("host-ao-early-kill-4k")
    frame = host_frame(gpa=(0x299C << 12) + 0x100, hva=0x7F0000000100, pfn=0x1000, qemu_pid=207)
    early, _ = expect_host(early_spec, LAYOUT, frame, vendor=AMD, mce_bank=9)
    assert early.sigbus is not None and (early.sigbus.si_code, early.sigbus.si_addr) == (BUS_MCEERR_AO,
                                                                                         0x7F161DFF7000)
    with pytest.raises(ValueError, match="needs a guest that learns of the AO"):
        expect_host(dataclasses.replace(early_spec, guest_mce_poll_s=0), LAYOUT, frame, vendor=AMD, mce_bank=9)


def test_ar_row_on_intel_degenerates_to_a_guest_recovery() -> None:
    """An Intel vCPU gets the AO as an SRAO #MC at once: the touch faults in the guest, KVM never sees it."""
    exp, host = expect_host(get_scenario("host-ar-touch-4k"), LAYOUT, FRAME, vendor=INTEL, mce_bank=9)
    assert len(host.qemu_sigbus) == 1 and exp.mce_status == 0xBD000000000000C0
    assert exp.sigbus is not None and exp.sigbus.si_addr == LAYOUT.base_va + 0x1300


def test_oracle_refuses_a_frame_for_another_gpa_and_unknown_vendors() -> None:
    spec = get_scenario("host-ar-touch-4k")
    with pytest.raises(ValueError, match="resolved for gpa 0x2962040"):
        expect_host(spec, LAYOUT, host_frame(0x2962040, 0x7F8692762040, 0x117962, 207), vendor=AMD, mce_bank=9)
    with pytest.raises(ValueError, match="'HygonGenuine' has no machine-check oracle"):
        expect_host(spec, LAYOUT, FRAME, vendor="HygonGenuine", mce_bank=9)
    with pytest.raises(ValueError, match="is not a host-poison row"):
        expect_host(get_scenario("srao-late-touch-4k"), LAYOUT, FRAME, vendor=AMD, mce_bank=9)


def _observed() -> tuple[Observations, HostObservations]:
    """The observations of the recorded AMD run, all correct."""
    obs = Observations(
        sigbus=[probe_sigbus(BUS_MCEERR_AR, 0x7F161DFF6000, 12, "touch")],
        memory_failure_events=[{"recipient": "guest", "action": "inject",
                                "flags": {"action-required": False, "recursive": False}}] * 2,
        hardware_corrupted_before_kb=0, hardware_corrupted_after_kb=4, hwpoison_flag=True,
        recovery_lines=[RecoveryLine(0x2961, "dirty LRU page", "Recovered")],
        mce_records=[MceRecord(9, 0xFC00080000000000, 0x2961000, 0x8C)])
    hobs = HostObservations(
        generated=[GeneratedSignal(SIGBUS, BUS_MCEERR_AO, 207, "qemu-system-x86", False, "delivered"),
                   GeneratedSignal(SIGBUS, BUS_MCEERR_AR, VCPU_TID, "qemu-system-x86", False, "delivered")],
        qemu_sigbus=[SigbusRecord(207, VCPU_TID, SIGBUS, BUS_MCEERR_AR, 0, 0x7F8692761000, 12, 1, 1)],
        # memory failure's AO kill of QEMU's main thread (sent by the injector), KVM's AR to the vCPU
        sent=[SentMceerr("send", 207, BUS_MCEERR_AO, 0x7F8692761000, 12, 1234),
              SentMceerr("send", VCPU_TID, BUS_MCEERR_AR, 0x7F8692761000, 12, VCPU_TID)],
        qemu_pid=207, vcpu_tids=[VCPU_TID],
        forwarded=[("BUS_MCEERR_AO", 0x7F8692761000, 0x2961000), ("BUS_MCEERR_AR", 0x7F8692761000, 0x2961000)],
        hardware_corrupted_before_kb=0, hardware_corrupted_after_kb=4, hwpoison_flag=True,
        recovery_lines=[RecoveryLine(0x117961, "dirty LRU page", "Recovered")], cleanup="unpoisoned pfn 0x117961",
        ram_backing=USERSPACE_RAM)
    return obs, hobs


USERSPACE_RAM = RamBacking(memslot=FRAME.memslot.describe(), slot_guest_memfd=-1, slot_fd_target=None,
                           qemu_guest_memfds=(), hva_mapping="")
GMEM_RAM = RamBacking(memslot=memslot(FRAME.gpa, FRAME.hva, 27).describe(), slot_guest_memfd=27,
                      slot_fd_target="/[kvm-gmem] (deleted)", qemu_guest_memfds=(27,),
                      hva_mapping="/[kvm-gmem] (deleted)")
SENT = "SIGBUS sent to QEMU (kprobes on force/send_sig_mceerr: code, si_addr, si_addr_lsb, thread)"
BACKING_CHECK = f"KVM serves gpa {FRAME.gpa:#x} from (memslot QEMU registered, QEMU's fd table)"


def test_verdict_names_every_layer_and_passes_the_recorded_run() -> None:
    exp, host = expect_host(get_scenario("host-ar-touch-4k"), LAYOUT, FRAME, vendor=AMD, mce_bank=9)
    obs, hobs = _observed()
    verdict = judge(exp, obs, (host, hobs))
    assert verdict.passed, verdict.summary()
    assert {c.layer for c in verdict.checks} == {"host", "qemu", "guest"}
    assert verdict.checks[0].layer == "host" and verdict.checks[-1].layer == "guest"
    assert "[host] SIGBUS delivered to a QEMU handler" in verdict.summary()


@pytest.mark.parametrize(("broken", "failing"), [
    # The seed's bug class one level up: the AR reported at a page-index-derived address.
    (lambda o, h: h.qemu_sigbus.__setitem__(0, dataclasses.replace(h.qemu_sigbus[0], si_addr=0x7F8692760000)),
     "SIGBUS delivered to a QEMU handler (witness siginfo)"),
    (lambda o, h: h.qemu_sigbus.__setitem__(0, dataclasses.replace(h.qemu_sigbus[0], si_addr_lsb=21)),
     "SIGBUS delivered to a QEMU handler (witness siginfo)"),
    (lambda o, h: h.generated.pop(0), "SIGBUS generated for QEMU (signal_generate: code, thread)"),
    (lambda o, h: setattr(h, "vcpu_tids", []), "SIGBUS generated for QEMU (signal_generate: code, thread)"
                                                 f"|{SENT}|SIGBUS delivered to a QEMU handler (witness siginfo)"),
    # What the kernel sent, with address and order: the AO to the main thread no witness can see
    # (a deliberately wrong order fails), a page-by-page AR, an AO that never came.
    (lambda o, h: h.sent.__setitem__(0, dataclasses.replace(h.sent[0], si_addr_lsb=21)), SENT),
    (lambda o, h: h.sent.__setitem__(0, dataclasses.replace(h.sent[0], si_addr=0x7F8692760000)), SENT),
    (lambda o, h: h.sent.pop(0), SENT),
    (lambda o, h: h.forwarded.pop(), "QEMU forwarded (stderr: code, hva, gpa)"),
    (lambda o, h: setattr(h, "hwpoison_flag", False), "KPF_HWPOISON on host pfn 0x117961"),
    (lambda o, h: setattr(h, "recovery_lines", []), "host kernel recovery line (pfn, result)"),
    (lambda o, h: setattr(h, "cleanup_failed", True), "host poison cleaned up (unpoison-pfn)"),
    # kvm-default RAM that KVM serves from a guest_memfd after all, or that nobody read
    (lambda o, h: setattr(h, "ram_backing", GMEM_RAM), BACKING_CHECK),
    (lambda o, h: setattr(h, "ram_backing", None), BACKING_CHECK),
    (lambda o, h: setattr(o, "mce_records", [MceRecord(9, 0xBC00080000000000, 0x2961000, 0x8C)]),
     "mce_record of bank 9 (status, addr)"),
])
def test_verdict_fails_each_broken_observable(broken: object, failing: str) -> None:
    exp, host = expect_host(get_scenario("host-ar-touch-4k"), LAYOUT, FRAME, vendor=AMD, mce_bank=9)
    obs, hobs = _observed()
    broken(obs, hobs)  # type: ignore[operator]
    verdict = judge(exp, obs, (host, hobs))
    assert [c.name for c in verdict.failures] == failing.split("|"), verdict.summary()


def test_host_rows_are_validated_and_need_kvm_hwpoison_inject_and_kprobes() -> None:
    spec = get_scenario("host-ao-late-touch-4k")
    assert spec.source is Source.HOST and spec.requirements == ("hwpoison_inject", "kprobes")
    assert get_scenario("srao-late-touch-4k").requirements == ()
    reason = unsupported_under(spec, get_profile("tcg-default"))
    assert reason is not None and "only KVM does" in reason and "tcg-default runs under tcg" in reason
    assert unsupported_under(spec, get_profile("kvm-default")) is None
    base = dict(name="x", summary="", page_kind="anon4k", npages=1, mce_kind="SRAO", kill=spec.kill,
                poison_offset=0, source=Source.HOST)
    with pytest.raises(ValueError, match="needs trigger touch or wait, got kernel"):
        ScenarioSpec(trigger=Trigger.KERNEL, **base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one frame behind a 4 KiB piece of an anonymous guest page"):
        ScenarioSpec(trigger=Trigger.WAIT, **{**base, "mce_kind": "SRAR"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="guest_mce_poll_s must be >= 0"):
        ScenarioSpec(trigger=Trigger.WAIT, guest_mce_poll_s=-1, **base)  # type: ignore[arg-type]


def test_reset_row_checks_the_replaced_frame_and_the_guest_read() -> None:
    spec = get_scenario("host-ao-reset-4k")
    frame = host_frame(gpa=(0x299C << 12) + 0x80, hva=0x7F0000000080, pfn=0x1000, qemu_pid=207)
    _, host = expect_host(spec, LAYOUT, frame, vendor=AMD, mce_bank=9)
    assert host.reset and host.guest_recovers_first
    hobs = HostObservations(pfn_after_reset=0x2000, hwpoison_after_reset=False, guest_read_after_reset="read")
    from gmemtest.verdict import judge_host

    checks = {c.name: c for c in judge_host(host, hobs)}
    assert checks["frame behind the hva after system_reset"].ok
    assert checks[f"rebooted guest's kernel reads gpa {frame.gpa:#x} (/proc/kcore)"].ok
    for broken in (dict(pfn_after_reset=0x1000), dict(hwpoison_after_reset=True), dict(pfn_after_reset=None)):
        bad = {c.name: c for c in judge_host(host, dataclasses.replace(hobs, **broken))}  # type: ignore[arg-type]
        assert not bad["frame behind the hva after system_reset"].ok, broken
    panicked = dataclasses.replace(hobs, guest_read_after_reset="ProbeError: ... (the guest panicked)")
    assert not {c.name: c for c in judge_host(host, panicked)}[
        f"rebooted guest's kernel reads gpa {frame.gpa:#x} (/proc/kcore)"].ok
    with pytest.raises(ValueError, match="a reset after the injection is for host-poison touch rows"):
        dataclasses.replace(get_scenario("srao-late-touch-4k"), reset_after=True)


THP = MappingLayout(kind="thp", base_va=0x7F0000200000, size=0x200000, page_size=0x1000, is_thp=True,
                    pages=tuple(PageLayout(0x7F0000200000 + i * 0x1000, 0x2A00 + i) for i in range(512)))


def test_hugetlb_row_expects_2m_lost_on_the_host_and_4k_forwarded() -> None:
    spec = get_scenario("host-ao-hugetlb-thp")
    frame = host_frame(gpa=(0x2A05 << 12) + 0x80, hva=0x7F1C00005080, pfn=0x103C05, qemu_pid=9,
                       host_page_shift=21)
    exp, host = expect_host(spec, THP, frame, vendor=AMD, mce_bank=9)
    assert [(s.si_code, s.si_addr, s.si_addr_lsb, s.thread) for s in host.qemu_sigbus] == [
        (BUS_MCEERR_AO, 0x7F1C00005000, 21, "main"), (BUS_MCEERR_AR, 0x7F1C00009000, 12, "vcpu")]
    assert host.forwarded == (("BUS_MCEERR_AO", 0x7F1C00005000, 0x2A05000),
                              ("BUS_MCEERR_AR", 0x7F1C00009000, 0x2A09000))
    assert host.guest_recovers_first and host.host_hardware_corrupted_delta_kb == 4
    assert exp.expected_records == ((0x9C00180000000000, 0x2A05000), (0xBC00080000000000, 0x2A09000))
    assert exp.poison_pfns == (0x2A05, 0x2A09) and exp.hardware_corrupted_delta_kb == 8
    assert exp.sigbus is not None and (exp.sigbus.si_code, exp.sigbus.si_addr) == (BUS_MCEERR_AR, 0x7F0000209000)
    with pytest.raises(ValueError, match="not congruent modulo 0x200000"):
        expect_host(spec, THP, host_frame(frame.gpa, 0x7F1C00105080, frame.pfn, 9, 21), vendor=AMD, mce_bank=9)
    with pytest.raises(ValueError, match="through a guest THP"):
        expect_host(get_scenario("host-ar-touch-4k"), LAYOUT, dataclasses.replace(FRAME, host_page_shift=21),
                    vendor=AMD, mce_bank=9)


def test_rows_and_profiles_of_huge_guest_ram_pair_up() -> None:
    hugetlb, plain = get_profile("kvm-hugetlb"), get_profile("kvm-default")
    assert unsupported_under(get_scenario("host-ao-hugetlb-thp"), hugetlb) is None
    assert "run it under kvm-hugetlb" in (unsupported_under(get_scenario("host-ao-hugetlb-thp"), plain) or "")
    assert "not set by the layout" in (unsupported_under(get_scenario("host-ar-touch-4k"), hugetlb) or "")


def test_the_backing_check_wants_what_the_profile_backs_ram_with() -> None:
    """kvm-gmem must be served from a guest_memfd: the slot's fd, and /proc naming that fd one."""
    from gmemtest.verdict import judge_host

    assert get_profile("kvm-gmem").ram_guest_memfd and not get_profile("kvm-default").ram_guest_memfd
    _, host = expect_host(get_scenario("host-ar-touch-4k"), LAYOUT, FRAME, vendor=AMD, mce_bank=9,
                          ram_guest_memfd=True)
    _, hobs = _observed()

    def check(backing: RamBacking) -> tuple[bool, str]:
        c = {c.name: c for c in judge_host(host, dataclasses.replace(hobs, ram_backing=backing))}[BACKING_CHECK]
        return c.ok, c.actual

    assert check(GMEM_RAM) == (True, GMEM_RAM.summary())
    assert check(USERSPACE_RAM)[0] is False
    ok, actual = check(dataclasses.replace(GMEM_RAM, slot_fd_target="/memfd:ram0 (deleted)"))
    assert not ok and "fd 27 of the slot is '/memfd:ram0 (deleted)', not a guest_memfd" in actual
    assert check(dataclasses.replace(GMEM_RAM, slot_fd_target="anon_inode:[kvm-gmem]"))[0]  # 6.18's name
    # Upstream's guest-memfd=on registers the guest_memfd's mapping, not the fd: the slot has none,
    # the VMA behind its hva is the guest_memfd file. A memfd's mapping is userspace memory.
    mapped = RamBacking(memslot=FRAME.memslot.describe(), slot_guest_memfd=-1, slot_fd_target=None,
                        qemu_guest_memfds=(31,), hva_mapping="/[kvm-gmem] (deleted)")
    ok, actual = check(mapped)
    assert ok and actual.startswith("guest_memfd, registered by its mapping"), actual
    assert not check(dataclasses.replace(mapped, hva_mapping="/memfd:ram0 (deleted)"))[0]


def test_a_frame_whose_hva_is_not_the_memslots_is_refused() -> None:
    with pytest.raises(ValueError, match=r"hva 0x7f8692762040 of gpa 0x2961040 is not the memslot's 0x7f8692761040"):
        dataclasses.replace(FRAME, hva=0x7F8692762040)


def test_guest_memfd_ram_may_end_delayed_or_failed_and_failed_is_a_finding_with_the_kernel() -> None:
    """kvm-gmem: guest_memfd keeps the poisoned folio (MF_DELAYED); 7.3.4 counts that as 'Failed'
    and answers EBUSY. Plain RAM must still recover."""
    import errno
    import os

    from gmemtest.verdict import GMEM_DELAYED_FINDING

    exp, host = expect_host(get_scenario("host-ar-touch-4k"), LAYOUT, FRAME, vendor=AMD, mce_bank=9,
                            ram_guest_memfd=True)
    obs, hobs = _observed()
    mapped = RamBacking(memslot=FRAME.memslot.describe(), slot_guest_memfd=-1, slot_fd_target=None,
                        qemu_guest_memfds=(31,), hva_mapping="/[kvm-gmem] (deleted)")
    hobs = dataclasses.replace(hobs, ram_backing=mapped, injection_errno=errno.EBUSY,
                               recovery_lines=[RecoveryLine(FRAME.pfn, "dirty LRU page", "Failed")])
    verdict = judge(exp, obs, (host, hobs))
    assert verdict.passed, verdict.summary()
    (finding,) = verdict.findings
    assert finding.id == GMEM_DELAYED_FINDING and os.uname().release in finding.text and "EBUSY" in finding.text
    delayed = judge(exp, obs, (host, dataclasses.replace(
        hobs, recovery_lines=[RecoveryLine(FRAME.pfn, "dirty LRU page", "Delayed")])))
    assert delayed.passed and not delayed.findings, "MF_DELAYED reported as designed is no finding"
    plain_exp, plain_host = expect_host(get_scenario("host-ar-touch-4k"), LAYOUT, FRAME, vendor=AMD, mce_bank=9)
    plain = judge(plain_exp, obs, (plain_host, dataclasses.replace(
        _observed()[1], recovery_lines=[RecoveryLine(FRAME.pfn, "dirty LRU page", "Failed")])))
    assert [c.name for c in plain.failures] == ["host kernel recovery line (pfn, result)"]


def test_qemu_forwarding_4k_of_a_2m_poisoned_page_is_a_finding_naming_its_version() -> None:
    from gmemtest.verdict import QEMU_LSB_FINDING, host_findings

    _, host = expect_host(get_scenario("host-ar-touch-4k"), LAYOUT, FRAME, vendor=AMD, mce_bank=9)
    _, hobs = _observed()
    huge = dataclasses.replace(hobs, qemu_version="10.0.2 (Debian 1:10.0.2+ds-2)", sent=[
        SentMceerr("send", 207, BUS_MCEERR_AO, 0x7F8692761000, 21, 1234)])
    (finding,) = host_findings(host, huge)
    assert finding.id == QEMU_LSB_FINDING and "QEMU 10.0.2 (Debian" in finding.text and "2048 KiB" in finding.text
    assert not host_findings(host, hobs), "lsb 12 forwarded as 4 KiB is what it should be"


def test_a_deliberately_wrong_expected_lsb_fails_the_row_on_what_the_kernel_sent() -> None:
    """The AO the kernel sends QEMU's main thread is judged on its order: an oracle that expects a
    2 MiB order for the 4 KiB page of a kvm-default row fails that check, and only that one."""
    exp, host = expect_host(get_scenario("host-ar-touch-4k"), LAYOUT, FRAME, vendor=AMD, mce_bank=9)
    ao = host.qemu_sigbus[0]
    assert (ao.si_code, ao.thread, ao.si_addr_lsb) == (BUS_MCEERR_AO, "main", 12)
    wrong = dataclasses.replace(host, qemu_sigbus=(dataclasses.replace(ao, si_addr_lsb=21), *host.qemu_sigbus[1:]))
    obs, hobs = _observed()
    verdict = judge(exp, obs, (wrong, hobs))
    assert [c.name for c in verdict.failures] == [SENT], verdict.summary()
    (failed,) = verdict.failures
    assert "lsb 21 to the main thread" in failed.expected and "lsb 12 to the main thread" in failed.actual
