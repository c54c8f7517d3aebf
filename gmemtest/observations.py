"""The observers of a guest row: what each reads, the parser that turns it into numbers, and
the record they fill (``Observations``; a host row's ``HostObservations``).

Every field is filled from evidence gathered during the run (probe JSON, QMP events, console,
guest files); nothing here is computed from the layout. A new observable is a field, its parser
and its read here, and its named check in ``gmemtest.verdict``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field

from gmemtest.errors import ScenarioError
from gmemtest.evidence import Evidence
from gmemtest.guest_run import GuestRun
from guests.probe_client import Mapping, ProbeClient, SigbusReport
from host_stack import mm_uapi
from host_stack.kvm_uapi import GMEM_PROC_NAMES
from host_stack.mceerr_trace import SentMceerr
from host_stack.signal_trace import GeneratedSignal
from host_stack.witness import SigbusRecord
from polling import poll_until
from qmp_helpers import MachineStateError
from qmp_helpers.trace_log import TRACE_PREFIX

LOG = logging.getLogger(__name__)

GUEST_TRACE_DIR = "/sys/kernel/tracing"
# QEMU's KVM trace events (accel/kvm/trace-events) switched on over the injection window of a
# KVM guest: which private/shared conversions and memory-fault exits happened, and how many exits.
KVM_TRACE_EVENTS = ("kvm_convert_memory", "kvm_memory_fault", "kvm_run_exit")

_MEMINFO_HWCORRUPTED = re.compile(r"^HardwareCorrupted:\s+(\d+)\s+kB$", re.MULTILINE)
# mm/memory-failure.c: pr_fmt "Memory failure: " + "%#lx: recovery action for %s: %s"
_RECOVERY = re.compile(r"Memory failure: (0x[0-9a-f]+): recovery action for ([^:]+): (\w+)")
# include/trace/events/mce.h (mce_record): "... MC%d: %016Lx, ... ADDR/MISC[/SYND]: %016Lx/%016Lx[/%016Lx], ..."
_MCE_RECORD = re.compile(
    r"mce_record:.*?MC(\d+): ([0-9a-f]{16}).*?ADDR/MISC(?:/SYND)?: ([0-9a-f]{16})/([0-9a-f]{16})"
)
_PANIC = re.compile(r"Kernel panic - not syncing: ?(.*)")
# arch/x86/kernel/cpu/mce/core.c (__print_mce, mce_panic), as printed on the console on a panic.
_CONSOLE_MCE_BANK = re.compile(
    r"mce: \[Hardware Error\]: CPU \d+: Machine Check(?: Exception)?: \S+ Bank (\d+): ([0-9a-f]+)"
)
_CONSOLE_MCE_ADDR = re.compile(r"mce: \[Hardware Error\]: .*?ADDR ([0-9a-f]+) (?:MISC ([0-9a-f]+))?")
_CONSOLE_MCE_SEVERITY = re.compile(r"mce: \[Hardware Error\]: Machine check: (.*?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class RecoveryLine:
    pfn: int
    page_type: str
    result: str


@dataclass(frozen=True)
class MceRecord:
    bank: int
    status: int
    addr: int
    misc: int


@dataclass
class Observations:
    """Filled in by the scenario runner as the run goes; compared by the verdict."""

    sigbus: list[SigbusReport] = field(default_factory=list)  # the probe's, in the order it reported them
    memory_failure_events: list[dict[str, object]] = field(default_factory=list)
    guest_panicked_events: list[dict[str, object]] = field(default_factory=list)
    panic_message: str | None = None
    mce_severity: str | None = None
    hardware_corrupted_before_kb: int | None = None
    hardware_corrupted_after_kb: int | None = None
    hwpoison_flag: bool | None = None
    recovery_lines: list[RecoveryLine] = field(default_factory=list)
    mce_records: list[MceRecord] = field(default_factory=list)
    injection_to_sigbus_ms: float | None = None
    # Pieces of the mapping read back after the injection (Expectation.intact_offsets), and
    # each one that did not read its pattern ("offset 0x6080: read 0x00, pattern 0x5a").
    intact_checked: int = 0
    intact_mismatches: list[str] = field(default_factory=list)
    # QEMU's KVM trace events over the injection window (KVM profiles only; None: not traced):
    # the kvm_convert_memory lines (private/shared conversions), kvm_memory_fault lines, and how
    # many kvm_run_exit lines there were.
    conversions: list[str] | None = None
    memory_faults: list[str] | None = None
    run_exits: int | None = None


def parse_hardware_corrupted_kb(meminfo: str) -> int:
    match = _MEMINFO_HWCORRUPTED.search(meminfo)
    if match is None:
        raise ValueError("no 'HardwareCorrupted: N kB' line in /proc/meminfo; is CONFIG_MEMORY_FAILURE set?")
    return int(match.group(1))


def parse_recovery_lines(dmesg: str) -> list[RecoveryLine]:
    return [RecoveryLine(int(m.group(1), 16), m.group(2).strip(), m.group(3)) for m in _RECOVERY.finditer(dmesg)]


def parse_mce_records(trace: str) -> list[MceRecord]:
    return [
        MceRecord(int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16), int(m.group(4), 16))
        for m in _MCE_RECORD.finditer(trace)
    ]


def parse_panic_message(console: str) -> str | None:
    match = _PANIC.search(console)
    return match.group(1).strip() if match else None


def parse_console_mce_records(console: str) -> list[MceRecord]:
    """The MCE the guest printed before panicking: its bank line, then the ADDR/MISC line."""
    records: list[MceRecord] = []
    for bank in _CONSOLE_MCE_BANK.finditer(console):
        addr = _CONSOLE_MCE_ADDR.search(console, bank.end())
        if addr is None:
            continue
        misc = int(addr.group(2), 16) if addr.group(2) else 0
        records.append(MceRecord(int(bank.group(1)), int(bank.group(2), 16), int(addr.group(1), 16), misc))
    return records


def parse_mce_severity(console: str) -> str | None:
    """The severity grader's verdict, e.g. 'Data load in unrecoverable area of kernel'."""
    match = _CONSOLE_MCE_SEVERITY.search(console)
    return match.group(1) if match else None


