"""Hardware-poison injectors with a safety interlock: madvise, debugfs corrupt-pfn, ACPI EINJ.

Poisoning the wrong page frame takes down the host (a page-table, slab or firmware page) or
silently tests nothing (a PFN that no longer backs the target). So every injector first
*proves* the frame: the target process's pagemap at the expected virtual address shows the
page present with exactly that PFN, and the frame's kpageflags show an ordinary user page
(not reserved, slab, buddy, page table, zero page, offline or absent). Anything else raises
``InjectionRefused`` naming the reason; the proof is re-read just before the write to narrow
the window in which the page could move. A kernel without the interface raises
``HwpoisonUnsupported`` with a sentence a lab engineer can act on, carrying the errno.

Whether a frame was poisoned is judged by the frame's state afterwards (``KPF_HWPOISON`` in
``/proc/kpageflags``, with the ``HardwareCorrupted`` delta as evidence), never by the return
code: on a standard 7.3.4 kernel MADV_HWPOISON and corrupt-pfn on a guest_memfd page return
EBUSY (memory_failure's MF_DELAYED) while the frame *is* poisoned. The return code is kept in
the record (``call_errno``).

Every injection returns an ``InjectionRecord`` (method, pid, va, pfn, timestamps); injectors
are context managers that unpoison what they poisoned when the kernel offers a way
(debugfs ``hwpoison/unpoison-pfn``), also when the block raised; a frame left poisoned
(unpoison failed or impossible) sets ``cleanup_failed`` and is logged as a warning, so callers
can show it (``cleanup_warnings``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Self

from host_stack import mm_uapi as m
from host_stack.errors import HostStackError
from host_stack.kernelfs import find_mount
from host_stack.pagemap import (
    PAGE_SIZE,
    PageFlags,
    PagemapEntry,
    hardware_corrupted_kib,
    read_kpageflags,
    read_pagemap,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from types import TracebackType

__all__ = [
    "CorruptPfnInjector",
    "EinjInjector",
    "HwpoisonUnsupported",
    "InjectionRecord",
    "InjectionRefused",
    "MadviseInjector",
    "PoisonState",
    "ProvenFrame",
    "RefusalReason",
    "check_forbidden_flags",
    "check_frame_flags",
    "cleanup_warnings",
    "judge_poison_state",
    "prove_frame",
    "unpoison_pfn",
]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

RefusalReason = Literal[
    "bad-address",
    "not-present",
    "swapped",
    "pfn-hidden",
    "pfn-mismatch",
    "reserved",
    "slab",
    "buddy",
    "nopage",
    "pgtable",
    "zero-page",
    "offline",
    "not-user-mapped",
    "already-poisoned",
    "moved",
    "not-proven",
    "user-mapped",
    "not-guest-memfd",
]

# kpageflags bits that make a frame unsafe to poison, with the reason each one gives.
_FORBIDDEN_FLAGS: Final[tuple[tuple[int, RefusalReason, str], ...]] = (
    # most specific first: the zero page is also reserved, a page-table page also has a type
    (m.KPF_ZERO_PAGE, "zero-page", "it is the shared zero page every process maps"),
    (m.KPF_NOPAGE, "nopage", "no struct page backs it (firmware/MMIO hole)"),
    (m.KPF_PGTABLE, "pgtable", "it is a page-table page"),
    (m.KPF_SLAB, "slab", "it is a kernel slab page"),
    (m.KPF_BUDDY, "buddy", "it is free in the buddy allocator"),
    (m.KPF_OFFLINE, "offline", "it is offline"),
    (m.KPF_RESERVED, "reserved", "it is reserved (kernel image, firmware or boot memory)"),
    (m.KPF_HWPOISON, "already-poisoned", "it is already hardware-poisoned"),
)


class InjectionRefused(HostStackError, RuntimeError):
    """The interlock would not poison this frame; ``reason`` is a stable code for tests."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason: RefusalReason = reason


