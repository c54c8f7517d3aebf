"""pagemap/kpageflags/meminfo readers, checked on this process's own pages."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from host_stack import mm_uapi as m
from host_stack.kvm import HostMapping
from host_stack.pagemap import (
    PAGE_SIZE,
    PagemapEntry,
    PagemapError,
    Vma,
    find_vma,
    hardware_corrupted_kib,
    parse_maps_line,
    read_kpageflags,
    read_pagemap,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="PFNs and kpageflags need root")


def test_untouched_anonymous_page_is_not_present() -> None:
    with HostMapping.anonymous(PAGE_SIZE) as mp:
        entry = read_pagemap(mp.addr)
        assert (entry.present, entry.pfn, entry.swapped) == (False, None, False), hex(entry.raw)


@needs_root
def test_touched_private_page_is_present_exclusive_with_pfn() -> None:
    with HostMapping.anonymous(2 * PAGE_SIZE) as mp:
        mp.write(0, b"\x5a")
        first = read_pagemap(mp.addr + 123)
        second = read_pagemap(mp.addr + PAGE_SIZE)
        assert first.present and first.exclusive, f"raw {first.raw:#018x}"
        assert first.pfn is not None and first.pfn > 0
        assert first.physical_address == first.pfn * PAGE_SIZE + 123
        assert not second.present, "the untouched neighbour page must not be present"
        flags = read_kpageflags(first.pfn)
        assert flags.has(m.KPF_ANON) and flags.mapped_to_user, flags.names
        assert not (flags.slab or flags.reserved or flags.buddy or flags.nopage), flags.names
        assert not flags.hwpoison


@needs_root
def test_two_processes_sharing_a_page_see_the_same_pfn() -> None:
    """A MAP_SHARED page read through another process's pagemap gives the same PFN."""
    with mmap.mmap(-1, PAGE_SIZE) as shared:
        shared[0] = 1
        addr = ctypes.addressof(ctypes.c_char.from_buffer(shared))
        mine = read_pagemap(addr)
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: fault the inherited shared page in, then hold it until "go"
            os.close(go_w)
            os.close(ready_r)
            _ = shared[0]
            os.write(ready_w, b"r")
            os.read(go_r, 1)
            os._exit(0)
        os.close(ready_w)
        os.close(go_r)
        try:
            assert os.read(ready_r, 1) == b"r"
            theirs = read_pagemap(addr, pid)
        finally:
            os.close(go_w)
            os.close(ready_r)
            os.waitpid(pid, 0)
        del addr
    assert mine.pfn is not None and theirs.pfn == mine.pfn, (mine, theirs)
    assert theirs.file_or_shared and not theirs.exclusive, f"raw {theirs.raw:#018x}"


def test_pfn_hidden_without_cap_sys_admin() -> None:
    """An unprivileged reader gets present pages with PFN 0: decoded as hidden, not PFN 0."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user for the comparison")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody (still dumpable so /proc/self stays readable)
        code = 1
        try:
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE = 4
            with mmap.mmap(-1, PAGE_SIZE) as page:
                page[0] = 1
                e = read_pagemap(ctypes.addressof(ctypes.c_char.from_buffer(page)))
                os.write(w, f"{e.present} {e.pfn} {e.pfn_hidden}".encode())
                del e
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        out = os.read(r, 100).decode()
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert status == 0 and out.split() == ["True", "None", "True"], (status, out)


def test_decode_swap_and_hidden_entries() -> None:
    swap = PagemapEntry(pid=1, va=0, raw=m.PM_SWAP | (0x1234 << m.PM_SWAP_OFFSET_SHIFT) | 3)
    assert (swap.present, swap.swapped, swap.swap_type, swap.swap_offset, swap.pfn) == (
        False, True, 3, 0x1234, None,
    )  # fmt: skip
    hidden = PagemapEntry(pid=1, va=0, raw=m.PM_PRESENT | m.PM_MMAP_EXCLUSIVE)
    assert (hidden.pfn, hidden.pfn_hidden, hidden.physical_address) == (None, True, None)


@needs_root
def test_pfn_zero_is_reserved_on_x86() -> None:
    """The first page frame belongs to firmware: the reader must report it reserved."""
    flags = read_kpageflags(0)
    assert flags.reserved, f"expected KPF_RESERVED for pfn 0, got {flags.names}"


def test_missing_process_and_bad_arguments() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    with pytest.raises(PagemapError, match=f"/proc/{proc.pid}/pagemap"):
        read_pagemap(0x400000, proc.pid)
    with pytest.raises(ValueError, match="must be >= 0"):
        read_pagemap(-1)
    with pytest.raises(ValueError, match="must be >= 0"):
        read_kpageflags(-5)


def test_hardware_corrupted_matches_meminfo(tmp_path: Path) -> None:
    text = Path("/proc/meminfo").read_text()
    expected = next(
        (int(line.split()[1]) for line in text.splitlines() if line.startswith("HardwareCorrupted:")),
        None,
    )
    assert hardware_corrupted_kib() == expected
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal: 10 kB\nHardwareCorrupted:     8 kB\n")
    assert hardware_corrupted_kib(str(fake)) == 8
    fake.write_text("MemTotal: 10 kB\n")
    assert hardware_corrupted_kib(str(fake)) is None


def test_maps_lines_with_and_without_a_path() -> None:
    gmem = parse_maps_line("7f4e2ab6b000-7f4e2ab8b000 rw-s 00002000 00:0f 1234   /[kvm-gmem] (deleted)\n")
    assert gmem == Vma(0x7F4E2AB6B000, 0x7F4E2AB8B000, "rw-s", 0x2000, "/[kvm-gmem] (deleted)")
    assert gmem.file_offset(0x7F4E2AB6C000) == 0x3000
    assert parse_maps_line("00400000-00401000 r-xp 00000000 00:00 0").path == ""
    with pytest.raises(ValueError, match="not a /proc/PID/maps line"):
        parse_maps_line("garbage")


def test_find_vma_names_a_shared_file_mapping_at_its_offset(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 3 * PAGE_SIZE)
    with path.open("r+b") as f, HostMapping.map(2 * PAGE_SIZE, fd=f.fileno(), offset=PAGE_SIZE) as mapping:
        vma = find_vma(mapping.addr + PAGE_SIZE)
        assert vma is not None and vma.path == str(path), vma
        assert vma.file_offset(mapping.addr + PAGE_SIZE) == 2 * PAGE_SIZE
    assert find_vma(0) is None