@dataclass(frozen=True)
class RamBacking:
    """What KVM serves the guest page from, read on the host before the injection: the memslot
    QEMU registered for its gpa and QEMU's own fd table and maps."""

    memslot: str  # MemslotRegistration.describe() of the slot covering the gpa
    slot_guest_memfd: int  # the slot's guest_memfd (QEMU's fd number), -1 without one
    slot_fd_target: str | None  # /proc/<qemu>/fd/<slot_guest_memfd>, None without one
    qemu_guest_memfds: tuple[int, ...]  # every fd of QEMU that /proc names a guest_memfd
    hva_mapping: str  # path of QEMU's VMA holding the hva ("" for anonymous memory)

    def kind(self) -> str:
        """"guest_memfd", "userspace memory", or why the slot's fd is neither.

        A slot without a guest_memfd is still served from one when its hva lies in a mapping of
        a guest_memfd: upstream QEMU's ``memory-backend-memfd,guest-memfd=on`` (11.2, and this
        project's QEMU series) registers the mapping with KVM, not the fd.
        """
        if self.slot_guest_memfd < 0:
            return "guest_memfd" if self.hva_mapping in GMEM_PROC_NAMES else "userspace memory"
        if self.slot_fd_target in GMEM_PROC_NAMES:
            return "guest_memfd"
        return f"fd {self.slot_guest_memfd} of the slot is {self.slot_fd_target!r}, not a guest_memfd"

    def summary(self) -> str:
        how = ", registered by its mapping" if self.slot_guest_memfd < 0 and self.kind() == "guest_memfd" else ""
        return (f"{self.kind()}{how} ({self.memslot}; QEMU holds {len(self.qemu_guest_memfds)} guest_memfd fd(s); "
                f"hva in {self.hva_mapping or 'an anonymous mapping'})")


@dataclass
class HostObservations:
    """The host and QEMU layers of a host-poison row, filled in by the runner."""

    # Every SIGBUS the host kernel generated for a QEMU thread (tracepoint), and every one the
    # witness saw delivered (with its siginfo); QEMU's vCPU thread ids (QMP query-cpus-fast).
    generated: list[GeneratedSignal] = field(default_factory=list)
    qemu_sigbus: list[SigbusRecord] = field(default_factory=list)
    # Every mceerr SIGBUS the kernel sent a QEMU thread, with si_addr and si_addr_lsb (kprobes).
    sent: list[SentMceerr] = field(default_factory=list)
    qemu_pid: int = 0
    qemu_version: str = ""  # query-version: "<major>.<minor>.<micro> (<package>)"
    vcpu_tids: list[int] = field(default_factory=list)
    # (code, hva, gpa) of each "Guest MCE Memory Error ... injected" line of QEMU's stderr.
    forwarded: list[tuple[str, int, int]] = field(default_factory=list)
    hardware_corrupted_before_kb: int | None = None
    hardware_corrupted_after_kb: int | None = None
    hwpoison_flag: bool | None = None
    recovery_lines: list[RecoveryLine] = field(default_factory=list)
    kernel_log: list[str] = field(default_factory=list)
    injection_errno: int = 0
    ram_backing: RamBacking | None = None
    # After a system_reset (reset rows): the frame now behind the hva and whether it is poisoned,
    # what the rebooted guest's kernel read at the gpa, and the seconds from reset to SSH.
    pfn_after_reset: int | None = None
    hwpoison_after_reset: bool | None = None
    guest_read_after_reset: str | None = None
    reset_to_ssh_s: float | None = None
    cleanup: str = "none attempted"
    cleanup_failed: bool = False

    def thread_role(self, tid: int) -> str:
        """ "main" for QEMU's main thread, "vcpu" for a vCPU thread, else "thread <tid>"."""
        if tid == self.qemu_pid:
            return "main"
        return "vcpu" if tid in self.vcpu_tids else f"thread {tid}"


