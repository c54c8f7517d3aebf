"""Poison the host frame behind a guest page, and watch what the host and QEMU make of it.

This is the host half of a host-poison row (gmemtest.scenarios.Source.HOST): the guest page's
gpa is turned into an hva through the memslot QEMU registered with KVM for it (its
``kvm_set_user_memory`` trace, qmp_helpers.memslots), the hva into a pfn (QEMU's own pagemap),
and the frame is poisoned with hwpoison-inject's ``corrupt-pfn`` only after the interlock proved
it: QEMU's own ``gpa2hva`` names the same hva, QEMU's memory at that hva holds exactly the bytes
the guest program wrote (read through ``/proc/PID/mem``), and the frame's flags say it is an
ordinary user page (host_stack.injectors.prove_frame). QEMU's fd table and maps then say whether
KVM serves the page from a guest_memfd (``read_ram_backing``). While it runs, a ptrace witness
records every SIGBUS delivered to a QEMU handler, kprobes on the kernel's mceerr senders every
SIGBUS sent to any QEMU thread with its si_addr and si_addr_lsb (host_stack.mceerr_trace: the AO
to QEMU's main thread is read from a signalfd, so no witness sees it), a /dev/kmsg cursor the
host kernel's lines, and meminfo the HardwareCorrupted count.
On exit the frame is unpoisoned and the witness detached, also when the row failed.

It runs on the host that runs QEMU: a real lab host, or the lab host in a box (L1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from gmemtest.errors import GmemtestError
from gmemtest.observations import HostObservations, RamBacking, parse_recovery_text
from gmemtest.oracle import HUGE_2M_SHIFT, HostFrameLayout, memslot_hva
from host_stack.gmem_layout import PAGE_SHIFT
from host_stack.injectors import CorruptPfnInjector, InjectionRecord, prove_frame
from host_stack.kernelfs import DEBUGFS, mounted
from host_stack.kmsg import KmsgCursor
from host_stack.kvm_uapi import GMEM_PROC_NAMES
from host_stack.mceerr_trace import MceerrTrace
from host_stack.mm_uapi import SIGBUS
from host_stack.pagemap import find_vma, hardware_corrupted_kib, read_kpageflags, read_memory, read_pagemap
from host_stack.signal_trace import GeneratedSignal, SignalTrace, threads_of
from host_stack.witness import SigbusWitness
from qmp_helpers import QemuMachine
from qmp_helpers.mce import parse_forwarded_lines
from qmp_helpers.memslots import MEMSLOT_TRACE_ARGS, memslot_for_gpa

__all__ = ["HostInjection", "HostPoison", "HostPoisonError", "read_ram_backing", "resolve_host_frame"]

LOG = logging.getLogger(__name__)


class HostPoisonError(GmemtestError, RuntimeError):
    """The host frame behind a guest page could not be found or proven; nothing was poisoned."""


def resolve_host_frame(machine: QemuMachine, gpa: int, expected: bytes) -> HostFrameLayout:
    """gpa -> memslot (what QEMU told KVM) -> hva -> pfn (QEMU's pagemap), proven twice: QEMU's own
    ``gpa2hva`` names the same hva, and QEMU's memory holds ``expected`` there."""
    slots = machine.memslots()
    try:
        memslot = memslot_for_gpa(slots, gpa)
    except ValueError as exc:
        raise HostPoisonError(f"{exc}; refusing to poison") from exc
    if memslot is None:
        raise HostPoisonError(
            f"no memslot QEMU registered with KVM covers gpa {gpa:#x} ({len(slots)} in force, from the "
            f"kvm_set_user_memory lines of {machine.stderr_log}; QEMU traces them only when started with "
            f"{' '.join(MEMSLOT_TRACE_ARGS)}); refusing to poison")
    hva = memslot_hva(memslot, gpa)
    qemu_hva = machine.gpa2hva(gpa)
    if qemu_hva != hva:
        raise HostPoisonError(f"QEMU's gpa2hva says hva {qemu_hva:#x} for gpa {gpa:#x}, but the memslot it "
                              f"registered ({memslot.describe()}) maps it at {hva:#x}; refusing to poison")
    actual = read_memory(machine.pid, hva, len(expected))
    if actual != expected:
        raise HostPoisonError(
            f"QEMU (pid {machine.pid}) holds {actual[:16].hex()}... at hva {hva:#x} (gpa {gpa:#x}), but the guest "
            f"program wrote {expected[:16].hex()}... there: the memslot does not lead to the guest page; refusing "
            "to poison")
    frame = prove_frame(machine.pid, hva)
    return HostFrameLayout(gpa=gpa, hva=hva, pfn=frame.pfn, qemu_pid=machine.pid, memslot=memslot,
                           host_page_shift=HUGE_2M_SHIFT if frame.flags.huge else PAGE_SHIFT)


def read_ram_backing(frame: HostFrameLayout) -> RamBacking:
    """QEMU's fd table and maps for the frame's memslot: is the page served from a guest_memfd?"""
    fd_dir = Path(f"/proc/{frame.qemu_pid}/fd")
    links: dict[int, str] = {}
    for entry in fd_dir.iterdir():
        with contextlib.suppress(OSError):  # an fd closed while the table is read
            links[int(entry.name)] = os.readlink(entry)
    slot_fd = frame.memslot.guest_memfd
    vma = find_vma(frame.hva, frame.qemu_pid)
    return RamBacking(memslot=frame.memslot.describe(), slot_guest_memfd=slot_fd,
                      slot_fd_target=links.get(slot_fd, "<not open>") if slot_fd >= 0 else None,
                      qemu_guest_memfds=tuple(sorted(fd for fd, target in links.items() if target in GMEM_PROC_NAMES)),
                      hva_mapping="<unmapped>" if vma is None else vma.path)


@dataclass(frozen=True)
class HostInjection:
    """One host-side poison: the injector's record and the marks the observers need."""

    frame: HostFrameLayout
    record: InjectionRecord
    event_mark: int  # QMP event-log mark before the write, for MEMORY_FAILURE without a race
    t_mono_before: float
    t_mono_after: float


class HostPoison:
    """A context for one host-poison row: observers on before the injection, clean-up after."""

    def __init__(self, machine: QemuMachine, frame: HostFrameLayout) -> None:
        self.machine = machine
        self.frame = frame
        self.obs = HostObservations()
        self._stack = contextlib.ExitStack()
        self._injector: CorruptPfnInjector | None = None
        self._witness: SigbusWitness | None = None
        self._kmsg: KmsgCursor | None = None
        self._signals: SignalTrace | None = None
        self._mceerr: MceerrTrace | None = None
        self._stderr_mark = 0
        self.injection: HostInjection | None = None  # set once the frame is poisoned

    def __enter__(self) -> Self:
        try:
            debugfs = self._stack.enter_context(mounted(DEBUGFS))
            self._injector = CorruptPfnInjector(debugfs)
            self._injector.require()
            self._kmsg = self._stack.enter_context(KmsgCursor())
            self._signals = self._stack.enter_context(SignalTrace(SIGBUS))
            self._mceerr = self._stack.enter_context(MceerrTrace())
            self._witness = self._stack.enter_context(SigbusWitness(self.machine.pid))
        except BaseException:
            self._stack.close()
            raise
        self._stderr_mark = self.machine.stderr_mark()
        self.obs.ram_backing = read_ram_backing(self.frame)
        return self

    def inject(self) -> HostInjection:
        assert self._injector is not None, "inject() inside the context"
        self.obs.hardware_corrupted_before_kb = hardware_corrupted_kib()
        mark = self.machine.event_mark()
        t0 = time.monotonic()
        record = self._injector.inject(self.frame.qemu_pid, self.frame.hva, self.frame.pfn)
        t1 = time.monotonic()
        self.obs.injection_errno = record.call_errno
        LOG.info("host poison: pfn %#x behind hva %#x (gpa %#x) of QEMU %d: %s", self.frame.pfn, self.frame.hva,
                 self.frame.gpa, self.frame.qemu_pid, record.detail)
        self.injection = HostInjection(self.frame, record, mark, t0, t1)
        return self.injection

    def _generated(self) -> list[GeneratedSignal]:
        assert self._signals is not None
        tids = self._qemu_tids()
        return [g for g in self._signals.records() if g.tid in tids]

    def _qemu_tids(self) -> set[int]:
        return threads_of(self.frame.qemu_pid)

    def wait_qemu_sigbus(self, count: int, timeout: float) -> None:
        """Until the host generated ``count`` SIGBUS for QEMU (a shortfall is judged, not raised)."""
        deadline = time.monotonic() + timeout
        while len(self._generated()) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    def forwarded_text(self) -> str:
        """What QEMU wrote to its stderr since the context began."""
        return self.machine.stderr_since(self._stderr_mark)

    def observe(self) -> HostObservations:
        """Read every host-side observer once the guest side is done."""
        assert self._witness is not None and self._kmsg is not None
        obs = self.obs
        obs.qemu_pid = self.frame.qemu_pid
        obs.vcpu_tids = sorted(int(cpu["thread-id"]) for cpu in self.machine.qmp("query-cpus-fast"))
        version = self.machine.qmp("query-version")
        q = version["qemu"]
        obs.qemu_version = f"{q['major']}.{q['minor']}.{q['micro']} ({str(version.get('package', '')).strip()})"
        obs.generated = self._generated()
        tids = self._qemu_tids()
        obs.sent = [s for s in self._mceerr.records() if s.tid in tids] if self._mceerr is not None else []
        obs.qemu_sigbus = self._witness.records
        obs.forwarded = [(f.code, f.hva, f.gpa) for f in parse_forwarded_lines(self.forwarded_text())]
        obs.hardware_corrupted_after_kb = hardware_corrupted_kib()
        obs.hwpoison_flag = read_kpageflags(self.frame.pfn).hwpoison
        obs.kernel_log.extend(r.text for r in self._kmsg.read_new())
        obs.recovery_lines = [r for r in parse_recovery_text(obs.kernel_log) if r.pfn == self.frame.pfn]
        return obs

    def frame_now(self) -> tuple[int | None, bool | None]:
        """The frame behind the hva now, and whether it is poisoned (None: not present)."""
        entry = read_pagemap(self.frame.hva, self.frame.qemu_pid)
        if entry.pfn is None:
            return None, None
        return entry.pfn, read_kpageflags(entry.pfn).hwpoison

    def cleanup(self) -> None:
        """Unpoison the frame and prove it: KPF_HWPOISON must be clear afterwards.

        A hugetlb page is poisoned as a whole (the flag is on its head) and stays busy while
        QEMU maps it: QEMU is stopped first (the row's guest part is over by then) and the head
        pfn is unpoisoned, which also gives the huge page back to the pool (measured on 7.3.4:
        unpoisoning the raw pfn says "page was already unpoisoned" and fails with EBUSY). A
        guest_memfd page stays in guest_memfd's page cache (MF_DELAYED) and unpoison answers
        EBUSY until it leaves: QEMU is stopped first, which releases the file.
        """
        if self._injector is None or not self._injector.records:
            return
        huge = self.frame.host_page_shift > PAGE_SHIFT
        gmem = self.obs.ram_backing is not None and self.obs.ram_backing.kind() == "guest_memfd"
        if huge or gmem:
            self.machine.shutdown()
            head = self.frame.pfn & ~((1 << (self.frame.host_page_shift - PAGE_SHIFT)) - 1)
            self._injector.records = [dataclasses.replace(r, pfn=head, pfns=(head,)) for r in self._injector.records]
        records = self._injector.cleanup()
        self._injector.records = []
        pfns = [pfn for r in records for pfn in r.poisoned_pfns] + ([self.frame.pfn] if huge else [])
        still = [pfn for pfn in pfns if read_kpageflags(pfn).hwpoison]
        self.obs.cleanup = "; ".join(r.cleanup for r in records)
        self.obs.cleanup_failed = any(r.cleanup_failed for r in records) or bool(still)
        if still:
            self.obs.cleanup += f"; still KPF_HWPOISON: {', '.join(hex(p) for p in still)}"
        if self._kmsg is not None:
            self.obs.kernel_log.extend(r.text for r in self._kmsg.read_new())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.cleanup()
        finally:
            self._stack.close()