class HwpoisonUnsupported(HostStackError, OSError):
    """The host kernel lacks the injection interface; the message says what is missing."""

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True)
class ProvenFrame:
    """A page frame proven to back ``va`` of ``pid``, with the evidence used."""

    pid: int
    va: int
    pfn: int
    pagemap: PagemapEntry
    flags: PageFlags

    @property
    def physical_address(self) -> int:
        return self.pfn * PAGE_SIZE + self.va % PAGE_SIZE


@dataclass(frozen=True)
class InjectionRecord:
    """What an injector did: enough to reproduce it and to check the observables."""

    method: Literal["madvise", "corrupt-pfn", "einj"]
    pid: int
    va: int
    pfn: int | None
    length: int
    t_start_ns: int  # time.monotonic_ns() before the write/call
    t_end_ns: int  # time.monotonic_ns() after it returned
    t_wall_ns: int  # time.time_ns() at start, for correlating with logs
    flags_before: tuple[str, ...] = ()
    detail: str = ""
    cleanup: str = field(default="none attempted")
    # Every frame poisoned, for a multi-page injection; empty means just ``pfn``.
    pfns: tuple[int, ...] = ()
    poisoned: bool | None = None  # every frame shows KPF_HWPOISON afterwards; None: not judged
    call_errno: int = 0  # what the madvise/write returned (0: success); evidence, not the verdict
    hardware_corrupted_kib: tuple[int | None, int | None] = (None, None)  # before, after
    sigbus_during_call: int = 0  # SIGBUS delivered to the caller while the call ran
    cleanup_failed: bool = False  # a frame stays poisoned after cleanup
    gpa: int | None = None  # a private guest page (no user mapping: ``va`` is 0), by guest address

    @property
    def target(self) -> str:
        """Where the poisoned page is, in the words of its owner: a user address or a private gpa."""
        return f"pid {self.pid} gpa {self.gpa:#x}" if self.gpa is not None else f"pid {self.pid} va {self.va:#x}"

    @property
    def poisoned_pfns(self) -> tuple[int, ...]:
        if self.pfns:
            return self.pfns
        return () if self.pfn is None else (self.pfn,)

    def with_cleanup(self, cleanup: str, *, failed: bool = False) -> InjectionRecord:
        return dataclasses.replace(self, cleanup=cleanup, cleanup_failed=failed)


def cleanup_warnings(records: Sequence[InjectionRecord]) -> list[str]:
    """One sentence per record whose frames stay poisoned after cleanup (for results/verdicts)."""
    return [
        f"cleanup of {r.method} poison ({r.target} pfn "
        f"{','.join(f'{p:#x}' for p in r.poisoned_pfns)}) failed: {r.cleanup}"
        for r in records
        if r.cleanup_failed
    ]


@dataclass(frozen=True)
class PoisonState:
    """The frames' state after an injection call: the only evidence ``injected`` rests on."""

    poisoned: bool
    flags_after: tuple[PageFlags, ...]
    hardware_corrupted_kib: tuple[int | None, int | None]

    def sentence(self) -> str:
        marks = ", ".join(f"{f.pfn:#x} {'KPF_HWPOISON' if f.hwpoison else 'not poisoned'}" for f in self.flags_after)
        before, after = self.hardware_corrupted_kib
        delta = "unknown" if before is None or after is None else f"{after - before:+d} kB"
        return f"kpageflags after: {marks}; HardwareCorrupted {delta}"


def judge_poison_state(
    flags_after: Sequence[PageFlags], hardware_corrupted_kib: tuple[int | None, int | None]
) -> PoisonState:
    """Pure: injected iff every frame carries KPF_HWPOISON (the meminfo delta is evidence).

    HardwareCorrupted is host-wide (another poison may move it), so it never decides alone.
    """
    poisoned = bool(flags_after) and all(f.hwpoison for f in flags_after)
    return PoisonState(poisoned, tuple(flags_after), hardware_corrupted_kib)


def _poison_state(pfns: Sequence[int], hc_before: int | None) -> PoisonState:
    return judge_poison_state([read_kpageflags(p) for p in pfns], (hc_before, hardware_corrupted_kib()))


