"""Host page-table and page-flag readers: ``/proc/PID/pagemap``, ``/proc/kpageflags``, meminfo.

Poison must hit exactly the page that backs the target, so the injectors resolve a virtual
address to a PFN through the target's own pagemap and check that PFN's flags before touching
it. The same readers give two of the three independent observables of an injection
(``KPF_HWPOISON`` and ``HardwareCorrupted``), the third being the SIGBUS siginfo.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass
from typing import Final

from host_stack import mm_uapi as m
from host_stack.errors import HostStackError

__all__ = [
    "PAGE_SIZE",
    "PageFlags",
    "PagemapEntry",
    "PagemapError",
    "Vma",
    "find_vma",
    "free_hugepages",
    "hardware_corrupted_kib",
    "parse_maps_line",
    "read_kpageflags",
    "read_memory",
    "read_pagemap",
]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

PAGE_SIZE: Final = mmap.PAGESIZE
KPAGEFLAGS_PATH: Final = "/proc/kpageflags"
MEMINFO_PATH: Final = "/proc/meminfo"


class PagemapError(HostStackError, OSError):
    """A pagemap/kpageflags read failed; names the file, the offset asked for and the errno."""


@dataclass(frozen=True)
class PagemapEntry:
    """One decoded pagemap entry for the page containing ``va`` in process ``pid``.

    ``pfn`` is None when the page is not present or when the kernel zeroed the PFN field
    because the reader lacks CAP_SYS_ADMIN: an injector must not confuse that with PFN 0.
    """

    pid: int
    va: int
    raw: int

    @property
    def present(self) -> bool:
        return bool(self.raw & m.PM_PRESENT)

    @property
    def swapped(self) -> bool:
        return bool(self.raw & m.PM_SWAP)

    @property
    def file_or_shared(self) -> bool:
        return bool(self.raw & m.PM_FILE)

    @property
    def exclusive(self) -> bool:
        return bool(self.raw & m.PM_MMAP_EXCLUSIVE)

    @property
    def soft_dirty(self) -> bool:
        return bool(self.raw & m.PM_SOFT_DIRTY)

    @property
    def pfn(self) -> int | None:
        if not self.present:
            return None
        pfn = self.raw & m.PM_PFN_MASK
        return pfn if pfn != 0 else None

    @property
    def pfn_hidden(self) -> bool:
        """Present but the PFN field reads 0: the kernel hid it (no CAP_SYS_ADMIN)."""
        return self.present and (self.raw & m.PM_PFN_MASK) == 0

    @property
    def swap_type(self) -> int | None:
        return self.raw & m.PM_SWAP_TYPE_MASK if self.swapped else None

    @property
    def swap_offset(self) -> int | None:
        if not self.swapped:
            return None
        return (self.raw & m.PM_PFN_MASK) >> m.PM_SWAP_OFFSET_SHIFT

    @property
    def physical_address(self) -> int | None:
        """Host physical address of ``va`` (PFN * page size + offset in page), when known."""
        pfn = self.pfn
        return None if pfn is None else pfn * PAGE_SIZE + (self.va % PAGE_SIZE)


@dataclass(frozen=True)
class PageFlags:
    """Decoded ``/proc/kpageflags`` word for one PFN."""

    pfn: int
    raw: int

    def has(self, bit: int) -> bool:
        return bool(self.raw >> bit & 1)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for bit, name in sorted(m.KPF_NAMES.items()) if self.has(bit))

    @property
    def hwpoison(self) -> bool:
        return self.has(m.KPF_HWPOISON)

    @property
    def reserved(self) -> bool:
        return self.has(m.KPF_RESERVED)

    @property
    def slab(self) -> bool:
        return self.has(m.KPF_SLAB)

    @property
    def buddy(self) -> bool:
        return self.has(m.KPF_BUDDY)

    @property
    def nopage(self) -> bool:
        return self.has(m.KPF_NOPAGE)

    @property
    def huge(self) -> bool:
        return self.has(m.KPF_HUGE)

    @property
    def thp(self) -> bool:
        return self.has(m.KPF_THP)

    @property
    def pgtable(self) -> bool:
        return self.has(m.KPF_PGTABLE)

    @property
    def mapped_to_user(self) -> bool:
        return self.has(m.KPF_MMAP)


def _read_u64(path: str, index: int) -> int:
    offset = index * m.PAGEMAP_ENTRY_SIZE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PagemapError(exc.errno, f"open {path}: {exc.strerror}") from exc
    try:
        data = os.pread(fd, m.PAGEMAP_ENTRY_SIZE, offset)
    except OSError as exc:
        raise PagemapError(exc.errno, f"pread {path} at {offset:#x}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) != m.PAGEMAP_ENTRY_SIZE:
        raise PagemapError(0, f"short read from {path} at {offset:#x}: expected 8 bytes, got {len(data)}")
    return int.from_bytes(data, "little")


def read_pagemap(va: int, pid: int | None = None) -> PagemapEntry:
    """Read the pagemap entry of ``va`` in ``pid`` (this process when None)."""
    if va < 0:
        raise ValueError(f"virtual address must be >= 0, got {va:#x}")
    who = "self" if pid is None else str(pid)
    raw = _read_u64(f"/proc/{who}/pagemap", va // PAGE_SIZE)
    entry = PagemapEntry(pid=os.getpid() if pid is None else pid, va=va, raw=raw)
    _log.debug("pagemap pid %d va %#x -> %#018x", entry.pid, va, raw)
    return entry


@dataclass(frozen=True)
class Vma:
    """One line of ``/proc/PID/maps``: which object a virtual address maps, at what offset.

    A PFN from the pagemap proves *a* frame backs the address; the VMA proves whose frame it
    is (e.g. ``anon_inode:[kvm-gmem]`` at file offset ``index * PAGE_SIZE``).
    """

    start: int
    end: int
    perms: str
    offset: int
    path: str

    def file_offset(self, va: int) -> int:
        return self.offset + (va - self.start)


def parse_maps_line(line: str) -> Vma:
    """Pure: ``start-end perms offset dev inode [path]`` (path may be empty or hold spaces)."""
    fields = line.rstrip("\n").split(maxsplit=5)
    if len(fields) < 5 or "-" not in fields[0]:
        raise ValueError(f"not a /proc/PID/maps line: {line!r}")
    start, _, end = fields[0].partition("-")
    return Vma(int(start, 16), int(end, 16), fields[1], int(fields[2], 16), fields[5] if len(fields) > 5 else "")


def find_vma(va: int, pid: int | None = None) -> Vma | None:
    """The VMA of ``pid`` (this process when None) containing ``va``; None if none does."""
    who = "self" if pid is None else str(pid)
    with open(f"/proc/{who}/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            vma = parse_maps_line(line)
            if vma.start <= va < vma.end:
                return vma
    return None


def read_memory(pid: int, va: int, size: int) -> bytes:
    """``size`` bytes at ``va`` of ``pid`` through ``/proc/PID/mem`` (ptrace-read access needed).

    The injector's interlock compares them with what the guest says lives there: a frame is
    poisoned only when the target process itself holds the expected bytes at that address.
    """
    if va < 0 or size < 1:
        raise ValueError(f"need va >= 0 and size >= 1, got va {va:#x} size {size}")
    path = f"/proc/{pid}/mem"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PagemapError(exc.errno, f"open {path}: {exc.strerror}") from exc
    try:
        data = os.pread(fd, size, va)
    except OSError as exc:
        raise PagemapError(exc.errno, f"pread {path} at {va:#x}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) != size:
        raise PagemapError(0, f"short read from {path} at {va:#x}: expected {size} bytes, got {len(data)}")
    return data


def read_kpageflags(pfn: int) -> PageFlags:
    """Read the kernel's flags for ``pfn`` (needs root: the file is mode 0400)."""
    if pfn < 0:
        raise ValueError(f"pfn must be >= 0, got {pfn:#x}")
    return PageFlags(pfn=pfn, raw=_read_u64(KPAGEFLAGS_PATH, pfn))


def hardware_corrupted_kib(path: str = MEMINFO_PATH) -> int | None:
    """``HardwareCorrupted`` from meminfo in KiB; None when the kernel has no such line.

    The line exists only with CONFIG_MEMORY_FAILURE, so its absence is itself a finding.
    """
    with open(path, encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == m.MEMINFO_HARDWARE_CORRUPTED:
                return int(rest.split()[0])
    return None


def free_hugepages(size_kib: int = 2048, sysfs: str = "/sys/kernel/mm/hugepages") -> int | None:
    """Free huge pages of ``size_kib`` on this host; None when the kernel has no such size."""
    try:
        with open(f"{sysfs}/hugepages-{size_kib}kB/free_hugepages", encoding="ascii") as f:
            return int(f.read())
    except FileNotFoundError:
        return None
