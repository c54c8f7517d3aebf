"""The oracle and the verdict on recorded layouts and observations.

The layouts are shapes the probe really reports (one entry per 4 KiB page, or one per 2 MiB page);
the observations include the wrong answers a broken host stack gives, which must fail.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from gmemtest_test_support import probe_sigbus

from gmemtest.observations import (
    MceRecord,
    Observations,
    RecoveryLine,
    parse_hardware_corrupted_kb,
    parse_mce_records,
    parse_panic_message,
    parse_recovery_lines,
)
from gmemtest.oracle import MappingLayout, PageLayout, expect
from gmemtest.scenarios import SCENARIOS, get_scenario
from gmemtest.verdict import judge
from guests.probe_client import SigbusReport
from host_stack.mm_uapi import BUS_MCEERR_AO, BUS_MCEERR_AR

SRAO = 0xBD000000000000C0
SRAR = 0xBD80000000000134

ANON = MappingLayout(
    kind="anon4k", base_va=0x7F0000000000, size=0x4000, page_size=0x1000,
    # Deliberately non-contiguous PFNs: the oracle must use the page that holds the offset.
    pages=(PageLayout(0x7F0000000000, 0x1234), PageLayout(0x7F0000001000, 0x0999),
           PageLayout(0x7F0000002000, 0x5000), PageLayout(0x7F0000003000, 0x0042)),
)
HUGE = MappingLayout(kind="hugetlb2m", base_va=0x7F0000200000, size=0x200000, page_size=0x200000,
                     pages=(PageLayout(0x7F0000200000, 0x12600),))


def good_observations(exp_gpa: int, status: int, sig: SigbusReport | None, *, ar: bool,
                      events: int = 1) -> Observations:
    obs = Observations()
    if sig is not None:
        obs.sigbus.append(sig)
    obs.memory_failure_events = [
        {"recipient": "guest", "action": "inject", "flags": {"action-required": ar, "recursive": False}}
    ] * events
    obs.mce_records = [MceRecord(9, status, exp_gpa & ~0xFFF, 0x8C)]
    obs.recovery_lines = [RecoveryLine(exp_gpa >> 12, "dirty LRU page", "Recovered")]
    obs.hardware_corrupted_before_kb, obs.hardware_corrupted_after_kb = 0, 4
    obs.hwpoison_flag = True
    return obs


def test_touch_4k_expects_touched_address_and_page_of_poison() -> None:
    spec = get_scenario("srao-late-touch-4k")
    exp = expect(spec, ANON, vcpus=1, mce_status=SRAO, mce_misc=0x8C, mce_bank=9)
    assert exp.poison_gpa == (0x0999 << 12) + 0x80
    assert exp.sigbus is not None
    assert (exp.sigbus.si_code, exp.sigbus.si_addr, exp.sigbus.si_addr_lsb) == (
        BUS_MCEERR_AR, ANON.base_va + 0x1238, 12)
    sig = probe_sigbus(BUS_MCEERR_AR, ANON.base_va + 0x1238, 12, "touch")
    obs = good_observations(exp.poison_gpa, SRAO, sig, ar=False)
    verdict = judge(exp, obs)
    assert verdict.passed, verdict.summary()


def test_early_kill_expects_page_aligned_ao() -> None:
    exp = expect(get_scenario("srao-early-kill-prctl-4k"), ANON, vcpus=1, mce_status=SRAO, mce_misc=0x8C, mce_bank=9)
    assert exp.sigbus is not None
    assert (exp.sigbus.si_code, exp.sigbus.si_addr) == (BUS_MCEERR_AO, ANON.base_va + 0x2000)


def test_hugetlb_lsb_21_and_seed_style_per_page_signal_fails() -> None:
    spec = get_scenario("srao-late-touch-hugetlb")
    exp = expect(spec, HUGE, vcpus=1, mce_status=SRAO, mce_misc=0x8C, mce_bank=9)
    assert exp.sigbus is not None and exp.sigbus.si_addr_lsb == 21
    assert exp.poison_gpa == (0x12600 << 12) + 0x3080
    assert exp.hwpoison_pfn == 0x12603  # the raw frame that was hit, not the head
    # The seed's bug class: a per-4KiB signal (lsb 12) where the whole 2 MiB page is gone.
    bad = good_observations(exp.poison_gpa, SRAO, probe_sigbus(BUS_MCEERR_AR, exp.sigbus.si_addr, 12, "touch"),
                            ar=False)
    verdict = judge(exp, bad)
    assert not verdict.passed
    (failure,) = verdict.failures
    assert failure.line() == "FAIL si_addr_lsb: expected 21, actual 12"


def test_wrong_gpa_in_guest_record_fails_with_both_addresses() -> None:
    exp = expect(get_scenario("srao-late-touch-4k"), ANON, vcpus=1, mce_status=SRAO, mce_misc=0x8C, mce_bank=9)
    assert exp.sigbus is not None
    obs = good_observations(exp.poison_gpa, SRAO, probe_sigbus(BUS_MCEERR_AR, exp.sigbus.si_addr, 12, "touch"),
                            ar=False)
    obs.mce_records = [MceRecord(9, SRAO, 0x1234000, 0x8C)]
    failures = judge(exp, obs).failures
    assert [f.name for f in failures] == ["mce_record of bank 9 (status, addr)"]
    assert f"{exp.poison_gpa & ~0xFFF:#x}" in failures[0].expected and "0x1234000" in failures[0].actual


def test_mce_record_addr_follows_misc_granularity() -> None:
    from gmemtest.oracle import mce_record_addr
    assert mce_record_addr(0x29E8080, 0x8C) == 0x29E8000  # lsb 12, physical mode
    assert mce_record_addr(0x29E8080, 0x95) == 0x2800000  # lsb 21, physical mode
    assert mce_record_addr(0x29E8080, 0x0C) == 0x29E8080  # mode 0: not masked


def test_missing_signal_and_extra_signal_fail() -> None:
    exp = expect(get_scenario("srar-user-spin-4k"), ANON, vcpus=1, mce_status=SRAR, mce_misc=0x8C, mce_bank=9)
    obs = good_observations(exp.poison_gpa, SRAR, None, ar=True)
    assert {f.name for f in judge(exp, obs).failures} >= {"sigbus count", "si_code", "si_addr"}
    panic = expect(get_scenario("srar-kernel-panic"), ANON, vcpus=1, mce_status=SRAR, mce_misc=0x8C, mce_bank=9)
    extra = good_observations(panic.poison_gpa, SRAR, probe_sigbus(BUS_MCEERR_AR, 0x1000, 12, "wait"), ar=True)
    names = {f.name for f in judge(panic, extra).failures}
    assert {"sigbus count", "guest panicked (GUEST_PANICKED)", "panic message on the serial console",
            "MCE severity on the serial console"} <= names


def test_broadcast_expects_one_event_per_vcpu() -> None:
    exp = expect(get_scenario("srao-broadcast-smp2-4k"), ANON, vcpus=2, mce_status=SRAO, mce_misc=0x8C, mce_bank=9)
    assert exp.sigbus is not None
    sig = probe_sigbus(BUS_MCEERR_AR, exp.sigbus.si_addr, 12, "touch")
    assert judge(exp, good_observations(exp.poison_gpa, SRAO, sig, ar=False, events=2)).passed
    assert not judge(exp, good_observations(exp.poison_gpa, SRAO, sig, ar=False, events=1)).passed


def test_touch_outside_poisoned_unit_is_refused() -> None:
    spec = get_scenario("srao-late-touch-4k")
    bad = type(spec)(**{**spec.__dict__, "name": "bad", "touch_offset": 0x3000})
    with pytest.raises(ValueError, match="outside the poisoned unit"):
        expect(bad, ANON, vcpus=1, mce_status=SRAO, mce_misc=0x8C, mce_bank=9)
    with pytest.raises(ValueError, match="outside the mapping"):
        ANON.page_for(0x1000)


def test_scenario_table_is_consistent() -> None:
    assert len({s.name for s in SCENARIOS}) == len(SCENARIOS)
    with pytest.raises(ValueError, match="unknown scenario 'nope'; valid: srao-late-touch-4k"):
        get_scenario("nope")
    spec = SCENARIOS[0]
    with pytest.raises(ValueError, match="page kind 'tiny' is not one of"):
        type(spec)(**{**spec.__dict__, "page_kind": "tiny"})


def test_parsers_on_guest_text() -> None:
    meminfo = "MemTotal:  500000 kB\nHardwareCorrupted:     4 kB\n"
    assert parse_hardware_corrupted_kb(meminfo) == 4
    with pytest.raises(ValueError, match="HardwareCorrupted"):
        parse_hardware_corrupted_kb("MemTotal: 1 kB\n")
    dmesg = "[   12.3] Memory failure: 0x1a2b3: recovery action for dirty LRU page: Recovered\n"
    assert parse_recovery_lines(dmesg) == [RecoveryLine(0x1A2B3, "dirty LRU page", "Recovered")]
    # As recorded by a Debian 6.1 guest (the SYND column is newer than the header comment).
    trace = ("     kworker/0:2-47      [000] .....     2.189091: mce_record: CPU: 0, MCGc/s: 100010a/5, "
             "MC9: bd000000000000c0, IPID: 0000000000000000, ADDR/MISC/SYND: 00000000029e8000/000000000000008c/"
             "0000000000000000, RIP: 10:<ffffffff81a592eb>, TSC: 1617583b5, PROCESSOR: 0:663")
    assert parse_mce_records(trace) == [MceRecord(9, SRAO, 0x29E8000, 0x8C)]
    assert parse_panic_message("x\nKernel panic - not syncing: Fatal machine check\n") == "Fatal machine check"
    assert parse_panic_message("all quiet") is None


PANIC_CONSOLE = """\
[    1.963918] mce: [Hardware Error]: CPU 0: Machine Check Exception: 7 Bank 9: bd80000000000134
[    1.965445] mce: [Hardware Error]: RIP 10:<ffffffff81a592eb> {native_safe_halt+0xb/0x10}
[    1.966725] mce: [Hardware Error]: TSC 13ac98afa ADDR 29dc000 MISC 8c
[    1.967154] mce: [Hardware Error]: Machine check: Data load in unrecoverable area of kernel
[    1.967263] Kernel panic - not syncing: Fatal machine check on current CPU
"""


def test_panic_console_parsed_and_judged() -> None:
    from gmemtest.observations import parse_console_mce_records, parse_mce_severity
    assert parse_console_mce_records(PANIC_CONSOLE) == [MceRecord(9, SRAR, 0x29DC000, 0x8C)]
    assert parse_mce_severity(PANIC_CONSOLE) == "Data load in unrecoverable area of kernel"
    layout = MappingLayout(kind="anon4k", base_va=0x7F0000000000, size=0x4000, page_size=0x1000,
                           pages=tuple(PageLayout(0x7F0000000000 + i * 0x1000, 0x29DB + i) for i in range(4)))
    exp = expect(get_scenario("srar-kernel-panic"), layout, vcpus=1, mce_status=SRAR, mce_misc=0x8C, mce_bank=9)
    obs = Observations()
    obs.memory_failure_events = [
        {"recipient": "guest", "action": "inject", "flags": {"action-required": True, "recursive": False}}]
    obs.guest_panicked_events = [{"action": "run"}]
    obs.mce_records = parse_console_mce_records(PANIC_CONSOLE)
    obs.mce_severity = parse_mce_severity(PANIC_CONSOLE)
    obs.panic_message = parse_panic_message(PANIC_CONSOLE)
    verdict = judge(exp, obs)
    assert verdict.passed, verdict.summary()
    obs.mce_severity = "Action required: data load in error recoverable area of kernel"
    assert [f.name for f in judge(exp, obs).failures] == ["MCE severity on the serial console"]


def test_the_probes_code_is_its_executable_mappings() -> None:
    """Where the user-mode SRAR may land: the probe's r-xp lines (text, vDSO), nothing else."""
    from gmemtest.acts import parse_probe_code
    from gmemtest.errors import ScenarioError
    maps = ("00400000-00401000 r--p 00000000 00:02 313 /usr/bin/gmem-probe\n"
            "00401000-00482000 r-xp 00001000 00:02 313 /usr/bin/gmem-probe\n"
            "2f78f000-2f7b1000 rw-p 00000000 00:00 0 [heap]\n"
            "7ffd85364000-7ffd85366000 r-xp 00000000 00:00 0 [vdso]\n")
    code = parse_probe_code(maps)
    assert code.holds(0x4031C8) and code.holds(0x7FFD85364010)
    assert not code.holds(0x400800) and not code.holds(0x482000) and not code.holds(0x2F790000)
    assert str(code) == "/usr/bin/gmem-probe 0x401000-0x482000, [vdso] 0x7ffd85364000-0x7ffd85366000"
    with pytest.raises(ScenarioError, match="no executable mapping"):
        parse_probe_code("2f78f000-2f7b1000 rw-p 00000000 00:00 0 [heap]\n")


