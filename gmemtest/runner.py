"""Run one scenario on a booted guest: prepare -> inject -> observe -> judge, keeping evidence.

The order is symmetric with the kernel's memory-failure selftest: the probe maps and reports the
layout, the oracle derives the expectation from that layout, QEMU injects, and only then are the
observers read. Every file written lands in the scenario's evidence directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from paramiko import Channel

from gmemtest.guest_run import GuestRun, booted_guest, set_aside
from gmemtest.host_poison import HostInjection, HostPoison, resolve_host_frame
from gmemtest.observations import (
    HostObservations,
    Observations,
    parse_console_mce_records,
    parse_hardware_corrupted_kb,
    parse_kvm_trace,
    parse_mce_records,
    parse_mce_severity,
    parse_panic_message,
    parse_recovery_lines,
)
from gmemtest.oracle import (
    Expectation,
    HostExpectation,
    MappingLayout,
    PageLayout,
    expect,
    expect_host,
    free_page_layout,
)
from gmemtest.scenarios import KillPolicy, ScenarioSpec, Source, Trigger
from gmemtest.verdict import judge
from guests.probe_client import Mapping, ProbeClient, ProbeError, SigbusReport
from guests.profiles import GuestProfile
from guests.ssh import SshError
from host_stack import mm_uapi
from host_stack.kvm_uapi import KVM_EXIT_SHUTDOWN
from images.build import GuestImage
from outcome import Verdict
from qmp_helpers import DEFAULT_QEMU, MachineStateError, MachineStuck, MceInjection, mce_kind
from qmp_helpers.trace_log import TRACE_PREFIX

LOG = logging.getLogger(__name__)

PROBE_PATH = "/usr/bin/gmem-probe"
TRACE_DIR = "/sys/kernel/tracing"
# The guest's MCE poll interval (arch/x86/kernel/cpu/mce/core.c, check_interval; 0 = no polling).
MCE_POLL_PATH = "/sys/devices/system/machinecheck/machinecheck0/check_interval"
# QEMU's KVM trace events (accel/kvm/trace-events) switched on over the injection window of a
# KVM guest: which private/shared conversions and memory-fault exits happened, and how many exits.
KVM_TRACE_EVENTS = ("kvm_convert_memory", "kvm_memory_fault", "kvm_run_exit")
# How long QEMU gets to forward a host poison (its SIGBUS handler, then the MEMORY_FAILURE event).
FORWARD_TIMEOUT_S = 10.0
MCE_BANK = 9
# Seconds the probe is told to wait or spin; the injection happens well inside this window.
PROBE_WINDOW_S = 15
# How long the guest gets to handle an action-optional MCE before the probe touches the page.
RECOVERY_TIMEOUT_S = 15.0


class ScenarioError(Exception):
    """The scenario could not be carried out as specified (not a verdict on the host stack)."""


Injection = MceInjection | HostInjection


@dataclass
class ScenarioResult:
    spec: ScenarioSpec
    expectation: Expectation
    observations: Observations
    verdict: Verdict
    injection: Injection
    evidence_dir: Path
    host: tuple[HostExpectation, HostObservations] | None = None


def layout_of(mapping: Mapping) -> MappingLayout:
    return MappingLayout(
        kind=mapping.kind, base_va=mapping.va, size=mapping.size, page_size=mapping.page_size,
        pages=tuple(PageLayout(p.va, p.pfn) for p in mapping.pages), is_thp=mapping.thp,
    )


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, default=lambda o: o.value if hasattr(o, "value") else str(o)) + "\n")


class _Evidence:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def text(self, name: str, content: str) -> None:
        (self.dir / name).write_text(content)

    def json(self, name: str, payload: Any) -> None:
        _write_json(self.dir / name, payload)


def _hardware_corrupted(guest: GuestRun) -> int:
    return parse_hardware_corrupted_kb(guest.guest_text("cat /proc/meminfo"))


def _wait_recovery(guest: GuestRun, before_kb: int, pages: int = 1) -> None:
    """Action-optional MCEs are handled from a work queue: wait until the guest counted the pages."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        if _hardware_corrupted(guest) >= before_kb + pages * 4:
            return
        time.sleep(0.05)
    LOG.warning("guest did not count %d corrupted page(s) within %.0fs; going on", pages, RECOVERY_TIMEOUT_S)