@contextlib.contextmanager
def _sigbus_tolerated() -> Iterator[list[int]]:
    """Survive a SIGBUS sent to the caller *during* the injection call, and count it.

    memory_failure() sends BUS_MCEERR_AR to a process that poisons a dirty page it maps with a
    forced signal (a blocked SIGBUS is unblocked and reset to the default action, which kills),
    so only a handler keeps the caller alive. The signal arrives on return from the syscall,
    not at a faulting instruction, so a handler that returns is safe. Handlers can only be
    set in the main thread; elsewhere the caller's own disposition applies.
    """
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    previous = signal.getsignal(signal.SIGBUS)
    signal.signal(signal.SIGBUS, lambda signo, _frame: seen.append(signo))
    try:
        yield seen
    finally:
        ctypes.pythonapi.PyErr_CheckSignals()  # run a pending handler before restoring
        signal.signal(signal.SIGBUS, previous)
        if seen and callable(previous):
            previous(signal.SIGBUS, None)  # the caller's own handler still hears of it


def check_forbidden_flags(flags: PageFlags) -> None:
    """Refuse a frame whose flags say it is kernel memory, free, a hole or already poisoned."""
    for bit, reason, why in _FORBIDDEN_FLAGS:
        if flags.has(bit):
            raise InjectionRefused(
                reason,
                f"refusing to poison pfn {flags.pfn:#x}: {why} (kpageflags {flags.raw:#x}: "
                f"{','.join(flags.names) or 'none'})",
            )


def check_frame_flags(flags: PageFlags) -> None:
    """Refuse a frame whose flags say it is not an ordinary page mapped by a user process."""
    check_forbidden_flags(flags)
    if not flags.mapped_to_user:
        raise InjectionRefused(
            "not-user-mapped",
            f"refusing to poison pfn {flags.pfn:#x}: no user mapping (KPF_MMAP clear), so it "
            f"is a kernel page (kpageflags {flags.raw:#x}: {','.join(flags.names) or 'none'})",
        )


def prove_frame(pid: int, va: int, expected_pfn: int | None = None) -> ProvenFrame:
    """Prove which frame backs ``va`` in ``pid`` and that poisoning it is safe."""
    if va < 0 or pid <= 0:
        raise InjectionRefused("bad-address", f"invalid target pid {pid} va {va:#x}")
    entry = read_pagemap(va, pid)
    where = f"va {va:#x} of pid {pid}"
    if entry.swapped:
        raise InjectionRefused("swapped", f"refusing: {where} is swapped out (touch it first)")
    if not entry.present:
        raise InjectionRefused("not-present", f"refusing: {where} is not present in its pagemap (touch it first)")
    if entry.pfn is None:
        raise InjectionRefused(
            "pfn-hidden",
            f"refusing: the pagemap of {where} hides the PFN (the reader lacks CAP_SYS_ADMIN)",
        )
    if expected_pfn is not None and entry.pfn != expected_pfn:
        raise InjectionRefused(
            "pfn-mismatch",
            f"refusing: expected pfn {expected_pfn:#x} behind {where}, pagemap shows {entry.pfn:#x}",
        )
    flags = read_kpageflags(entry.pfn)
    check_frame_flags(flags)
    return ProvenFrame(pid=pid, va=va, pfn=entry.pfn, pagemap=entry, flags=flags)


def _recheck(frame: ProvenFrame) -> None:
    """Re-read the pagemap right before the write: the page must not have moved."""
    now = read_pagemap(frame.va, frame.pid)
    if now.pfn != frame.pfn:
        raise InjectionRefused(
            "moved",
            f"refusing: pfn behind va {frame.va:#x} of pid {frame.pid} changed from "
            f"{frame.pfn:#x} to {now.pfn if now.pfn is None else hex(now.pfn)} before injection",
        )