def test_a_broadcast_srar_expects_action_required_only_on_the_target_vcpu_and_the_rendezvous_panic() -> None:
    """Measured under tcg-smp2-broadcast: the other vCPU's MEMORY_FAILURE is not action-required,
    and the monarch panics from mce_reign() ("Fatal machine check"), not "... on current CPU"."""
    import dataclasses

    from gmemtest.oracle import ExpectedMemoryFailureEvent, MappingLayout, PageLayout, expect
    from gmemtest.scenarios import get_scenario

    spec = dataclasses.replace(get_scenario("srar-kernel-panic"), broadcast=True)
    layout = MappingLayout(kind="anon4k", base_va=0x7F0000000000, size=0x4000, page_size=0x1000,
                           pages=tuple(PageLayout(0x7F0000000000 + i * 0x1000, 0x3000 + i) for i in range(4)),
                           is_thp=False)
    exp = expect(spec, layout, vcpus=2, mce_status=0xBD80000000000134, mce_misc=0x8C, mce_bank=9)
    assert exp.memory_failure_events == (ExpectedMemoryFailureEvent("guest", "inject", True, False),
                                         ExpectedMemoryFailureEvent("guest", "inject", False, False))
    assert exp.panic_reason == "Fatal machine check"
    lone = expect(get_scenario("srar-kernel-panic"), layout, vcpus=1, mce_status=0xBD80000000000134,
                  mce_misc=0x8C, mce_bank=9)
    assert lone.panic_reason == "Fatal machine check on current CPU"


