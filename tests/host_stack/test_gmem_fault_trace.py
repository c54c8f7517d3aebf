"""guest_memfd's answers to KVM and KVM_RUN's returns, parsed from the trace (lines as 7.3.4 prints them)."""

from __future__ import annotations

from host_stack.gmem_fault_trace import GmemFault, KvmRunReturn, parse_gmem_faults, parse_run_returns

TRACE = """\
 qemu-system-x86-172 [001] ..... 90.1: gmem_get: (kvm_gmem_get_pfn+0x0/0x1e0 [kvm]) gfn=0x1f8ff
 qemu-system-x86-172 [001] ..... 90.2: gmem_ret: (kvm_tdp_page_fault+0x1a/0x90 [kvm] <- kvm_gmem_get_pfn) ret=0
 qemu-system-x86-172 [001] ..... 95.1: gmem_get: (kvm_gmem_get_pfn+0x0/0x1e0 [kvm]) gfn=0x1f8ff
 qemu-system-x86-172 [001] ..... 95.2: gmem_ret: (kvm_tdp_page_fault+0x1a/0x90 [kvm] <- kvm_gmem_get_pfn) ret=-133
 qemu-system-x86-172 [001] ..... 95.3: kvm_userspace_exit: reason error (133)
 qemu-system-x86-172 [001] ..... 80.0: kvm_userspace_exit: reason KVM_EXIT_IO (2)
"""


def test_each_call_is_paired_with_its_return() -> None:
    assert parse_gmem_faults(TRACE) == [GmemFault(172, 0x1F8FF, 0), GmemFault(172, 0x1F8FF, -133)]
    assert parse_gmem_faults(TRACE)[1].describe() == "kvm_gmem_get_pfn(gfn 0x1f8ff) = -EHWPOISON (thread 172)"


def test_run_returns_say_error_and_errno_or_the_exit_reason() -> None:
    errors, io = parse_run_returns(TRACE)
    assert errors == KvmRunReturn(172, "error", 133) and errors.describe().startswith("KVM_RUN failed with EHWPOISON")
    assert io == KvmRunReturn(172, "KVM_EXIT_IO", 2)
