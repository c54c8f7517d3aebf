"""probe_host(): each reported fact checked against an independent attempt on this host."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

import pytest

from host_stack import kvm_uapi as u
from host_stack.capabilities import REQUIREMENTS, HostReport, probe_host
from host_stack.kernelfs import TRACEFS, find_mount, mounted
from host_stack.kvm import KvmIoctlError, KvmSystem
from host_stack.linux_boot_probe import probe_linux_boot

has_kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)


@pytest.fixture(scope="module")
def report() -> HostReport:
    return probe_host()


def test_probe_leaves_no_mount_event_or_child() -> None:
    mounts_before = Path("/proc/self/mounts").read_text()
    children_before = set(os.listdir(f"/proc/{os.getpid()}/task"))
    probe_host()
    assert Path("/proc/self/mounts").read_text() == mounts_before
    assert set(os.listdir(f"/proc/{os.getpid()}/task")) == children_before
    with mounted(TRACEFS) as tracefs:
        if tracefs is None:
            pytest.skip("no tracefs to inspect")
        for name in ("kprobe_events", "uprobe_events"):
            path = tracefs / name
            if path.exists():
                assert "gmemtest_" not in path.read_text(), f"{name} keeps a probe event"


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