def test_a_broadcast_scenario_is_refused_under_a_profile_that_does_not_broadcast() -> None:
    from gmemtest.scenarios import get_scenario, unsupported_under
    from guests.profiles import get_profile

    spec = get_scenario("srao-broadcast-smp2-4k")
    assert unsupported_under(spec, get_profile("tcg-smp2-broadcast")) is None
    reason = unsupported_under(spec, get_profile("tcg-default"))
    assert reason is not None and "is not a broadcast profile" in reason, reason
    assert unsupported_under(get_scenario("srao-late-touch-4k"), get_profile("tcg-default")) is None


def _layout4k(n: int = 4) -> Any:
    from gmemtest.oracle import MappingLayout, PageLayout

    return MappingLayout(kind="anon4k", base_va=0x7F0000000000, size=n * 0x1000, page_size=0x1000,
                         pages=tuple(PageLayout(0x7F0000000000 + i * 0x1000, 0x3000 + 7 * i) for i in range(n)),
                         is_thp=False)


def test_two_poisoned_pages_expect_two_sigbus_each_at_its_own_address_and_two_recoveries() -> None:
    from gmemtest.observations import MceRecord, Observations, RecoveryLine
    from gmemtest.oracle import expect
    from gmemtest.scenarios import get_scenario
    from gmemtest.verdict import judge

    spec = get_scenario("srao-late-touch-two-4k")
    exp = expect(spec, _layout4k(), vcpus=1, mce_status=0xBD000000000000C0, mce_misc=0x8C, mce_bank=9)
    assert [s.si_addr for s in exp.sigbus_all] == [0x7F0000001238, 0x7F0000003100]
    assert exp.poison_pfns == (0x3007, 0x3015) and exp.hardware_corrupted_delta_kb == 8
    assert len(exp.memory_failure_events) == 2
    events = [{"recipient": "guest", "action": "inject", "flags": {"action-required": False, "recursive": False}}] * 2
    good = Observations(sigbus=[probe_sigbus(4, 0x7F0000001238, 12, "touch"),
                                probe_sigbus(4, 0x7F0000003100, 12, "touch")],
                        memory_failure_events=list(events), hardware_corrupted_before_kb=0,
                        hardware_corrupted_after_kb=8, hwpoison_flag=True,
                        recovery_lines=[RecoveryLine(0x3007, "dirty LRU page", "Recovered"),
                                        RecoveryLine(0x3015, "dirty LRU page", "Recovered")],
                        mce_records=[MceRecord(9, 0xBD000000000000C0, 0x3007000, 0x8C),
                                     MceRecord(9, 0xBD000000000000C0, 0x3015000, 0x8C)])
    assert judge(exp, good).passed, judge(exp, good).summary()
    # Both signals at the first page's address: the second check names the second SIGBUS.
    same = dataclasses.replace(good, sigbus=[good.sigbus[0], good.sigbus[0]])
    failures = judge(exp, same).failures
    assert [c.name for c in failures] == ["si_addr of SIGBUS 2"], judge(exp, same).summary()
    assert "expected 0x7f0000003100, actual 0x7f0000001238" in failures[0].line()