def _kpageflags(guest: GuestRun, pfns: list[int]) -> dict[int, int]:
    """The guest kernel's /proc/kpageflags word of each pfn, in one short SSH command (busybox dd, od)."""
    script = (f"for p in {' '.join(map(str, pfns))}; do "
              "dd if=/proc/kpageflags bs=8 skip=$p count=1 2>/dev/null | od -An -tx8; done")
    words = guest.guest_text(script).split()
    if len(words) != len(pfns):
        raise ScenarioError(f"reading /proc/kpageflags of {len(pfns)} pfns gave {len(words)} words: {words[:4]}")
    return {pfn: int(word, 16) for pfn, word in zip(pfns, words, strict=True)}


def _find_free_pfn(guest: GuestRun) -> int:
    """A frame at the head of a free buddy block (KPF_BUDDY) high in guest RAM, nothing else set.

    Heads of 2 MiB-aligned blocks high up are the least likely to be allocated in the moment
    between this read and the injection; the runner reads the flag again right before injecting.
    """
    top = guest.profile.memory_mib << (20 - 12)
    candidates = list(range(top - 512, top // 2, -512))[:32]
    for pfn, flags in _kpageflags(guest, candidates).items():
        if flags == 1 << mm_uapi.KPF_BUDDY:
            return pfn
    raise ScenarioError(f"no free buddy block head among pfns {candidates[-1]:#x}..{candidates[0]:#x} "
                        "(/proc/kpageflags): the guest has no free 2 MiB block to poison")


@dataclass(frozen=True)
class ProbeCode:
    """The probe's executable mappings (its text and the vDSO it reads the clock through)."""

    ranges: tuple[tuple[int, int, str], ...]

    def holds(self, rip: int) -> bool:
        return any(start <= rip < end for start, end, _ in self.ranges)

    def __str__(self) -> str:
        return ", ".join(f"{name} {start:#x}-{end:#x}" for start, end, name in self.ranges)


def parse_probe_code(maps: str) -> ProbeCode:
    """The executable (``r-xp``) lines of a /proc/PID/maps text."""
    ranges: list[tuple[int, int, str]] = []
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) >= 2 and "x" in fields[1]:
            start, end = (int(v, 16) for v in fields[0].split("-"))
            ranges.append((start, end, fields[5] if len(fields) > 5 else "anonymous"))
    if not ranges:
        raise ScenarioError(f"no executable mapping in the probe's /proc/PID/maps: {maps[:300]!r}")
    return ProbeCode(tuple(ranges))


def _probe_code(guest: GuestRun, pid: int) -> ProbeCode:
    return parse_probe_code(guest.guest_text(f"cat /proc/{pid}/maps"))


def _check_intact(probe: ProbeClient, mapping: Mapping, exp: Expectation, obs: Observations) -> None:
    """Read one byte of every piece that must have survived; record the ones that did not."""
    for offset in exp.intact_offsets:
        reply = probe.touch(mapping.id, offset)
        obs.intact_checked += 1
        if isinstance(reply, SigbusReport):
            obs.intact_mismatches.append(f"offset {offset:#x}: SIGBUS (si_addr {reply.si_addr:#x})")
        elif reply.value != mapping.expected_value(offset):
            obs.intact_mismatches.append(f"offset {offset:#x}: read {reply.value:#04x}, "
                                         f"pattern {mapping.expected_value(offset):#04x}")


def _confirm_pattern_at_gpa(guest: GuestRun, mapping: Mapping, offset: int, gpa: int, ev: _Evidence) -> None:
    """QEMU's own read of ``gpa`` must hold the probe's pattern before anything is injected there.

    The GPA comes from the guest kernel's pagemap; a guest that reported a wrong frame would make
    the oracle and the injection agree on the wrong page and the verdict pass. QEMU's ``pmemsave``
    is an independent witness that this GPA backs the probe's bytes.
    """
    size = min(64, mapping.size - offset, 4096 - (gpa & 0xFFF))
    expected = bytes(mapping.expected_value(offset + i) for i in range(size))
    actual = guest.machine.read_physical(gpa, size)
    ev.json("gpa-interlock.json", {"gpa": gpa, "offset": offset, "size": size,
                                   "expected": expected.hex(), "qemu_read": actual.hex()})
    if actual != expected:
        raise ScenarioError(f"QEMU reads {actual[:16].hex()}... at gpa {gpa:#x}, but the probe wrote "
                            f"{expected[:16].hex()}... at offset {offset:#x} of mapping {mapping.id}: the guest's "
                            "pagemap does not name the frame behind the probe's page; refusing to inject")


def _wait_probe_syscall(guest: GuestRun, pid: int, accept: Callable[[str], bool], *, doing: str, expected: str,
                        timeout: float = 10.0) -> None:
    """Poll the guest's /proc/PID/syscall of the probe until ``accept`` takes what it says."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = guest.guest_text(f"cat /proc/{pid}/syscall").strip()
        if accept(state):
            return
        time.sleep(0.02)
    raise ScenarioError(f"the probe (pid {pid}) did not {doing} within {timeout:.0f}s: "
                        f"/proc/{pid}/syscall last said {state!r}, expected {expected}")


def _wait_probe_in_user_mode(guest: GuestRun, pid: int) -> None:
    """Until the probe runs its spin loop: /proc/PID/syscall says ``running`` in user mode."""
    _wait_probe_syscall(guest, pid, lambda state: state == "running", doing="start spinning", expected="'running'")


_SLEEP_SYSCALLS = (str(mm_uapi.SYS_CLOCK_NANOSLEEP), str(mm_uapi.SYS_NANOSLEEP))


def _wait_probe_sleeping(guest: GuestRun, pid: int) -> None:
    """Until the probe sleeps in its 'wait' (clock_nanosleep in /proc/PID/syscall).

    Injecting right after sending 'wait' raced the probe's read of the command: in restored
    guests (cold code) the AO often arrived while the probe was still idle, so the wait then ran
    its whole window (15 s) after the signal. The window must start before the injection.
    """
    _wait_probe_syscall(guest, pid, lambda state: state.split(" ", 1)[0] in _SLEEP_SYSCALLS,
                        doing="sleep in its wait",
                        expected=f"syscall {mm_uapi.SYS_CLOCK_NANOSLEEP} (clock_nanosleep) or {mm_uapi.SYS_NANOSLEEP}")


_VENDOR_RE = re.compile(r"^vendor_id\s*:\s*(\S+)", re.MULTILINE)


def _cpu_vendor(guest: GuestRun) -> str:
    """The guest vCPU's vendor as the guest kernel sees it (the oracle grades MCEs by it)."""
    text = guest.guest_text("grep -m1 vendor_id /proc/cpuinfo")
    match = _VENDOR_RE.search(text)
    if match is None:
        raise ScenarioError(f"no vendor_id line in the guest's /proc/cpuinfo: {text!r}")
    return match.group(1)


def run_scenario(spec: ScenarioSpec, guest: GuestRun, evidence_dir: Path) -> ScenarioResult:
    """Carry out `spec` on `guest` and judge it. Raises ScenarioError when a precondition fails."""
    if guest.profile.mce_broadcast and not spec.broadcast:
        # The profile's CPU takes MCEs only as a broadcast; the scenario is otherwise the same,
        # and the oracle then expects one MEMORY_FAILURE per vCPU.
        spec = replace(spec, broadcast=True)
    ev = _Evidence(evidence_dir)
    kind = mce_kind(spec.mce_kind)
    obs = Observations()
    setup = {"variant": f"{spec.name}/{guest.profile.name}", **guest.launch_record()}
    ev.json("setup.json", setup)

    if spec.kill is KillPolicy.EARLY_SYSCTL:
        guest.guest_text("echo 1 > /proc/sys/vm/memory_failure_early_kill")
    if spec.guest_mce_poll_s is not None:
        guest.guest_text(f"echo {spec.guest_mce_poll_s} > {MCE_POLL_PATH}")
        setup["guest_mce_poll_s"] = int(guest.guest_text(f"cat {MCE_POLL_PATH}").strip())
    guest.guest_text(f"echo > {TRACE_DIR}/trace")
    obs.hardware_corrupted_before_kb = _hardware_corrupted(guest)

    vendor = _cpu_vendor(guest)
    setup["guest_cpu_vendor"] = vendor
    ev.json("setup.json", setup)
    channel = guest.ssh.start(PROBE_PATH)
    probe = ProbeClient(channel, abort=lambda: _panic_sentence(guest))
    injection: Injection | None = None
    host: tuple[HostExpectation, HostObservations] | None = None
    stack = contextlib.ExitStack()
    try:
        if spec.kill is KillPolicy.EARLY_PRCTL:
            probe.set_kill("early")
        elif spec.kill is KillPolicy.LATE_PRCTL:
            probe.set_kill("late")
        mapping: Mapping | None = None
        if spec.page_kind == "free":
            layout = free_page_layout(_find_free_pfn(guest))
        else:
            mapping = probe.map(spec.page_kind, spec.npages)
            if spec.page_kind == "thp" and not mapping.thp:
                raise ScenarioError(f"{spec.name}: the probe's region is not backed by a THP (kpageflags); "
                                    "is transparent_hugepage=madvise set and memory unfragmented?")
            layout = layout_of(mapping)
        exp = expect(spec, layout, vcpus=guest.profile.smp, mce_status=kind.status, mce_misc=kind.misc,
                     mce_bank=MCE_BANK, vendor=vendor)
        LOG.info("%s: %s page at gpa %#x (pfn %#x) is the target", spec.name, spec.page_kind, exp.poison_gpa,
                 exp.poison_pfn)
        ev.json("layout.json", asdict(layout))
        ev.json("expectation.json", asdict(exp))
        if mapping is not None:
            located = probe.locate(mapping.id, spec.poison_offset)
            if located.gpa != exp.poison_gpa:
                raise ScenarioError(f"{spec.name}: layout changed before injection: oracle gpa {exp.poison_gpa:#x}, "
                                    f"probe locate gpa {located.gpa:#x}")
            _confirm_pattern_at_gpa(guest, mapping, spec.poison_offset, exp.poison_gpa, ev)
            if exp.more_poison:  # none where the oracle expects a panic at the first injection
                assert spec.second_poison_offset is not None
                _confirm_pattern_at_gpa(guest, mapping, spec.second_poison_offset, exp.more_poison[0][0], ev)
        else:
            flags = _kpageflags(guest, [exp.poison_pfn])[exp.poison_pfn]
            ev.json("free-page.json", {"pfn": exp.poison_pfn, "kpageflags": flags})
            if flags != 1 << mm_uapi.KPF_BUDDY:
                raise ScenarioError(f"{spec.name}: pfn {exp.poison_pfn:#x} was allocated before the injection "
                                    f"(kpageflags {flags:#x}, expected only KPF_BUDDY); refusing to inject")

        machine = guest.machine
        if guest.profile.accel == "kvm":  # what QEMU told KVM its guest memory is (qmp_helpers.memslots)
            ev.text("memslots.txt", "".join(s.describe() + "\n" for s in machine.memslots()) or
                    "<no kvm_set_user_memory line in QEMU's stderr>\n")
        poison: HostPoison | None = None
        if spec.source is Source.HOST:
            assert mapping is not None, "host-poison rows map anonymous pages"
            frame = resolve_host_frame(machine, exp.poison_gpa, _pattern(mapping, spec.poison_offset))
            exp, hexp = expect_host(spec, layout, frame, vendor=vendor, mce_bank=MCE_BANK,
                                    ram_guest_memfd=guest.profile.ram_guest_memfd)
            ev.json("host-frame.json", asdict(frame))
            ev.json("expectation.json", {**asdict(exp), "host": asdict(hexp)})
            poison = stack.enter_context(HostPoison(machine, frame))
        if guest.profile.confidential:
            exp = replace(exp, conversions=None)  # the guest converts as it likes: recorded, not judged
        trace_mark = _kvm_trace(guest, on=True)
        try:
            reply: object = None
            if poison is not None:
                assert mapping is not None
                injection, reply = _inject_from_host(spec, guest, probe, mapping, poison=poison, hexp=hexp, obs=obs)
            elif exp.panic and not spec.expects_panic:
                # The oracle says this guest cannot recover here (an AMD vCPU idling in the
                # kernel): inject as the row says, then only watch the panic.
                if spec.trigger is Trigger.WAIT:
                    probe.begin_wait(PROBE_WINDOW_S)
                    _wait_probe_sleeping(guest, probe.pid)
                injection = machine.inject_mce_at(kind, exp.poison_gpa, lambda state: state.cpl == 0,
                                                  what="in the kernel (CPL 0), where the oracle grades it fatal",
                                                  broadcast=spec.broadcast)
            elif spec.trigger is Trigger.TOUCH:
                assert mapping is not None and spec.touch_offset is not None
                injection = machine.inject_mce(kind, exp.poison_gpa, broadcast=spec.broadcast)
                more: list[MceInjection] = []
                for n, (gpa, _) in enumerate(exp.more_poison, start=1):
                    # One MCE at a time: a second one while the guest still handles the first
                    # (MCG_STATUS.MCIP set) is recursive, and QEMU resets the guest (measured:
                    # MEMORY_FAILURE action 'reset', then RESET).
                    _wait_recovery(guest, obs.hardware_corrupted_before_kb, pages=n)
                    more.append(machine.inject_mce(kind, gpa, broadcast=spec.broadcast))
                if more:
                    ev.json("injection-more.json", [asdict(m) for m in more])
                _wait_recovery(guest, obs.hardware_corrupted_before_kb, pages=1 + len(more))
                reply = probe.touch(mapping.id, spec.touch_offset)
                if spec.second_touch_offset is not None:
                    probe.touch(mapping.id, spec.second_touch_offset)
                _check_intact(probe, mapping, exp, obs)
            elif spec.trigger is Trigger.WAIT:
                probe.begin_wait(PROBE_WINDOW_S)
                _wait_probe_sleeping(guest, probe.pid)
                injection = machine.inject_mce(kind, exp.poison_gpa, broadcast=spec.broadcast)
                reply = probe.finish_wait(PROBE_WINDOW_S + 10)
            elif spec.trigger is Trigger.SPIN:
                code = _probe_code(guest, probe.pid)
                probe.begin_spin(PROBE_WINDOW_S)
                _wait_probe_in_user_mode(guest, probe.pid)
                # The SRAR must interrupt the probe's own loop, on the vCPU that runs it: landed in
                # the kernel the guest panics (with 2 vCPUs: always, in native_safe_halt), landed in
                # another program (sshd finishing the last command) nobody that maps the page is
                # signalled (CI saw that: sigbus count 0). So the VM is stopped until a vCPU is there.
                injection = machine.inject_mce_at(
                    kind, exp.poison_gpa, lambda state: state.cpl == 3 and code.holds(state.rip),
                    what=f"in the probe's user-mode code ({code})", broadcast=spec.broadcast)
                _await_reply_or_panic(guest, channel, injection, timeout=PROBE_WINDOW_S + 10)
                reply = probe.finish_spin(PROBE_WINDOW_S + 10)
            elif spec.trigger is Trigger.NONE:
                injection = machine.inject_mce(kind, exp.poison_gpa, broadcast=spec.broadcast)
                _wait_recovery(guest, obs.hardware_corrupted_before_kb)
            else:  # Trigger.KERNEL: the oracle's panic assumes the vCPU in the kernel, so it must be
                injection = machine.inject_mce_at(kind, exp.poison_gpa, lambda state: state.cpl == 0,
                                                  what="in the kernel (CPL 0)", broadcast=spec.broadcast)
            ev.json("injection.json", asdict(injection))
            landed = ""
            if isinstance(injection, MceInjection) and injection.landing is not None:
                landed = f" into {injection.landing.where()} (stop {injection.landing_tries})"
            LOG.info("%s: %s injected at gpa %#x%s; observing", spec.name, spec.mce_kind, exp.poison_gpa, landed)

            if isinstance(reply, SigbusReport):
                obs.injection_to_sigbus_ms = (reply.host_monotonic - injection.t_mono_after) * 1000.0

            if exp.panic:
                _observe_panic(guest, injection.event_mark, obs)
            else:
                _observe_recovery(guest, probe, mapping, exp=exp, obs=obs, ev=ev)
                # 'quit' is answered only after every line the probe wrote before it: a late SIGBUS
                # (one the probe reported after its last reply) is read here, not lost.
                probe.close()
                if poison is not None and spec.reset_after:
                    _reset_and_reread(guest, poison, ev)
        except (ProbeError, SshError) as exc:
            # A guest that panicked where the scenario expects it to survive is a verdict on the
            # host stack (the 'guest panicked' check fails), not a broken test run.
            if injection is None and poison is not None:
                injection = poison.injection  # poisoned, then the guest died before the row went on
            if injection is None or exp.panic or _panic_sentence(guest) is None:
                raise
            LOG.warning("%s: the guest panicked after the injection (%s); judging what was observed",
                        spec.name, exc)
            ev.text("unexpected-panic.txt", f"{type(exc).__name__}: {exc}\n")
            _observe_panic(guest, injection.event_mark, obs)
        _collect_events(guest, injection, obs, expected=len(exp.memory_failure_events))
        if trace_mark is not None and _panic_sentence(guest) is None:
            _kvm_trace(guest, on=False)
            text = guest.machine.stderr_since(trace_mark)
            ev.text("qemu-kvm-trace.txt", text)
            obs.conversions, obs.memory_faults, obs.run_exits = parse_kvm_trace(text)
        if poison is not None:
            hobs = poison.observe()
            poison.cleanup()
            ev.text("host-kernel-log.txt", "\n".join(hobs.kernel_log) + "\n")
            ev.text("qemu-forwarded.txt", poison.forwarded_text())
            ev.json("host-observations.json", asdict(hobs))
            host = (hexp, hobs)
    finally:
        stack.close()  # unpoisons and detaches the witness if the row stopped half-way
        if _panic_sentence(guest) is not None:
            channel.close()  # nobody is left to answer 'quit'
        else:
            probe.close()
        probe.write_transcript(evidence_dir / "probe.jsonl")
    assert injection is not None, "every path that reaches the verdict has injected"
    # Every SIGBUS the probe ever reported is judged, in arrival order: replies and strays alike.
    obs.sigbus = list(probe.sigbus_reports)

    verdict = replace(judge(exp, obs, host), setup=setup)
    ev.json("observations.json", asdict(obs))
    ev.text("verdict.txt", verdict.summary() + "\n")
    ev.text("verdict.json", verdict.to_json() + "\n")
    LOG.info("%s", verdict.summary())
    return ScenarioResult(spec, exp, obs, verdict, injection, evidence_dir, host)


def _reset_and_reread(guest: GuestRun, poison: HostPoison, ev: _Evidence) -> None:
    """system_reset with the host frame still poisoned; then the rebooted kernel loads the gpa."""
    hobs = poison.obs
    gpa = poison.frame.gpa
    ev.text("console-before-reset.log", guest.machine.console_text())
    hobs.reset_to_ssh_s = round(guest.reboot(), 2)
    channel = guest.ssh.start(PROBE_PATH)
    probe = ProbeClient(channel, abort=lambda: _panic_sentence(guest))
    try:
        got = probe.readphys(gpa)
        hobs.guest_read_after_reset = ("read" if not isinstance(got, SigbusReport)
                                       else f"SIGBUS si_code {got.si_code} at {got.si_addr:#x}")
    except (ProbeError, SshError) as exc:
        hobs.guest_read_after_reset = f"{type(exc).__name__}: {exc}" + (
            f" ({_panic_sentence(guest)})" if _panic_sentence(guest) else "")
    finally:
        probe.close()
        probe.write_transcript(ev.dir / "probe-after-reset.jsonl")
    hobs.pfn_after_reset, hobs.hwpoison_after_reset = poison.frame_now()
    LOG.info("after system_reset: gpa %#x read by the guest: %s; hva %#x now pfn %s", gpa,
             hobs.guest_read_after_reset, poison.frame.hva,
             "none" if hobs.pfn_after_reset is None else hex(hobs.pfn_after_reset))


def _kvm_trace(guest: GuestRun, *, on: bool) -> int | None:
    """Switch QEMU's KVM trace events on (returns the stderr mark they start at) or off; None under TCG."""
    if guest.profile.accel != "kvm":
        return None
    mark = guest.machine.stderr_mark()
    for name in KVM_TRACE_EVENTS:
        guest.machine.trace_event_set_state(name, on)
    return mark


def _pattern(mapping: Mapping, offset: int, size: int = 64) -> bytes:
    """The bytes the probe wrote from ``offset`` on, up to the end of that page."""
    size = min(size, mapping.size - offset, 4096 - (offset & 0xFFF))
    return bytes(mapping.expected_value(offset + i) for i in range(size))


def _inject_from_host(spec: ScenarioSpec, guest: GuestRun, probe: ProbeClient, mapping: Mapping, *,
                      poison: HostPoison, hexp: HostExpectation, obs: Observations) -> tuple[HostInjection, object]:
    """Poison the host frame at the moment the row says, and let the probe do its part."""
    reply: object
    if spec.trigger is Trigger.WAIT:
        probe.begin_wait(PROBE_WINDOW_S)
        _wait_probe_sleeping(guest, probe.pid)
        injection = poison.inject()
        reply = probe.finish_wait(PROBE_WINDOW_S + 10)
    else:
        assert spec.touch_offset is not None
        injection = poison.inject()
        # The touch must come after QEMU forwarded the AO: before it, the guest's access would
        # race QEMU's handler for the same frame.
        poison.wait_qemu_sigbus(1, FORWARD_TIMEOUT_S)
        with contextlib.suppress(MachineStateError, TimeoutError):
            guest.machine.wait_event("MEMORY_FAILURE", timeout=FORWARD_TIMEOUT_S, since=injection.event_mark)
        if hexp.guest_recovers_first:
            _wait_recovery(guest, obs.hardware_corrupted_before_kb or 0)
        reply = probe.touch(mapping.id, spec.touch_offset)
    poison.wait_qemu_sigbus(len(hexp.qemu_sigbus), FORWARD_TIMEOUT_S)
    return injection, reply


def _await_reply_or_panic(guest: GuestRun, channel: Channel, injection: MceInjection, *, timeout: float) -> None:
    """Wait until the probe has something to say, or the guest panicked instead.

    Polling both keeps the host-side injection-to-SIGBUS time honest (the reply is read as soon
    as it arrives) and ends the wait at once when the guest panics: the injection landed where
    the row says (``inject_mce_at``), so a panic is the guest's answer, judged like any other.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not channel.recv_ready():
        if any(e.name == "GUEST_PANICKED" for e in guest.machine.events[injection.event_mark:]):
            return
        time.sleep(0.002)


def _observe_recovery(guest: GuestRun, probe: ProbeClient, mapping: Mapping | None, *, exp: Expectation,
                      obs: Observations, ev: _Evidence) -> None:
    meminfo = guest.guest_text("cat /proc/meminfo")
    ev.text("meminfo-after.txt", meminfo)
    obs.hardware_corrupted_after_kb = parse_hardware_corrupted_kb(meminfo)
    dmesg = guest.guest_text("dmesg")
    ev.text("dmesg.txt", dmesg)
    obs.recovery_lines = parse_recovery_lines(dmesg)
    trace = guest.guest_text(f"cat {TRACE_DIR}/trace")
    ev.text("mce_record.trace", trace)
    obs.mce_records = parse_mce_records(trace)
    if mapping is None:  # nobody maps a free page: the guest kernel's own page flags say it
        words = _kpageflags(guest, list(exp.poison_pfns))
        ev.json("flags.json", {f"{pfn:#x}": f"{word:#x}" for pfn, word in words.items()})
        obs.hwpoison_flag = all(word & (1 << mm_uapi.KPF_HWPOISON) for word in words.values())
        return
    flags = probe.flags(mapping.id)
    ev.json("flags.json", asdict(flags))
    flagged = {f.pfn for f in flags.hwpoison_frames}
    obs.hwpoison_flag = all(pfn in flagged for pfn in exp.poison_pfns)


def _panic_sentence(guest: GuestRun) -> str | None:
    """Why waiting on the guest is pointless, or None while it has not panicked."""
    if any(e.name == "GUEST_PANICKED" for e in guest.machine.events):
        return "the guest panicked (QMP GUEST_PANICKED)"
    return None


def _observe_panic(guest: GuestRun, event_mark: int, obs: Observations) -> None:
    machine = guest.machine
    event = machine.wait_event("GUEST_PANICKED", timeout=60.0, since=event_mark)
    obs.guest_panicked_events.append(dict(event.data))
    # The panic text follows the event on the serial line; wait for the whole line (a read in
    # the middle of it gave 'Fatal local mach' once, inside the lab host).
    try:
        machine.wait_console(r"Kernel panic - not syncing[^\n]*\n", timeout=10.0)
    except MachineStateError:  # absence is recorded and judged, not raised
        LOG.warning("no panic line on the console after GUEST_PANICKED")
    console = machine.console_text()
    obs.panic_message = parse_panic_message(console)
    obs.mce_records = parse_console_mce_records(console)
    obs.mce_severity = parse_mce_severity(console)


def _collect_events(guest: GuestRun, injection: Injection, obs: Observations, *, expected: int) -> None:
    """All MEMORY_FAILURE and GUEST_PANICKED events since the injection, extras included."""
    machine = guest.machine
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        got = [e for e in machine.events[injection.event_mark:] if e.name == "MEMORY_FAILURE"]
        if len(got) >= expected:
            break
        time.sleep(0.05)
    later = machine.events[injection.event_mark:]
    obs.memory_failure_events = [dict(e.data) for e in later if e.name == "MEMORY_FAILURE"]
    if not obs.guest_panicked_events:
        obs.guest_panicked_events = [dict(e.data) for e in later if e.name == "GUEST_PANICKED"]


_ATTEMPT_PREFIXES = ("stuck-attempt-", "guest-reset-attempt-")
_RUN_EXIT_SHUTDOWN = re.compile(rf"^{TRACE_PREFIX}kvm_run_exit cpu_index (\d+), reason {KVM_EXIT_SHUTDOWN}\b",
                                re.MULTILINE)


class GuestResetItself(ScenarioError):
    """The guest reset on its own while a row ran (QMP RESET with guest=true, which no row asks for)."""


def guest_reset_itself(guest: GuestRun) -> str | None:
    """Why the row could not finish, if the guest reset on its own; None otherwise.

    The runner resets a guest only through QMP ``system_reset`` (RESET guest=false); a RESET
    with guest=true is the guest's doing: a triple fault (KVM_EXIT_SHUTDOWN under KVM), or its
    kernel writing the reset register.
    """
    resets = [e for e in guest.machine.events if e.name == "RESET" and e.data.get("guest")]
    if not resets:
        return None
    shutdowns = sorted({int(m[1]) for m in _RUN_EXIT_SHUTDOWN.finditer(guest.machine.stderr_since(0))})
    how = (f"; QEMU's kvm_run_exit trace shows KVM_EXIT_SHUTDOWN (a triple fault) on vCPU "
           f"{', '.join(map(str, shutdowns))}" if shutdowns else "")
    return (f"the guest reset on its own (QMP RESET reason {resets[0].data.get('reason')!r}, "
            f"{len(resets)} time(s)){how}; console tail: {guest.machine.console_text()[-300:]!r}")


def run_in_fresh_guest(spec: ScenarioSpec, image: GuestImage, outdir: Path, *,
                       binary: str = DEFAULT_QEMU,
                       profile: GuestProfile | None = None,
                       extra_qemu_args: Sequence[str] = (),
                       snapshot: bool = True,
                       after_verdict: Callable[[GuestRun, ScenarioResult], None] | None = None) -> ScenarioResult:
    """Boot a guest for `spec`, run it, tear the guest down; retry only a VM stuck at boot.

    `profile` replaces the scenario's own (a lab's profile choice, its firmware); `snapshot`
    is booted_guest's (False: boot, never restore);
    `after_verdict` runs while the judged guest is still up (``gmemtest run --keep`` holds it
    there until Ctrl-C; whatever it raises still tears the guest down). The evidence
    of the final attempt is in `outdir`; a stuck VM's (retried once) in `outdir/stuck-attempt-N/`
    with a `why.txt`, and a guest's that reset on its own during the row (``GuestResetItself``,
    retried once) in `outdir/guest-reset-attempt-N/`. An SRAR is injected where its row says
    (``inject_mce_at``): there is no missed landing to retry.
    """
    attempt = stuck = resets = 0
    while True:
        attempt += 1
        try:
            with booted_guest(image, outdir, profile=profile or spec.profile, binary=binary,
                              extra_qemu_args=extra_qemu_args, snapshot=snapshot) as guest:
                try:
                    result = run_scenario(spec, guest, outdir)
                except Exception as exc:
                    if (why := guest_reset_itself(guest)) is not None:
                        raise GuestResetItself(f"{spec.name}: {why} (then: {type(exc).__name__}: {exc})") from exc
                    raise
                if after_verdict is not None:
                    after_verdict(guest, result)
                return result
        except GuestResetItself as exc:
            # Seen once inside the lab host: an L2 under nested SVM triple-faulted about 2 s after
            # a host poison's AO was forwarded and recovered (QEMU 11.1.3, Debian 7.3.4 L1); its
            # attempt is kept, and a second self-reset of the same row fails it.
            if resets:
                raise
            resets += 1
            LOG.warning("%s: attempt %d: %s; retrying once", spec.name, attempt, exc)
            set_aside(outdir, f"guest-reset-attempt-{attempt}", str(exc), skip_prefixes=_ATTEMPT_PREFIXES)
        except MachineStuck as exc:
            # A nested guest's KVM stopping at boot (internal-error, seen under nested SVM in
            # the lab host) is retried once; the stuck attempt's evidence is kept.
            if stuck:
                raise
            stuck += 1
            LOG.warning("%s: attempt %d: the guest's VM is stuck (%s); retrying once", spec.name, attempt,
                        exc.state)
            set_aside(outdir, f"stuck-attempt-{attempt}", str(exc), skip_prefixes=_ATTEMPT_PREFIXES)

