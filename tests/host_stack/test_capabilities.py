"""probe_host(): each reported fact checked against an independent attempt on this host."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

from host_stack import capabilities
from host_stack import kvm_uapi as u
from host_stack.capabilities import REQUIREMENTS, HostReport, first_unmet, probe_host
from host_stack.kernelfs import TRACEFS, find_mount, mounted
from host_stack.kvm import KvmIoctlError, KvmSystem
from host_stack.linux_boot_probe import probe_linux_boot

has_kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)


@pytest.fixture(scope="module")
def report() -> HostReport:
    return probe_host()


def _threads_left_by(call: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """Thread ids ``call`` created that are still alive after it returned.

    Counting every entry of /proc/self/task is flaky: a thread of somebody else (pytest, an
    earlier test's reader finishing late) may start or end meanwhile. Owned are the threads
    this thread started during the call (Python threads, recorded at ``start``) and native
    threads that appeared during the call and are no Python thread of somebody else.
    """
    caller = threading.current_thread()
    ours: list[threading.Thread] = []
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if threading.current_thread() is caller:
            ours.append(self)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    before = {int(t) for t in os.listdir("/proc/self/task")}
    call()
    after = {int(t) for t in os.listdir("/proc/self/task")}
    monkeypatch.setattr(threading.Thread, "start", real_start)
    foreign = {t.native_id for t in threading.enumerate() if t not in ours}
    return (after - before) - foreign


def test_probe_leaves_no_mount_event_or_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    mounts_before = Path("/proc/self/mounts").read_text()
    assert _threads_left_by(lambda: probe_host().rows(), monkeypatch) == set()
    assert Path("/proc/self/mounts").read_text() == mounts_before
    assert not _live_children(), "expected no child process left by the probes"
    with mounted(TRACEFS) as tracefs:
        if tracefs is None:
            pytest.skip("no tracefs to inspect")
        for name in ("kprobe_events", "uprobe_events"):
            path = tracefs / name
            if path.exists():
                assert "gmemtest_" not in path.read_text(), f"{name} keeps a probe event"


def _live_children() -> list[int]:
    """Live children of this process (from /proc, no psutil needed)."""
    me = str(os.getpid())
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[1] == me:
                    kids.append(int(entry))
    return kids


def test_thread_accounting_ignores_a_thread_started_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flake, reproduced: another thread starts a thread while probe_host runs."""
    go, started, stop = threading.Event(), threading.Event(), threading.Event()

    def foreign_owner() -> None:
        go.wait(10)
        threading.Thread(target=stop.wait, args=(10,), name="not-probe-host", daemon=True).start()
        started.set()

    owner = threading.Thread(target=foreign_owner, daemon=True)
    owner.start()
    real_vendor = capabilities._vendor_module

    def vendor_and_foreign_thread() -> str | None:
        go.set()
        started.wait(10)
        return real_vendor()

    monkeypatch.setattr(capabilities, "_vendor_module", vendor_and_foreign_thread)
    tasks_before = set(os.listdir("/proc/self/task"))
    try:
        assert _threads_left_by(lambda: probe_host().rows(), monkeypatch) == set()
        # the old whole-process count would have seen the foreign thread as a leak:
        assert set(os.listdir("/proc/self/task")) != tasks_before
    finally:
        stop.set()
        owner.join(10)


def test_thread_accounting_catches_a_thread_the_call_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    stop = threading.Event()
    leaker = threading.Thread(target=stop.wait, args=(10,), daemon=True)
    try:
        left = _threads_left_by(lambda: leaker.start(), monkeypatch)  # noqa: PLW0108 - bind after patching
        assert left == {leaker.native_id}
    finally:
        stop.set()
        leaker.join(10)


def test_asking_for_kvm_boots_linux_runs_no_hwpoison_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """Probing is lazy per capability: only ``hwpoison`` may poison a scratch page."""

    def no_child(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError(f"expected no MADV_HWPOISON child for kvm_boots_linux, got subprocess.run{args}")

    monkeypatch.setattr(subprocess, "run", no_child)
    report = probe_host()
    sentence = report.missing("kvm_boots_linux")
    assert sentence is None or "KVM" in sentence or "/dev/kvm" in sentence
    report.missing("guest_memfd_mmap")
    assert "hwpoison" not in getattr(report, "probed", ())


def test_asking_for_hwpoison_runs_only_that_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def recorder(group: str) -> Callable[[], dict[str, object]]:
        def probe() -> dict[str, object]:
            calls.append(group)
            return {}

        return probe

    for group in ("kvm", "kvm_boots_linux", "debugfs", "tracing"):
        monkeypatch.setitem(capabilities._PROBES, group, recorder(group))
    report = probe_host()
    # Only the hwpoison probe runs; what it finds depends on the host (missing on a kernel
    # without CONFIG_MEMORY_FAILURE, present on a lab host such as Debian's 7.3.4).
    expected = None if report.hwpoison else report.hwpoison_reason
    assert report.missing("hwpoison") == expected, f"expected {expected!r}, got {report.missing('hwpoison')!r}"
    assert calls == [] and report.probed == ("hwpoison",)  # type: ignore[attr-defined]
    report.rows()
    assert sorted(calls) == ["debugfs", "kvm", "kvm_boots_linux", "tracing"]


FLAGS_0 = HostReport(
    kernel_release="7.3.4-amd64", kvm_device=True, kvm_reason=None, kvm_vendor_module="kvm_amd",
    kvm_api_version=12, cap_guest_memfd=1, guest_memfd_flags=0,
)  # fmt: skip


def test_guest_memfd_without_mmap_or_init_shared_is_a_sentence() -> None:
    assert FLAGS_0.missing("guest_memfd") is None
    assert FLAGS_0.missing("guest_memfd_mmap") == (
        "host KVM cannot mmap guest_memfd: KVM_CAP_GUEST_MEMFD_FLAGS 0x0 lacks GUEST_MEMFD_FLAG_MMAP"
    )
    init_shared = str(FLAGS_0.missing("guest_memfd_init_shared"))
    assert "KVM_CAP_GUEST_MEMFD_FLAGS 0x0 lacks GUEST_MEMFD_FLAG_INIT_SHARED" in init_shared
    mmap_only = dataclasses.replace(FLAGS_0, guest_memfd_flags=u.GUEST_MEMFD_FLAG_MMAP)
    assert mmap_only.missing("guest_memfd_mmap") is None and mmap_only.missing("guest_memfd_init_shared")
    assert first_unmet(FLAGS_0, ("kvm", "guest_memfd", "guest_memfd_mmap")) == (
        "guest_memfd_mmap", FLAGS_0.missing("guest_memfd_mmap"))


def test_kernel_and_vendor_module(report: HostReport) -> None:
    assert report.kernel_release == os.uname().release
    vendors = sorted(p.name for p in Path("/sys/module").iterdir() if p.name.startswith("kvm_"))
    assert report.kvm_vendor_module == (",".join(vendors) or None)


@pytest.mark.kvm
@pytest.mark.skipif(not has_kvm, reason="no usable /dev/kvm")
def test_vm_types_agree_with_cap_vm_types(report: HostReport) -> None:
    """KVM_CREATE_VM per type and the KVM_CAP_VM_TYPES bitmask are independent sources."""
    assert report.missing("kvm") is None
    assert report.supported_vm_types, "the default VM type must be creatable"
    for vm_type in sorted(u.VM_TYPE_NAMES):
        in_mask = bool(report.vm_types_mask >> vm_type & 1)
        assert in_mask == (vm_type in report.supported_vm_types), (
            f"VM type {vm_type}: KVM_CAP_VM_TYPES {report.vm_types_mask:#x} vs created {report.supported_vm_types}"
        )
    for _vm_type, err in report.vm_type_errors:
        assert err in errno.errorcode.values(), err


@pytest.mark.kvm
@pytest.mark.skipif(not has_kvm, reason="no usable /dev/kvm")
def test_guest_memfd_mmap_flag_matches_what_the_kernel_accepts(report: HostReport) -> None:
    with KvmSystem() as system, system.create_vm() as vm:
        try:
            with vm.create_guest_memfd(0x1000, u.GUEST_MEMFD_FLAG_MMAP) as gmem, gmem.mmap():
                accepted = True
        except KvmIoctlError:
            accepted = False
    assert accepted == report.guest_memfd_mmap, report.guest_memfd_flags
    assert (report.missing("guest_memfd_mmap") is None) == accepted


@pytest.mark.kvm
@pytest.mark.skipif(not has_kvm, reason="no usable /dev/kvm")
def test_boot_probe_is_repeatable(report: HostReport) -> None:
    with KvmSystem() as system:
        again = probe_linux_boot(system)
    assert again.control == "HLT", f"a 64-bit payload must reach HLT, got {again.control}"
    assert again.boots_linux == report.kvm_boots_linux
    assert (report.missing("kvm_boots_linux") is None) == bool(report.kvm_boots_linux)
    if not report.kvm_boots_linux:
        assert "cmpxchg16b" in str(report.missing("kvm_boots_linux"))


def test_hwpoison_is_proven_by_errno(report: HostReport) -> None:
    if report.hwpoison:
        assert report.missing("hwpoison") is None and report.hwpoison_errno == 0
    else:
        sentence = report.missing("hwpoison")
        assert sentence is not None and "MADV_HWPOISON" in sentence
        assert report.hwpoison_errno is not None
        assert errno.errorcode[report.hwpoison_errno] in sentence


def test_debugfs_interfaces_match_the_files(report: HostReport) -> None:
    with mounted(("debugfs", Path("/sys/kernel/debug"))) as debugfs:
        assert report.debugfs == (debugfs is not None)
        if debugfs is None:
            return
        assert report.hwpoison_inject == (debugfs / "hwpoison/corrupt-pfn").exists()
        assert report.einj == (debugfs / "apei/einj").is_dir()
    assert (report.missing("hwpoison_inject") is None) == report.hwpoison_inject


def test_tracing_support_matches_tracefs(report: HostReport) -> None:
    with mounted(TRACEFS) as tracefs:
        assert report.tracefs == (tracefs is not None)
        if tracefs is None:
            return
        if not (tracefs / "kprobe_events").exists():
            assert not report.kprobes and "kprobe_events" in str(report.missing("kprobes"))
        if not (tracefs / "uprobe_events").exists():
            assert not report.uprobes
    assert (report.missing("uprobes") is None) == report.uprobes


def test_missing_sentences_for_every_requirement(report: HostReport) -> None:
    for requirement in REQUIREMENTS:
        sentence = report.missing(requirement)
        assert sentence is None or (isinstance(sentence, str) and len(sentence) > 20), (
            requirement,
            sentence,
        )
    with pytest.raises(ValueError, match="valid: kvm, kvm_boots_linux"):
        report.missing("warp_drive")


def test_no_kvm_makes_every_kvm_requirement_name_dev_kvm(report: HostReport) -> None:
    no_kvm = dataclasses.replace(report, kvm_device=False, kvm_reason="open /dev/kvm: ENOENT")
    for requirement in ("kvm", "guest_memfd", "private_memory", "tdx_host"):
        assert "no usable /dev/kvm: open /dev/kvm: ENOENT" in str(no_kvm.missing(requirement))
    assert no_kvm.missing("hwpoison") == report.missing("hwpoison")


def test_report_serialises_and_tabulates(report: HostReport) -> None:
    d = json.loads(json.dumps(report.to_dict()))
    assert d["kernel_release"] == report.kernel_release
    assert d["guest_memfd_mmap"] == report.guest_memfd_mmap
    rows = dict(report.rows())
    assert rows["hwpoison (MADV_HWPOISON)"] == report.hwpoison_reason
    assert rows["KVM_CAP_GUEST_MEMFD_FLAGS"] == f"{report.guest_memfd_flags:#x}"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in report.rows())


def test_find_mount_agrees_with_proc_mounts() -> None:
    fstypes = {line.split()[2]: line.split()[1] for line in reversed(
        Path("/proc/self/mounts").read_text().splitlines())}  # fmt: skip
    assert find_mount("proc") == Path(fstypes["proc"])
    assert find_mount("no-such-fs") is None