def test_a_thp_verdict_reads_back_every_other_piece_and_fails_on_a_lost_neighbour() -> None:
    from gmemtest.observations import Observations
    from gmemtest.oracle import MappingLayout, PageLayout, expect
    from gmemtest.scenarios import get_scenario
    from gmemtest.verdict import judge

    spec = get_scenario("srao-late-touch-thp")
    layout = MappingLayout(kind="thp", base_va=0x7F0000000000, size=2 << 20, page_size=0x1000,
                           pages=tuple(PageLayout(0x7F0000000000 + i * 0x1000, 0x8000 + i) for i in range(512)),
                           is_thp=True)
    exp = expect(spec, layout, vcpus=1, mce_status=0xBD000000000000C0, mce_misc=0x8C, mce_bank=9)
    assert len(exp.intact_offsets) == 511 and spec.poison_offset not in exp.intact_offsets
    assert all(o & 0xFFF == spec.poison_offset & 0xFFF for o in exp.intact_offsets)
    lost = Observations(intact_checked=511, intact_mismatches=["offset 0x6080: read 0x00, pattern 0x5a"])
    check = next(c for c in judge(exp, lost).checks if "pieces read their pattern" in c.name)
    assert not check.ok and "0x6080" in check.actual, check.line()


def test_a_free_page_expects_no_sigbus_and_a_free_buddy_recovery() -> None:
    from gmemtest.oracle import expect, free_page_layout
    from gmemtest.scenarios import get_scenario

    exp = expect(get_scenario("srao-free-page"), free_page_layout(0x1EA00), vcpus=1,
                 mce_status=0xBD000000000000C0, mce_misc=0x8C, mce_bank=9)
    assert exp.sigbus is None and exp.sigbus_all == ()
    assert exp.poison_gpa == 0x1EA00080 and exp.recovery_page_type == "free buddy page"
    assert exp.hwpoison_pfn == 0x1EA00 and exp.hardware_corrupted_delta_kb == 4


