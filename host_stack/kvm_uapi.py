"""KVM and guest_memfd uAPI: ioctl numbers, capability numbers, flags and struct layouts.

Every number here is copied from a Linux uAPI header, named next to it, so a reader can check
it against the kernel the lab runs. The struct layouts are ctypes mirrors of the C structs;
their sizes are asserted against the size field encoded in the ioctl numbers (see
``check_layouts``), because a wrong layout silently corrupts ioctl arguments.

Sources:
- ``include/uapi/linux/kvm.h`` (KVM), abbreviated ``kvm.h`` below.
- ``arch/x86/include/uapi/asm/kvm.h`` (x86 registers, VM types), abbreviated ``asm/kvm.h``.
- ``include/uapi/asm-generic/ioctl.h`` (ioctl number encoding).
- ``include/uapi/linux/falloc.h`` (fallocate modes used on guest_memfd).
- ``include/uapi/asm-generic/errno.h`` (EHWPOISON, which Python's errno module lacks).
"""

from __future__ import annotations

import ctypes
import errno
from typing import Final

__all__ = [
    "EHWPOISON",
    "EXIT_REASON_NAMES",
    "IOCTL_NAMES",
    "KvmCpuid2",
    "KvmCpuidEntry2",
    "KvmCreateGuestMemfd",
    "KvmDtable",
    "KvmMemoryAttributes",
    "KvmPreFaultMemory",
    "KvmRegs",
    "KvmRun",
    "KvmSegment",
    "KvmSregs",
    "KvmUserspaceMemoryRegion",
    "KvmUserspaceMemoryRegion2",
    "check_layouts",
    "errno_name",
    "ioc",
    "ioc_size",
    "kvm_cpuid2",
]

# --- include/uapi/asm-generic/ioctl.h: _IOC(dir, type, nr, size) ---------------------------
_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
IOC_NONE: Final = 0
IOC_WRITE: Final = 1
IOC_READ: Final = 2

KVMIO: Final = 0xAE  # kvm.h


def ioc(direction: int, nr: int, size: int, type_: int = KVMIO) -> int:
    """Encode an ioctl number exactly as the kernel's ``_IOC`` macro does."""
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def ioc_size(request: int) -> int:
    """Return the argument size encoded in an ioctl number (``_IOC_SIZE``)."""
    return (request >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)


# --- errno ----------------------------------------------------------------------------------
EHWPOISON: Final = 133  # include/uapi/asm-generic/errno.h ("Memory page has hardware error")


def errno_name(number: int) -> str:
    """``EHWPOISON``, ``EFAULT``...: the symbol of an errno (Python's table lacks EHWPOISON)."""
    if number == EHWPOISON:
        return "EHWPOISON"
    return errno.errorcode.get(number, str(number))

# --- include/uapi/linux/falloc.h --------------------------------------------------------------
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_COLLAPSE_RANGE: Final = 0x08
FALLOC_FL_ZERO_RANGE: Final = 0x10
FALLOC_FL_INSERT_RANGE: Final = 0x20

# --- kvm.h: API version ---------------------------------------------------------------------
KVM_API_VERSION: Final = 12


# --- struct layouts -------------------------------------------------------------------------
class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region`` (kvm.h), 32 bytes."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    )


class KvmUserspaceMemoryRegion2(ctypes.Structure):
    """``struct kvm_userspace_memory_region2`` (kvm.h), 160 bytes.

    ``guest_memfd_offset`` sits at 0x20 and ``guest_memfd`` at 0x28.
    """

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
        ("guest_memfd_offset", ctypes.c_uint64),
        ("guest_memfd", ctypes.c_uint32),
        ("pad1", ctypes.c_uint32),
        ("pad2", ctypes.c_uint64 * 14),
    )


class KvmCreateGuestMemfd(ctypes.Structure):
    """``struct kvm_create_guest_memfd`` (kvm.h), 64 bytes."""

    _fields_ = (
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 6),
    )


