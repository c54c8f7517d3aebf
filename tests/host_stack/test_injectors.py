"""Poison injectors: every path this machine allows, for real.

The MADV_HWPOISON call runs only in child processes (on a host with memory failure it really
poisons the child's page). The interlock is exercised on real frames: untouched pages, the
shared zero page, wrong expected PFNs, and real kernel frames (reserved, slab, buddy, page
table) found in /proc/kpageflags. Where this host lacks debugfs hwpoison-inject or EINJ, the
"missing" path runs for real; the write and clean-up sequence is then checked against a
stand-in directory (a fake debugfs, named as such) because no real one exists here.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_stack import mm_uapi as m
from host_stack.capabilities import HostReport, probe_host
from host_stack.injectors import (
    CorruptPfnInjector,
    EinjInjector,
    HwpoisonUnsupported,
    InjectionRecord,
    InjectionRefused,
    MadviseInjector,
    ProvenFrame,
    _recheck,
    check_frame_flags,
    cleanup_warnings,
    madvise_failure_sentence,
    prove_frame,
)
from host_stack.kernelfs import DEBUGFS, mounted
from host_stack.kvm import HostMapping
from host_stack.pagemap import PAGE_SIZE, PageFlags, read_kpageflags, read_pagemap

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="PFNs and kpageflags need root")


@pytest.fixture(scope="module")
def report() -> HostReport:
    return probe_host()


@pytest.fixture
def touched() -> Iterator[HostMapping]:
    with HostMapping.anonymous(2 * PAGE_SIZE, "touched") as mp:
        mp.write(0, b"\x11")
        yield mp


# --- MADV_HWPOISON, in a child -------------------------------------------------------------
MADVISE_CHILD = """
import json, sys
from host_stack.injectors import HwpoisonUnsupported, MadviseInjector
from host_stack.kvm import HostMapping, KvmSystem
from host_stack import kvm_uapi as u
if sys.argv[1] == "gmem":
    kvm = KvmSystem(); vm = kvm.create_vm()
    gmem = vm.create_guest_memfd(0x4000, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    mp = gmem.mmap()
else:
    mp = HostMapping.anonymous(0x4000)
mp.write(0x1000, b"x")
try:
    rec = MadviseInjector().inject(mp.addr + 0x1000, 0x1000)
    print(json.dumps({"outcome": "injected", "pfn": rec.pfn, "va": rec.va}), flush=True)
except HwpoisonUnsupported as exc:
    print(json.dumps({"outcome": "unsupported", "errno": exc.errno, "message": str(exc)}))
"""


def _run_madvise_child(kind: str) -> tuple[int, dict[str, object]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", MADVISE_CHILD, kind],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert lines, f"child printed nothing (exit {proc.returncode}): {proc.stderr}"
    return proc.returncode, json.loads(lines[0])


GMEM = (pytest.mark.kvm, pytest.mark.host_requires("kvm", "guest_memfd", "guest_memfd_mmap"))


@pytest.mark.parametrize("kind", ["anon", pytest.param("gmem", marks=GMEM)], ids=["anon", "guest_memfd"])
def test_madvise_hwpoison_outcome_matches_probe(kind: str, report: HostReport) -> None:
    rc, out = _run_madvise_child(kind)
    if report.hwpoison:
        # memory_failure ran: the child may have been killed by SIGBUS right after madvise.
        assert out["outcome"] == "injected" and rc in (0, -m.SIGBUS), (rc, out)
        assert read_kpageflags(int(str(out["pfn"]))).hwpoison, "the frame must carry HWPOISON"
    else:
        assert out["outcome"] == "unsupported", out
        assert out["errno"] == report.hwpoison_errno, (out, report.hwpoison_errno)
        assert out["message"] == report.hwpoison_reason == report.missing("hwpoison")


def test_madvise_failure_sentences_name_the_fix() -> None:
    assert "CONFIG_MEMORY_FAILURE" in madvise_failure_sentence(errno.EINVAL)
    assert "CAP_SYS_ADMIN" in madvise_failure_sentence(errno.EPERM)
    assert "EIO" in madvise_failure_sentence(errno.EIO)


def test_madvise_refuses_before_calling_the_kernel(touched: HostMapping) -> None:
    inj = MadviseInjector()
    with pytest.raises(InjectionRefused) as info:
        inj.inject(touched.addr, 2 * PAGE_SIZE)  # second page never touched
    assert info.value.reason == "not-present"
    with pytest.raises(InjectionRefused, match="page-aligned") as info:
        inj.inject(touched.addr + 1, PAGE_SIZE)
    assert info.value.reason == "bad-address"
    assert inj.records == [], "a refused injection must leave no record"


# --- the interlock on real frames --------------------------------------------------------
def test_proves_own_touched_page(touched: HostMapping) -> None:
    frame = prove_frame(os.getpid(), touched.addr + 5)
    assert frame.pfn == read_pagemap(touched.addr).pfn
    assert frame.physical_address == frame.pfn * PAGE_SIZE + 5
    assert "anon" in frame.flags.names and "mmap" in frame.flags.names


def test_refuses_untouched_page(touched: HostMapping) -> None:
    with pytest.raises(InjectionRefused, match="not present") as info:
        prove_frame(os.getpid(), touched.addr + PAGE_SIZE)
    assert info.value.reason == "not-present"


def test_refuses_wrong_expected_pfn(touched: HostMapping) -> None:
    pfn = read_pagemap(touched.addr).pfn
    assert pfn is not None
    with pytest.raises(InjectionRefused) as info:
        prove_frame(os.getpid(), touched.addr, expected_pfn=pfn + 1)
    assert info.value.reason == "pfn-mismatch"
    assert f"{pfn + 1:#x}" in str(info.value) and f"{pfn:#x}" in str(info.value)


def test_refuses_the_shared_zero_page() -> None:
    with HostMapping.anonymous(PAGE_SIZE, "read-only touched") as mp:
        assert mp.read(0, 1) == b"\0"  # a read fault maps the shared zero page
        with pytest.raises(InjectionRefused) as info:
            prove_frame(os.getpid(), mp.addr)
    assert info.value.reason == "zero-page", str(info.value)


def test_refuses_a_page_that_moved(touched: HostMapping) -> None:
    frame = prove_frame(os.getpid(), touched.addr)
    stale = ProvenFrame(frame.pid, frame.va, frame.pfn + 1, frame.pagemap, frame.flags)
    with pytest.raises(InjectionRefused) as info:
        _recheck(stale)
    assert info.value.reason == "moved"


def test_proves_a_page_of_another_process() -> None:
    """The target's own pagemap decides: a child's view of a shared page gives our PFN."""
    with mmap.mmap(-1, PAGE_SIZE) as shared:
        shared[0] = 1
        addr = ctypes.addressof(ctypes.c_char.from_buffer(shared))
        ours = read_pagemap(addr).pfn
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
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
            frame = prove_frame(pid, addr, expected_pfn=ours)
            with pytest.raises(InjectionRefused) as info:
                prove_frame(pid, addr + PAGE_SIZE * 4096)  # not mapped in the child
        finally:
            os.close(go_w)
            os.close(ready_r)
            os.waitpid(pid, 0)
    assert frame.pid == pid and frame.pfn == ours
    assert info.value.reason == "not-present"


def test_refuses_when_the_pfn_is_hidden() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
            page = mmap.mmap(-1, PAGE_SIZE)
            page[0] = 1
            addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
            try:
                prove_frame(os.getpid(), addr)
                os.write(w, b"proved")
            except InjectionRefused as exc:
                os.write(w, exc.reason.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        out = os.read(r, 64).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert out == "pfn-hidden"


def _find_frames() -> dict[str, int]:
    """First PFN whose only forbidden flag is each one (and one kernel page without KPF_MMAP)."""
    wanted = {
        "reserved": m.KPF_RESERVED,
        "slab": m.KPF_SLAB,
        "buddy": m.KPF_BUDDY,
        "pgtable": m.KPF_PGTABLE,
        "nopage": m.KPF_NOPAGE,
    }
    forbidden = 0
    for bit in (*wanted.values(), m.KPF_ZERO_PAGE, m.KPF_OFFLINE, m.KPF_HWPOISON):
        forbidden |= 1 << bit
    found: dict[str, int] = {}
    chunk = 1 << 15
    with open("/proc/kpageflags", "rb", buffering=0) as f:
        pfn = 0
        while len(found) < len(wanted) + 1:
            data = f.read(chunk * 8)
            if not data:
                break
            for i in range(len(data) // 8):
                raw = int.from_bytes(data[i * 8 : i * 8 + 8], "little")
                for name, bit in wanted.items():
                    if name not in found and raw & forbidden == 1 << bit:
                        found[name] = pfn + i
                # a real page (on the LRU, e.g. page cache) that no process maps
                unmapped_lru = raw >> m.KPF_MMAP & 1 == 0 and raw >> m.KPF_LRU & 1 == 1
                if "kernel" not in found and raw & forbidden == 0 and unmapped_lru:
                    found["kernel"] = pfn + i
            pfn += len(data) // 8
    return found


@pytest.fixture(scope="module")
def kernel_frames() -> dict[str, int]:
    return _find_frames()


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("reserved", "reserved"),
        ("slab", "slab"),
        ("buddy", "buddy"),
        ("pgtable", "pgtable"),
        ("nopage", "nopage"),
        ("kernel", "not-user-mapped"),
    ],
)
def test_refuses_real_kernel_frames(kind: str, reason: str, kernel_frames: dict[str, int]) -> None:
    if kind not in kernel_frames:
        pytest.skip(f"no frame of kind {kind} in /proc/kpageflags on this host")
    flags = read_kpageflags(kernel_frames[kind])
    with pytest.raises(InjectionRefused) as info:
        check_frame_flags(flags)
    assert info.value.reason == reason, (str(info.value), flags.names)
    assert f"{flags.pfn:#x}" in str(info.value)


# --- debugfs hwpoison-inject --------------------------------------------------------------
def test_corrupt_pfn_on_this_host(report: HostReport, touched: HostMapping) -> None:
    """Real debugfs: poison and unpoison where hwpoison-inject exists, else the reason."""
    with mounted(DEBUGFS) as debugfs:
        inj = CorruptPfnInjector(debugfs)
        if not report.hwpoison_inject:
            with pytest.raises(HwpoisonUnsupported) as info:
                inj.inject(os.getpid(), touched.addr)
            assert info.value.errno == errno.ENOENT
            assert "CONFIG_HWPOISON_INJECT" in str(info.value) or "debugfs" in str(info.value)
            return
        with inj:
            rec = inj.inject(os.getpid(), touched.addr)
            assert rec.pfn is not None and read_kpageflags(rec.pfn).hwpoison
        assert inj.records[0].cleanup.startswith("unpoisoned"), inj.records
        assert not read_kpageflags(rec.pfn).hwpoison


def test_corrupt_pfn_without_debugfs(touched: HostMapping) -> None:
    with pytest.raises(HwpoisonUnsupported, match="debugfs is not mounted"):
        CorruptPfnInjector(None).inject(os.getpid(), touched.addr)


@pytest.fixture
def standin_debugfs(tmp_path: Path) -> Path:
    """A stand-in for debugfs (a plain directory): this host has no hwpoison-inject/EINJ."""
    (tmp_path / "hwpoison").mkdir()
    (tmp_path / m.HWPOISON_CORRUPT_PFN).write_text("")
    (tmp_path / m.HWPOISON_UNPOISON_PFN).write_text("")
    einj = tmp_path / m.EINJ_DIR
    einj.mkdir(parents=True)
    for name in ("error_type", "flags", "param1", "param2", "notrigger", "error_inject"):
        (einj / name).write_text("")
    (einj / "available_error_type").write_text(
        "0x00000008\tMemory Correctable\n0x00000010\tMemory Uncorrectable non-fatal\n"
    )
    return tmp_path


def test_corrupt_pfn_writes_proven_pfn_and_unpoisons(standin_debugfs: Path, touched: HostMapping) -> None:
    pfn = read_pagemap(touched.addr).pfn
    assert pfn is not None
    with CorruptPfnInjector(standin_debugfs) as inj:
        with pytest.raises(InjectionRefused):
            inj.inject(os.getpid(), touched.addr + PAGE_SIZE)  # untouched: nothing written
        assert (standin_debugfs / m.HWPOISON_CORRUPT_PFN).read_text() == ""
        rec = inj.inject(os.getpid(), touched.addr, expected_pfn=pfn)
        assert (standin_debugfs / m.HWPOISON_CORRUPT_PFN).read_text() == f"{pfn:#x}"
        assert (rec.method, rec.pid, rec.va, rec.pfn) == ("corrupt-pfn", os.getpid(), touched.addr, pfn)
        assert rec.t_start_ns <= rec.t_end_ns
    assert (standin_debugfs / m.HWPOISON_UNPOISON_PFN).read_text() == f"{pfn:#x}"
    assert inj.records[0].cleanup == f"unpoisoned pfn {pfn:#x}"


def test_madvise_cleanup_says_when_it_cannot_unpoison(tmp_path: Path) -> None:
    inj = MadviseInjector(debugfs=tmp_path)  # no hwpoison/unpoison-pfn in it
    inj.records.append(InjectionRecord("madvise", os.getpid(), 0x1000, 0x1234, PAGE_SIZE, 1, 2, 3))
    (done,) = inj.cleanup()
    assert "CONFIG_HWPOISON_INJECT" in done.cleanup


def test_multi_page_madvise_record_unpoisons_every_frame(
    standin_debugfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3-page MADV_HWPOISON poisons 3 frames: cleanup must write all 3 to unpoison-pfn, not just the first."""
    import host_stack.injectors as injectors

    writes: list[tuple[str, str]] = []
    monkeypatch.setattr(injectors, "_write_sysfs", lambda path, value: writes.append((path.name, value)))
    inj = MadviseInjector(debugfs=standin_debugfs)
    inj.records.append(
        InjectionRecord("madvise", os.getpid(), 0x7000, 0x1234, 3 * PAGE_SIZE, 1, 2, 3, pfns=(0x1234, 0x99, 0x5000))
    )
    (done,) = inj.cleanup()
    assert writes == [("unpoison-pfn", "0x1234"), ("unpoison-pfn", "0x99"), ("unpoison-pfn", "0x5000")]
    assert done.cleanup == "unpoisoned pfn 0x1234; unpoisoned pfn 0x99; unpoisoned pfn 0x5000"


# --- ACPI EINJ ---------------------------------------------------------------------------
def test_einj_on_this_host(report: HostReport) -> None:
    with mounted(DEBUGFS) as debugfs:
        if report.einj:
            pytest.skip("host has EINJ: a real firmware injection is a lab action, not a unit test")
        with pytest.raises(HwpoisonUnsupported, match="EINJ") as info:
            EinjInjector(debugfs).require()
    assert info.value.errno == errno.ENOENT


def test_einj_refuses_firmware_without_memory_uc(standin_debugfs: Path) -> None:
    (standin_debugfs / m.EINJ_DIR / "available_error_type").write_text("0x00000008\tMem CE\n")
    with pytest.raises(HwpoisonUnsupported, match="offers 0x8") as info:
        EinjInjector(standin_debugfs).require()
    assert info.value.errno == errno.EOPNOTSUPP


def test_einj_writes_type_address_and_mask(standin_debugfs: Path, touched: HostMapping) -> None:
    pfn = read_pagemap(touched.addr).pfn
    assert pfn is not None
    rec = EinjInjector(standin_debugfs).inject(os.getpid(), touched.addr + 0x10, expected_pfn=pfn)
    einj = standin_debugfs / m.EINJ_DIR
    written = {n: (einj / n).read_text() for n in ("error_type", "flags", "param1", "param2",
                                                   "notrigger", "error_inject")}  # fmt: skip
    assert written == {
        "error_type": "0x10",
        "flags": "0x2",
        "param1": f"{pfn * PAGE_SIZE:#x}",
        "param2": "0xfffffffffffff000",
        "notrigger": "0",
        "error_inject": "1",
    }
    assert (rec.method, rec.pfn, rec.va) == ("einj", pfn, touched.addr + 0x10)


# --- judged by the frame's state, not the return code (standard 7.3.4 kernel) ---------------
@pytest.fixture
def poisoned_after_call(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Recorded 7.3.4 answer: after the call the frame has KPF_HWPOISON and HardwareCorrupted +4 kB.

    This host cannot poison, so the kpageflags and meminfo readers replay what the lab host
    showed; they answer truthfully (the real flags) until the injection call was made.
    """
    import host_stack.injectors as injectors

    calls: list[str] = []
    real_flags = read_kpageflags
    meminfo = iter([0, 4])

    def kpageflags(pfn: int) -> PageFlags:
        flags = real_flags(pfn)
        return PageFlags(pfn, flags.raw | 1 << m.KPF_HWPOISON) if calls else flags

    monkeypatch.setattr(injectors, "read_kpageflags", kpageflags)
    monkeypatch.setattr(injectors, "hardware_corrupted_kib", lambda: next(meminfo))
    return calls


def test_madvise_ebusy_on_a_poisoned_frame_is_an_injection(
    touched: HostMapping, poisoned_after_call: list[str], tmp_path: Path
) -> None:
    inj = MadviseInjector(debugfs=tmp_path)

    def madvise_7_3_4(addr: int, length: int, advice: int) -> tuple[int, int]:
        poisoned_after_call.append("madvise")
        signal.raise_signal(signal.SIGBUS)  # the BUS_MCEERR_AR a dirty mapped page earns during the call
        return -1, errno.EBUSY

    inj._madvise = madvise_7_3_4
    rec = inj.inject(touched.addr, PAGE_SIZE)
    assert rec.poisoned is True, rec
    assert rec.call_errno == errno.EBUSY, f"expected the EBUSY kept as evidence, got {rec.call_errno}"
    assert rec.hardware_corrupted_kib == (0, 4)
    assert rec.sigbus_during_call == 1, "expected the SIGBUS during madvise to be survived and counted"
    assert "KPF_HWPOISON" in rec.detail and "+4 kB" in rec.detail


def test_madvise_error_on_an_unpoisoned_frame_is_no_injection(touched: HostMapping, tmp_path: Path) -> None:
    inj = MadviseInjector(debugfs=tmp_path)
    inj._madvise = lambda addr, length, advice: (-1, errno.EBUSY)
    with pytest.raises(HwpoisonUnsupported, match="EBUSY") as exc:
        inj.inject(touched.addr, PAGE_SIZE)
    assert exc.value.errno == errno.EBUSY and inj.records == []


def test_corrupt_pfn_ebusy_on_a_poisoned_frame_is_an_injection(
    standin_debugfs: Path, touched: HostMapping, poisoned_after_call: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import host_stack.injectors as injectors

    real_write = injectors._write_sysfs

    def write(path: Path, value: str) -> None:
        if path.name == "corrupt-pfn":
            poisoned_after_call.append(value)
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_write(path, value)

    monkeypatch.setattr(injectors, "_write_sysfs", write)
    with CorruptPfnInjector(standin_debugfs) as inj:
        rec = inj.inject(os.getpid(), touched.addr)
    assert (rec.poisoned, rec.call_errno) == (True, errno.EBUSY), rec
    assert inj.records[0].cleanup == f"unpoisoned pfn {rec.pfn:#x}"


def test_a_failed_unpoison_is_a_warning_even_when_the_block_raised(
    standin_debugfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unpoison = standin_debugfs / m.HWPOISON_UNPOISON_PFN
    unpoison.unlink()
    unpoison.mkdir()  # writing to it fails (EISDIR), as a refused unpoison-pfn would
    with pytest.raises(RuntimeError, match="the test body failed"), MadviseInjector(standin_debugfs) as inj:
        inj.records.append(InjectionRecord("madvise", os.getpid(), 0x7000, 0x1234, PAGE_SIZE, 1, 2, 3))
        raise RuntimeError("the test body failed")
    (rec,) = inj.records
    assert rec.cleanup_failed, f"expected cleanup_failed, got {rec}"
    (warning,) = cleanup_warnings(inj.records)
    assert "pfn 0x1234" in warning and "failed" in warning
    assert any(r.levelname == "WARNING" and "unpoison-pfn 0x1234 failed" in r.getMessage() for r in caplog.records)