# The AMD rows: what an AuthenticAMD guest (QEMU -cpu host on the lab host) must do with the same
# injections. Measured inside the lab host: SRAR in user mode recovered with ADDR recorded as
# injected; SRAO with the vCPU idle panicked "Uncorrected unrecoverable error in kernel context".
def test_amd_user_mode_srar_recovers_and_records_the_address_as_injected() -> None:
    spec = get_scenario("srar-user-spin-4k")
    exp = expect(spec, ANON, vcpus=1, mce_status=SRAR, mce_misc=0x8C, mce_bank=9, vendor="AuthenticAMD")
    intel = expect(spec, ANON, vcpus=1, mce_status=SRAR, mce_misc=0x8C, mce_bank=9)
    assert not exp.panic and exp.sigbus == intel.sigbus
    assert exp.mce_record_addr == exp.poison_gpa and exp.poison_gpa & 0xFFF, "raw on AMD"
    assert intel.mce_record_addr == exp.poison_gpa & ~0xFFF, "page-aligned by MISC's LSB on Intel"
    assert exp.hardware_corrupted_delta_kb == 4 and exp.recovery_pfn == exp.poison_pfn


@pytest.mark.parametrize("name", [s.name for s in SCENARIOS
                                  if s.trigger.value != "spin" and s.profile == "tcg-default"])