class KvmMemoryAttributes(ctypes.Structure):
    """``struct kvm_memory_attributes`` (kvm.h), 32 bytes."""

    _fields_ = (
        ("address", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("attributes", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    )


class KvmPreFaultMemory(ctypes.Structure):
    """``struct kvm_pre_fault_memory`` (kvm.h), 64 bytes."""

    _fields_ = (
        ("gpa", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("padding", ctypes.c_uint64 * 5),
    )


class KvmCpuidEntry2(ctypes.Structure):
    """``struct kvm_cpuid_entry2`` (asm/kvm.h), 40 bytes."""

    _fields_ = (
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    )


class KvmCpuid2(ctypes.Structure):
    """``struct kvm_cpuid2`` (asm/kvm.h) without its flexible ``entries[]``: 8 bytes.

    The ioctl numbers encode only this header's size; ``kvm_cpuid2(n)`` builds the header
    followed by ``n`` entries, the buffer the kernel really reads and writes.
    """

    _fields_ = (("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32))


def kvm_cpuid2(nent: int) -> ctypes.Structure:
    """A ``struct kvm_cpuid2`` with room for ``nent`` entries, ``nent`` already set."""

    class _KvmCpuid2N(ctypes.Structure):
        _fields_ = (
            ("nent", ctypes.c_uint32),
            ("padding", ctypes.c_uint32),
            ("entries", KvmCpuidEntry2 * nent),
        )

    buf = _KvmCpuid2N()
    buf.nent = nent
    return buf


# CPUID leaf 0x80000001 EDX bit 29: long mode (LM); KVM refuses EFER.LME without it.
CPUID_EXT_FEATURES: Final = 0x80000001
CPUID_EXT_EDX_LM: Final = 1 << 29
KVM_MAX_CPUID_ENTRIES: Final = 256  # arch/x86/include/asm/kvm_host.h


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs`` (asm/kvm.h), 144 bytes."""

    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    )  # fmt: skip


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment`` (asm/kvm.h), 24 bytes."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    )


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable`` (asm/kvm.h), 16 bytes."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    )


KVM_NR_INTERRUPTS: Final = 256  # asm/kvm.h


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs`` (asm/kvm.h), 312 bytes."""

    _fields_ = (
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    )


# kvm_run exit-specific union members (kvm.h, inside struct kvm_run).
class KvmRunIo(ctypes.Structure):
    """``kvm_run.io``: port I/O exit; the data sits at ``kvm_run + data_offset``."""

    _fields_ = (
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    )


class KvmRunMmio(ctypes.Structure):
    """``kvm_run.mmio``."""

    _fields_ = (
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    )


class KvmRunFailEntry(ctypes.Structure):
    """``kvm_run.fail_entry``."""

    _fields_ = (
        ("hardware_entry_failure_reason", ctypes.c_uint64),
        ("cpu", ctypes.c_uint32),
    )


class KvmRunInternal(ctypes.Structure):
    """``kvm_run.internal``."""

    _fields_ = (
        ("suberror", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    )


class KvmRunMemoryFault(ctypes.Structure):
    """``kvm_run.memory_fault`` (KVM_CAP_MEMORY_FAULT_INFO)."""

    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("gpa", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    )


class KvmRunSystemEvent(ctypes.Structure):
    """``kvm_run.system_event``."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    )


class KvmRunExit(ctypes.Union):
    """The 256-byte exit union of ``struct kvm_run``."""

    _fields_ = (
        ("io", KvmRunIo),
        ("mmio", KvmRunMmio),
        ("fail_entry", KvmRunFailEntry),
        ("internal", KvmRunInternal),
        ("memory_fault", KvmRunMemoryFault),
        ("system_event", KvmRunSystemEvent),
        ("padding", ctypes.c_char * 256),
    )


class KvmRun(ctypes.Structure):
    """Head of ``struct kvm_run`` (kvm.h) up to and including the exit union.

    The rest (``kvm_valid_regs``, sync regs) is not used; the mapping itself is
    ``KVM_GET_VCPU_MMAP_SIZE`` bytes long.
    """

    _fields_ = (
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("exit", KvmRunExit),
    )


KVM_RUN_EXIT_OFFSET: Final = 32  # offset of the exit union inside struct kvm_run

# --- ioctl numbers (kvm.h unless noted) ------------------------------------------------------
# system ioctls (on /dev/kvm)
KVM_GET_API_VERSION: Final = ioc(IOC_NONE, 0x00, 0)
KVM_CREATE_VM: Final = ioc(IOC_NONE, 0x01, 0)
KVM_CHECK_EXTENSION: Final = ioc(IOC_NONE, 0x03, 0)  # also a VM ioctl
KVM_GET_VCPU_MMAP_SIZE: Final = ioc(IOC_NONE, 0x04, 0)
KVM_GET_SUPPORTED_CPUID: Final = ioc(IOC_READ | IOC_WRITE, 0x05, ctypes.sizeof(KvmCpuid2))
# VM ioctls
KVM_CREATE_VCPU: Final = ioc(IOC_NONE, 0x41, 0)
KVM_SET_USER_MEMORY_REGION: Final = ioc(IOC_WRITE, 0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR: Final = ioc(IOC_NONE, 0x47, 0)
KVM_SET_IDENTITY_MAP_ADDR: Final = ioc(IOC_WRITE, 0x48, 8)
KVM_SET_USER_MEMORY_REGION2: Final = ioc(IOC_WRITE, 0x49, ctypes.sizeof(KvmUserspaceMemoryRegion2))
KVM_SET_MEMORY_ATTRIBUTES: Final = ioc(IOC_WRITE, 0xD2, ctypes.sizeof(KvmMemoryAttributes))
KVM_CREATE_GUEST_MEMFD: Final = ioc(IOC_READ | IOC_WRITE, 0xD4, ctypes.sizeof(KvmCreateGuestMemfd))
# vCPU ioctls
KVM_RUN: Final = ioc(IOC_NONE, 0x80, 0)
KVM_GET_REGS: Final = ioc(IOC_READ, 0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS: Final = ioc(IOC_WRITE, 0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS: Final = ioc(IOC_READ, 0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS: Final = ioc(IOC_WRITE, 0x84, ctypes.sizeof(KvmSregs))
KVM_PRE_FAULT_MEMORY: Final = ioc(IOC_READ | IOC_WRITE, 0xD5, ctypes.sizeof(KvmPreFaultMemory))
KVM_SET_CPUID2: Final = ioc(IOC_WRITE, 0x90, ctypes.sizeof(KvmCpuid2))

IOCTL_NAMES: Final[dict[int, str]] = {
    KVM_GET_API_VERSION: "KVM_GET_API_VERSION",
    KVM_CREATE_VM: "KVM_CREATE_VM",
    KVM_CHECK_EXTENSION: "KVM_CHECK_EXTENSION",
    KVM_GET_VCPU_MMAP_SIZE: "KVM_GET_VCPU_MMAP_SIZE",
    KVM_GET_SUPPORTED_CPUID: "KVM_GET_SUPPORTED_CPUID",
    KVM_CREATE_VCPU: "KVM_CREATE_VCPU",
    KVM_SET_USER_MEMORY_REGION: "KVM_SET_USER_MEMORY_REGION",
    KVM_SET_TSS_ADDR: "KVM_SET_TSS_ADDR",
    KVM_SET_IDENTITY_MAP_ADDR: "KVM_SET_IDENTITY_MAP_ADDR",
    KVM_SET_USER_MEMORY_REGION2: "KVM_SET_USER_MEMORY_REGION2",
    KVM_SET_MEMORY_ATTRIBUTES: "KVM_SET_MEMORY_ATTRIBUTES",
    KVM_CREATE_GUEST_MEMFD: "KVM_CREATE_GUEST_MEMFD",
    KVM_RUN: "KVM_RUN",
    KVM_GET_REGS: "KVM_GET_REGS",
    KVM_SET_REGS: "KVM_SET_REGS",
    KVM_GET_SREGS: "KVM_GET_SREGS",
    KVM_SET_SREGS: "KVM_SET_SREGS",
    KVM_PRE_FAULT_MEMORY: "KVM_PRE_FAULT_MEMORY",
    KVM_SET_CPUID2: "KVM_SET_CPUID2",
}

# --- capabilities (kvm.h, KVM_CAP_*) ---------------------------------------------------------
KVM_CAP_IRQCHIP: Final = 0
KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_SET_TSS_ADDR: Final = 4
KVM_CAP_NR_VCPUS: Final = 9
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_SYNC_MMU: Final = 16
KVM_CAP_MCE: Final = 31
KVM_CAP_SET_IDENTITY_MAP_ADDR: Final = 37
KVM_CAP_MAX_VCPUS: Final = 66
KVM_CAP_READONLY_MEM: Final = 81
KVM_CAP_IMMEDIATE_EXIT: Final = 136
KVM_CAP_USER_MEMORY2: Final = 231
KVM_CAP_MEMORY_FAULT_INFO: Final = 232
KVM_CAP_MEMORY_ATTRIBUTES: Final = 233
KVM_CAP_GUEST_MEMFD: Final = 234
KVM_CAP_VM_TYPES: Final = 235
KVM_CAP_PRE_FAULT_MEMORY: Final = 236
KVM_CAP_GUEST_MEMFD_FLAGS: Final = 244

CAP_NAMES: Final[dict[int, str]] = {
    KVM_CAP_IRQCHIP: "KVM_CAP_IRQCHIP",
    KVM_CAP_USER_MEMORY: "KVM_CAP_USER_MEMORY",
    KVM_CAP_SET_TSS_ADDR: "KVM_CAP_SET_TSS_ADDR",
    KVM_CAP_NR_VCPUS: "KVM_CAP_NR_VCPUS",
    KVM_CAP_NR_MEMSLOTS: "KVM_CAP_NR_MEMSLOTS",
    KVM_CAP_SYNC_MMU: "KVM_CAP_SYNC_MMU",
    KVM_CAP_MCE: "KVM_CAP_MCE",
    KVM_CAP_SET_IDENTITY_MAP_ADDR: "KVM_CAP_SET_IDENTITY_MAP_ADDR",
    KVM_CAP_MAX_VCPUS: "KVM_CAP_MAX_VCPUS",
    KVM_CAP_READONLY_MEM: "KVM_CAP_READONLY_MEM",
    KVM_CAP_IMMEDIATE_EXIT: "KVM_CAP_IMMEDIATE_EXIT",
    KVM_CAP_USER_MEMORY2: "KVM_CAP_USER_MEMORY2",
    KVM_CAP_MEMORY_FAULT_INFO: "KVM_CAP_MEMORY_FAULT_INFO",
    KVM_CAP_MEMORY_ATTRIBUTES: "KVM_CAP_MEMORY_ATTRIBUTES",
    KVM_CAP_GUEST_MEMFD: "KVM_CAP_GUEST_MEMFD",
    KVM_CAP_VM_TYPES: "KVM_CAP_VM_TYPES",
    KVM_CAP_PRE_FAULT_MEMORY: "KVM_CAP_PRE_FAULT_MEMORY",
    KVM_CAP_GUEST_MEMFD_FLAGS: "KVM_CAP_GUEST_MEMFD_FLAGS",
}

# --- flags ------------------------------------------------------------------------------------
# memslot flags (kvm.h)
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_MEM_READONLY: Final = 1 << 1
KVM_MEM_GUEST_MEMFD: Final = 1 << 2
# How /proc names a guest_memfd (an fd link in /proc/PID/fd, a VMA path in /proc/PID/maps),
# by kernel (virt/kvm/guest_memfd.c: an anon inode before guest_memfd got its own pseudo file system).
GMEM_PROC_NAMES: Final = {
    "anon_inode:[kvm-gmem]": "6.18 (an anon inode, this project's PVM development host)",
    "/[kvm-gmem] (deleted)": "7.3.4 (guest_memfd's own pseudo file system, measured in L1)",
}
# guest_memfd creation flags (kvm.h)
GUEST_MEMFD_FLAG_MMAP: Final = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED: Final = 1 << 1
# memory attributes (kvm.h)
KVM_MEMORY_ATTRIBUTE_PRIVATE: Final = 1 << 3
# memory-fault exit flags (kvm.h)
KVM_MEMORY_EXIT_FLAG_PRIVATE: Final = 1 << 3
# VM types (asm/kvm.h)
KVM_X86_DEFAULT_VM: Final = 0
KVM_X86_SW_PROTECTED_VM: Final = 1
KVM_X86_SEV_VM: Final = 2
KVM_X86_SEV_ES_VM: Final = 3
KVM_X86_SNP_VM: Final = 4
KVM_X86_TDX_VM: Final = 5
VM_TYPE_NAMES: Final[dict[int, str]] = {
    KVM_X86_DEFAULT_VM: "KVM_X86_DEFAULT_VM",
    KVM_X86_SW_PROTECTED_VM: "KVM_X86_SW_PROTECTED_VM",
    KVM_X86_SEV_VM: "KVM_X86_SEV_VM",
    KVM_X86_SEV_ES_VM: "KVM_X86_SEV_ES_VM",
    KVM_X86_SNP_VM: "KVM_X86_SNP_VM",
    KVM_X86_TDX_VM: "KVM_X86_TDX_VM",
}

# --- exit reasons (kvm.h, KVM_EXIT_*) ---------------------------------------------------------
KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_EXCEPTION: Final = 1
KVM_EXIT_IO: Final = 2
KVM_EXIT_HYPERCALL: Final = 3
KVM_EXIT_DEBUG: Final = 4
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_IRQ_WINDOW_OPEN: Final = 7
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_SYSTEM_EVENT: Final = 24
KVM_EXIT_MEMORY_FAULT: Final = 39
EXIT_REASON_NAMES: Final[dict[int, str]] = {
    KVM_EXIT_UNKNOWN: "UNKNOWN",
    KVM_EXIT_EXCEPTION: "EXCEPTION",
    KVM_EXIT_IO: "IO",
    KVM_EXIT_HYPERCALL: "HYPERCALL",
    KVM_EXIT_DEBUG: "DEBUG",
    KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_IRQ_WINDOW_OPEN: "IRQ_WINDOW_OPEN",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
    KVM_EXIT_SYSTEM_EVENT: "SYSTEM_EVENT",
    KVM_EXIT_MEMORY_FAULT: "MEMORY_FAULT",
}
# kvm_run.io.direction (kvm.h)
KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1

# --- expected layout sizes and the ioctl numbers the kernel headers spell out -----------------
_EXPECTED_SIZES: Final[dict[str, tuple[type[ctypes.Structure | ctypes.Union], int]]] = {
    "kvm_userspace_memory_region": (KvmUserspaceMemoryRegion, 32),
    "kvm_userspace_memory_region2": (KvmUserspaceMemoryRegion2, 160),
    "kvm_create_guest_memfd": (KvmCreateGuestMemfd, 64),
    "kvm_memory_attributes": (KvmMemoryAttributes, 32),
    "kvm_pre_fault_memory": (KvmPreFaultMemory, 64),
    "kvm_regs": (KvmRegs, 144),
    "kvm_segment": (KvmSegment, 24),
    "kvm_dtable": (KvmDtable, 16),
    "kvm_sregs": (KvmSregs, 312),
    "kvm_cpuid_entry2": (KvmCpuidEntry2, 40),
    "kvm_cpuid2 (header)": (KvmCpuid2, 8),
    "kvm_run exit union": (KvmRunExit, 256),
}
# Literal numbers as printed by the kernel headers' expansion (and measured on a 6.x host).
KNOWN_IOCTL_NUMBERS: Final[dict[str, int]] = {
    "KVM_CREATE_GUEST_MEMFD": 0xC040AED4,
    "KVM_SET_USER_MEMORY_REGION2": 0x40A0AE49,
    "KVM_SET_MEMORY_ATTRIBUTES": 0x4020AED2,
    "KVM_PRE_FAULT_MEMORY": 0xC040AED5,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_RUN": 0xAE80,
}


def check_layouts() -> list[str]:
    """Return every mismatch between the ctypes layouts/ioctl numbers and the kernel's.

    An empty list means the layouts agree with the sizes in the headers and with the literal
    ioctl numbers above; tests assert that, and callers may refuse to run otherwise.
    """
    problems: list[str] = []
    for cname, (ctype, size) in _EXPECTED_SIZES.items():
        actual = ctypes.sizeof(ctype)
        if actual != size:
            problems.append(f"struct {cname}: expected {size} bytes, ctypes layout has {actual}")
    if KvmUserspaceMemoryRegion2.guest_memfd_offset.offset != 0x20:
        problems.append("kvm_userspace_memory_region2.guest_memfd_offset not at 0x20")
    if KvmUserspaceMemoryRegion2.guest_memfd.offset != 0x28:
        problems.append("kvm_userspace_memory_region2.guest_memfd not at 0x28")
    if KvmRun.exit.offset != KVM_RUN_EXIT_OFFSET:
        problems.append(f"kvm_run exit union at {KvmRun.exit.offset}, expected 32")
    by_name = {name: number for number, name in IOCTL_NAMES.items()}
    for name, number in KNOWN_IOCTL_NUMBERS.items():
        if by_name[name] != number:
            problems.append(f"{name}: expected {number:#x}, computed {by_name[name]:#x}")
    return problems
