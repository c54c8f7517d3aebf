"""Layouts and ioctl numbers of host_stack.kvm_uapi against the kernel headers' values."""

from __future__ import annotations

import ctypes

import pytest

from host_stack import kvm_uapi as u


def test_layouts_match_kernel_sizes_and_ioctl_numbers() -> None:
    assert u.check_layouts() == []


@pytest.mark.parametrize(
    ("request_", "struct"),
    [
        (u.KVM_SET_USER_MEMORY_REGION2, u.KvmUserspaceMemoryRegion2),
        (u.KVM_CREATE_GUEST_MEMFD, u.KvmCreateGuestMemfd),
        (u.KVM_GET_REGS, u.KvmRegs),
        (u.KVM_SET_SREGS, u.KvmSregs),
        (u.KVM_SET_MEMORY_ATTRIBUTES, u.KvmMemoryAttributes),
    ],
)
def test_ioctl_size_field_is_struct_size(request_: int, struct: type[ctypes.Structure]) -> None:
    assert u.ioc_size(request_) == ctypes.sizeof(struct)


def test_kvm_run_memory_fault_fields_sit_where_the_kernel_writes_them() -> None:
    # exit union at 32; memory_fault is {flags, gpa, size}: gpa at 40, size at 48.
    run = u.KvmRun()
    raw = (ctypes.c_uint64 * 8).from_buffer(run)
    raw[4], raw[5], raw[6] = 0x8, 0x41000, 0x1000
    mf = run.exit.memory_fault
    assert (mf.flags, mf.gpa, mf.size) == (0x8, 0x41000, 0x1000)


def test_ioc_rejects_oversized_argument() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        u.ioc(u.IOC_READ, 0x01, 1 << 14)