def test_amd_guest_panics_wherever_the_vcpu_is_in_the_kernel(name: str) -> None:
    spec = get_scenario(name)
    layout = ANON if spec.page_kind not in ("hugetlb2m",) else HUGE
    if spec.page_kind == "thp":
        layout = MappingLayout(kind="thp", base_va=0x7F0000000000, size=2 << 20, page_size=0x1000,
                               pages=tuple(PageLayout(0x7F0000000000 + (i << 12), 0x40000 + i) for i in range(512)),
                               is_thp=True)
    exp = expect(spec, layout, vcpus=1, mce_status=SRAO, mce_misc=0x8C, mce_bank=9, vendor="AuthenticAMD")
    assert exp.panic and exp.sigbus is None and exp.sigbus_all == ()
    assert exp.panic_severity == "Uncorrected unrecoverable error in kernel context"
    assert exp.panic_reason == "Fatal local machine check"
    assert exp.hardware_corrupted_delta_kb is None and exp.hwpoison_pfn is None and exp.recovery_pfn is None
    assert exp.more_poison == () and exp.intact_offsets == (), "no second injection, no read-back after a panic"
    obs = Observations(guest_panicked_events=[{"action": "run"}], panic_message="Fatal local machine check",
                       mce_severity="Uncorrected unrecoverable error in kernel context")
    obs.memory_failure_events = [{"recipient": "guest", "action": "inject",
                                  "flags": {"action-required": spec.mce_kind == "SRAR", "recursive": False}}]
    obs.mce_records = [MceRecord(9, SRAO, exp.mce_record_addr, 0x8C)]
    verdict = judge(exp, obs)
    assert verdict.passed, verdict.summary()
    intel_survivor = dataclasses.replace(obs, guest_panicked_events=[], panic_message=None, mce_severity=None)
    assert not judge(exp, intel_survivor).passed, "an AMD guest that did not panic must fail its row"


def test_unknown_vendor_is_named() -> None:
    with pytest.raises(ValueError, match="vendor 'HygonGenuine' has no machine-check oracle; known: GenuineIntel, "
                                         "AuthenticAMD"):
        expect(get_scenario("srar-user-spin-4k"), ANON, vcpus=1, mce_status=SRAR, mce_misc=0x8C, mce_bank=9,
               vendor="HygonGenuine")