def _write_sysfs(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def unpoison_pfn(path: Path, pfn: int) -> int:
    """Write ``pfn`` to debugfs ``hwpoison/unpoison-pfn`` at ``path``: 0, or the errno it answered."""
    try:
        _write_sysfs(path, f"{pfn:#x}")
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0


class _Injector:
    """Records and clean-up shared by all injectors."""

    def __init__(self, debugfs: Path | None = None) -> None:
        self.debugfs = debugfs
        self.records: list[InjectionRecord] = []

    @property
    def unpoison_path(self) -> Path | None:
        debugfs = self.debugfs if self.debugfs is not None else find_mount("debugfs")
        if debugfs is None:
            return None
        path = debugfs / m.HWPOISON_UNPOISON_PFN
        return path if path.exists() else None

    def cleanup(self) -> list[InjectionRecord]:
        """Unpoison every recorded PFN when the kernel allows it; records say what happened.

        A frame that stays poisoned marks its record ``cleanup_failed`` and is logged at
        WARNING: "nothing leaks" includes poisoned pages.
        """
        done: list[InjectionRecord] = []
        unpoison = self.unpoison_path
        for rec in self.records:
            if not rec.poisoned_pfns:
                done.append(rec.with_cleanup("no pfn recorded: nothing to unpoison"))
            elif unpoison is None:
                done.append(
                    rec.with_cleanup(
                        "cannot unpoison: no debugfs hwpoison/unpoison-pfn (CONFIG_HWPOISON_INJECT)", failed=True
                    )
                )
            else:
                outcomes = []
                failed = False
                for pfn in rec.poisoned_pfns:
                    err = unpoison_pfn(unpoison, pfn)
                    failed = failed or err != 0
                    outcomes.append(f"unpoisoned pfn {pfn:#x}" if err == 0
                                    else f"unpoison-pfn {pfn:#x} failed: {errno.errorcode.get(err, err)} "
                                         f"({os.strerror(err)})")
                done.append(rec.with_cleanup("; ".join(outcomes), failed=failed))
        for rec in done:
            level = logging.WARNING if rec.cleanup_failed else logging.INFO
            _log.log(level, "cleanup %s %s: %s", rec.method, rec.target, rec.cleanup)
        self.records = done
        return done

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class MadviseInjector(_Injector):
    """``madvise(MADV_HWPOISON)`` on pages the calling process maps (e.g. a guest_memfd mmap).

    The kernel only lets a process poison its own mappings, so the target pid is always the
    caller's. Pages must be present (touched) so their frame can be proven first.
    """

    def __init__(self, debugfs: Path | None = None) -> None:
        super().__init__(debugfs)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.madvise.restype = ctypes.c_int
        self._libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        self._madvise: Callable[[int, int, int], tuple[int, int]] = self._call_madvise

    def _call_madvise(self, addr: int, length: int, advice: int) -> tuple[int, int]:
        """(return value, errno) of madvise(2); an attribute so tests can record a kernel's answer."""
        rc = int(self._libc.madvise(addr, length, advice))
        return rc, ctypes.get_errno() if rc != 0 else 0

    def inject(self, addr: int, length: int, expected_pfns: list[int] | None = None) -> InjectionRecord:
        """Poison ``[addr, addr+length)``; returns the record (``pfn`` of the first page)."""
        if addr % PAGE_SIZE or length <= 0 or length % PAGE_SIZE:
            raise InjectionRefused(
                "bad-address",
                f"madvise range must be page-aligned and non-empty, got {addr:#x}+{length:#x}",
            )
        pid = os.getpid()
        npages = length // PAGE_SIZE
        if expected_pfns is not None and len(expected_pfns) != npages:
            raise ValueError(f"expected_pfns has {len(expected_pfns)} entries for {npages} pages")
        frames = [
            prove_frame(pid, addr + i * PAGE_SIZE, None if expected_pfns is None else expected_pfns[i])
            for i in range(npages)
        ]
        for frame in frames:
            _recheck(frame)
        hc_before = hardware_corrupted_kib()
        t_wall = time.time_ns()
        t0 = time.monotonic_ns()
        with _sigbus_tolerated() as sigbus:
            _rc, err = self._madvise(addr, length, m.MADV_HWPOISON)
        t1 = time.monotonic_ns()
        state = _poison_state([f.pfn for f in frames], hc_before)
        if err and not state.poisoned:
            raise HwpoisonUnsupported(err, madvise_failure_sentence(err))
        if err:
            _log.info("MADV_HWPOISON returned %s, yet %s", errno.errorcode.get(err, err), state.sentence())
        record = InjectionRecord(
            method="madvise",
            pid=pid,
            va=addr,
            pfn=frames[0].pfn,
            length=length,
            t_start_ns=t0,
            t_end_ns=t1,
            t_wall_ns=t_wall,
            flags_before=frames[0].flags.names,
            detail="pfns " + ",".join(f"{f.pfn:#x}" for f in frames) + f"; {state.sentence()}",
            pfns=tuple(f.pfn for f in frames),
            poisoned=state.poisoned,
            call_errno=err,
            hardware_corrupted_kib=state.hardware_corrupted_kib,
            sigbus_during_call=len(sigbus),
        )
        _log.info("MADV_HWPOISON pid %d va %#x+%#x pfn %#x", pid, addr, length, frames[0].pfn)
        self.records.append(record)
        return record


def madvise_failure_sentence(err: int) -> str:
    """What a failed ``madvise(MADV_HWPOISON)`` means, for a lab engineer."""
    name = errno.errorcode.get(err, str(err))
    if err == errno.EINVAL:
        return f"host kernel lacks CONFIG_MEMORY_FAILURE: MADV_HWPOISON returned {name}"
    if err == errno.EPERM:
        return f"MADV_HWPOISON needs CAP_SYS_ADMIN: it returned {name}"
    return f"MADV_HWPOISON failed with {name} ({os.strerror(err)})"


class CorruptPfnInjector(_Injector):
    """debugfs ``hwpoison/corrupt-pfn`` (CONFIG_HWPOISON_INJECT) on a proven frame of any pid.

    The kernel handles it like an action-optional machine check on that frame. ``debugfs``
    is the debugfs mount point (see ``kernelfs.mounted``).
    """

    def __init__(self, debugfs: Path | None) -> None:
        super().__init__(debugfs)
        self.corrupt_path = None if debugfs is None else debugfs / m.HWPOISON_CORRUPT_PFN

    def require(self) -> Path:
        if self.corrupt_path is None:
            raise HwpoisonUnsupported(
                errno.ENOENT, "debugfs is not mounted and could not be mounted: no hwpoison-inject"
            )
        if not self.corrupt_path.exists():
            raise HwpoisonUnsupported(
                errno.ENOENT,
                f"host kernel lacks CONFIG_HWPOISON_INJECT: {self.corrupt_path} does not exist",
            )
        return self.corrupt_path

    def inject(self, pid: int, va: int, expected_pfn: int | None = None) -> InjectionRecord:
        """Poison the frame proven (``prove_frame``) to back ``va`` of ``pid``."""
        self.require()
        frame = prove_frame(pid, va, expected_pfn)
        return self._write(frame.pfn, pid=pid, va=va, flags_before=frame.flags.names,
                           recheck=lambda: _recheck(frame))

    def inject_private(self, pfn: int, *, pid: int, gpa: int, recheck: Callable[[], None]) -> InjectionRecord:
        """Poison ``pfn``, already proven to back private ``gpa`` of the VM ``pid`` runs
        (``private_frames.prove_private_frame``); ``recheck`` raises ``InjectionRefused`` if
        that no longer holds, right before the write."""
        self.require()
        return self._write(pfn, pid=pid, va=0, gpa=gpa, flags_before=read_kpageflags(pfn).names, recheck=recheck)

    def _write(self, pfn: int, *, pid: int, va: int, flags_before: tuple[str, ...], recheck: Callable[[], None],
               gpa: int | None = None) -> InjectionRecord:
        path = self.require()
        recheck()
        hc_before = hardware_corrupted_kib()
        t_wall = time.time_ns()
        t0 = time.monotonic_ns()
        err = 0
        try:
            _write_sysfs(path, f"{pfn:#x}")
        except OSError as exc:
            err = exc.errno or errno.EIO
            failure: OSError | None = exc
        else:
            failure = None
        t1 = time.monotonic_ns()
        state = _poison_state([pfn], hc_before)
        if failure is not None and not state.poisoned:
            raise failure
        record = InjectionRecord(
            method="corrupt-pfn",
            pid=pid,
            va=va,
            gpa=gpa,
            pfn=pfn,
            length=PAGE_SIZE,
            t_start_ns=t0,
            t_end_ns=t1,
            t_wall_ns=t_wall,
            flags_before=flags_before,
            detail=f"wrote {pfn:#x} to {path}"
            + (f" ({errno.errorcode.get(err, err)})" if err else "")
            + f"; {state.sentence()}",
            poisoned=state.poisoned,
            call_errno=err,
            hardware_corrupted_kib=state.hardware_corrupted_kib,
        )
        _log.info("corrupt-pfn pid %d %s pfn %#x", pid, f"gpa {gpa:#x}" if gpa is not None else f"va {va:#x}", pfn)
        self.records.append(record)
        return record


class EinjInjector(_Injector):
    """ACPI APEI EINJ: memory uncorrectable non-fatal (type 0x10) at a proven frame.

    Real firmware raises a real machine check; there is no undo for the hardware error, only
    the kernel's unpoison of its bookkeeping when hwpoison-inject is present.
    """

    def __init__(self, debugfs: Path | None) -> None:
        super().__init__(debugfs)
        self.einj_dir = None if debugfs is None else debugfs / m.EINJ_DIR

    def require(self) -> Path:
        if self.einj_dir is None:
            raise HwpoisonUnsupported(errno.ENOENT, "debugfs is not mounted and could not be mounted: no APEI EINJ")
        types = self.einj_dir / "available_error_type"
        if not types.exists():
            raise HwpoisonUnsupported(
                errno.ENOENT,
                f"host has no ACPI EINJ (firmware table or CONFIG_ACPI_APEI_EINJ): {types} does not exist",
            )
        offered = {int(line.split()[0], 16) for line in types.read_text().splitlines() if line}
        if m.EINJ_TYPE_MEM_UNCORRECTABLE_NONFATAL not in offered:
            raise HwpoisonUnsupported(
                errno.EOPNOTSUPP,
                "firmware EINJ does not offer memory uncorrectable non-fatal (0x10); it offers "
                + ", ".join(f"{t:#x}" for t in sorted(offered)),
            )
        return self.einj_dir

    def inject(self, pid: int, va: int, expected_pfn: int | None = None) -> InjectionRecord:
        einj = self.require()
        frame = prove_frame(pid, va, expected_pfn)
        _recheck(frame)
        page_addr = frame.pfn * PAGE_SIZE
        mask = ~(PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF
        t_wall = time.time_ns()
        t0 = time.monotonic_ns()
        _write_sysfs(einj / "error_type", f"{m.EINJ_TYPE_MEM_UNCORRECTABLE_NONFATAL:#x}")
        if (einj / "flags").exists():
            _write_sysfs(einj / "flags", f"{m.EINJ_FLAG_PHYS_ADDR_VALID:#x}")
        _write_sysfs(einj / "param1", f"{page_addr:#x}")
        _write_sysfs(einj / "param2", f"{mask:#x}")
        if (einj / "notrigger").exists():
            _write_sysfs(einj / "notrigger", "0")
        _write_sysfs(einj / "error_inject", "1")
        t1 = time.monotonic_ns()
        record = InjectionRecord(
            method="einj",
            pid=pid,
            va=va,
            pfn=frame.pfn,
            length=PAGE_SIZE,
            t_start_ns=t0,
            t_end_ns=t1,
            t_wall_ns=t_wall,
            flags_before=frame.flags.names,
            detail=f"type 0x10 param1 {page_addr:#x} param2 {mask:#x} via {einj}",
        )
        _log.info("EINJ pid %d va %#x phys %#x", pid, va, page_addr)
        self.records.append(record)
        return record