_TRACE_LINE = re.compile(rf"^{TRACE_PREFIX}(kvm_convert_memory|kvm_memory_fault|kvm_run_exit)\b", re.MULTILINE)


def parse_kvm_trace(text: str) -> tuple[list[str], list[str], int]:
    """Pure: (kvm_convert_memory lines, kvm_memory_fault lines, kvm_run_exit count) of QEMU's trace output.

    One line per event, as qmp_helpers.trace_log describes QEMU's log trace backend.
    """
    found: dict[str, list[str]] = {"kvm_convert_memory": [], "kvm_memory_fault": [], "kvm_run_exit": []}
    for line in text.splitlines():
        match = _TRACE_LINE.match(line)
        if match:
            found[match.group(1)].append(line)
    return found["kvm_convert_memory"], found["kvm_memory_fault"], len(found["kvm_run_exit"])


def parse_recovery_text(lines: list[str]) -> list[RecoveryLine]:
    """The recovery lines among kernel log records (one record per entry)."""
    return parse_recovery_lines("\n".join(lines))


# ----- the reads -------------------------------------------------------------------------------

def read_kpageflags_words(guest: GuestRun, pfns: list[int]) -> dict[int, int]:
    """The guest kernel's /proc/kpageflags word of each pfn, in one short SSH command (busybox dd, od)."""
    script = (f"for p in {' '.join(map(str, pfns))}; do "
              "dd if=/proc/kpageflags bs=8 skip=$p count=1 2>/dev/null | od -An -tx8; done")
    words = guest.guest_text(script).split()
    if len(words) != len(pfns):
        raise ScenarioError(f"reading /proc/kpageflags of {len(pfns)} pfns gave {len(words)} words: {words[:4]}")
    return {pfn: int(word, 16) for pfn, word in zip(pfns, words, strict=True)}


def hardware_corrupted_kb(guest: GuestRun) -> int:
    return parse_hardware_corrupted_kb(guest.guest_text("cat /proc/meminfo"))


def kvm_trace(guest: GuestRun, *, on: bool) -> int | None:
    """Switch QEMU's KVM trace events on (returns the stderr mark they start at) or off; None under TCG."""
    if guest.profile.accel != "kvm":
        return None
    mark = guest.machine.stderr_mark()
    for name in KVM_TRACE_EVENTS:
        guest.machine.trace_event_set_state(name, on)
    return mark


def observe_recovery(guest: GuestRun, probe: ProbeClient, mapping: Mapping | None, *, poison_pfns: tuple[int, ...],
                     obs: Observations, ev: Evidence) -> None:
    """What a guest that survived says: meminfo, dmesg's recovery lines, the mce_record trace, KPF_HWPOISON."""
    meminfo = guest.guest_text("cat /proc/meminfo")
    ev.text("meminfo-after.txt", meminfo)
    obs.hardware_corrupted_after_kb = parse_hardware_corrupted_kb(meminfo)
    dmesg = guest.guest_text("dmesg")
    ev.text("dmesg.txt", dmesg)
    obs.recovery_lines = parse_recovery_lines(dmesg)
    trace = guest.guest_text(f"cat {GUEST_TRACE_DIR}/trace")
    ev.text("mce_record.trace", trace)
    obs.mce_records = parse_mce_records(trace)
    if mapping is None:  # nobody maps a free page: the guest kernel's own page flags say it
        words = read_kpageflags_words(guest, list(poison_pfns))
        ev.json("flags.json", {f"{pfn:#x}": f"{word:#x}" for pfn, word in words.items()})
        obs.hwpoison_flag = all(word & (1 << mm_uapi.KPF_HWPOISON) for word in words.values())
        return
    flags = probe.flags(mapping.id)
    ev.json("flags.json", asdict(flags))
    flagged = {f.pfn for f in flags.hwpoison_frames}
    obs.hwpoison_flag = all(pfn in flagged for pfn in poison_pfns)


def observe_panic(guest: GuestRun, event_mark: int, obs: Observations) -> None:
    """What a guest that panicked says: the GUEST_PANICKED event, the panic line, the console's MCE records."""
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


def collect_events(guest: GuestRun, event_mark: int, obs: Observations, *, expected: int) -> None:
    """All MEMORY_FAILURE and GUEST_PANICKED events since the injection, extras included."""
    machine = guest.machine
    poll_until(lambda: sum(e.name == "MEMORY_FAILURE" for e in machine.events[event_mark:]) >= expected,
               timeout=5.0, interval=0.05)
    later = machine.events[event_mark:]
    obs.memory_failure_events = [dict(e.data) for e in later if e.name == "MEMORY_FAILURE"]
    if not obs.guest_panicked_events:
        obs.guest_panicked_events = [dict(e.data) for e in later if e.name == "GUEST_PANICKED"]
