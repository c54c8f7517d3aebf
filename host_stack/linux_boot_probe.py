"""Can this host's KVM run a Linux guest kernel? Decided by running the instruction that fails.

On the PVM-based KVM of the development machine a Linux guest boots slowly and then dies
with "KVM internal error. Suberror: 1 ... emulation failure" on a ``lock cmpxchg16b``. That
instruction is what every x86_64 Linux kernel executes early and often (SLUB's double-word
cmpxchg), and KVM's instruction emulator cannot emulate CMPXCHG16B, so a host that routes it
to the emulator cannot run Linux. The probe runs two tiny 64-bit payloads: a control (load,
store, HLT) that proves a long-mode payload runs at all, then ``lock cmpxchg16b`` on an
ordinary data page. Measured here: the control reaches HLT, the cmpxchg16b ends in an
emulation failure (on a data page as well as on a page-table page); hardware-assisted KVM
executes it natively and reaches HLT. The vendor module name alone would not prove this.

Long mode needs a CPUID first: upstream KVM refuses ``KVM_SET_SREGS`` with EFER.LME (EINVAL)
until ``KVM_SET_CPUID2`` gave the vCPU a CPUID with LM; the PVM development host accepts it
without. So each vCPU gets ``KVM_GET_SUPPORTED_CPUID``'s entries before its sregs, as QEMU
and the KVM selftests do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from host_stack import kvm_uapi as u
from host_stack.kvm import HltExit, HostMapping, InternalErrorExit

if TYPE_CHECKING:
    from host_stack.kvm import KvmSystem, Vcpu, VcpuExit

__all__ = ["BootProbeResult", "probe_linux_boot"]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

KVM_INTERNAL_ERROR_EMULATION: Final = 1  # kvm.h
_MEM_SIZE: Final = 0x200000  # one 2 MiB identity-mapped large page at gpa 0
_PML4: Final = 0x1000
_PDPT: Final = 0x2000
_PD: Final = 0x3000
_DATA: Final = 0x5000
_CODE: Final = 0x10000
_STACK: Final = 0x20000
_PTE_P_RW: Final = 0x3
_PDE_PS: Final = 0x80
_CR0_PE_MP_ET_NE_WP_AM_PG: Final = 0x80050033
_CR4_PAE: Final = 1 << 5
_EFER_LME_LMA: Final = 0x500


def _control_payload(target: int) -> bytes:
    """``mov edi, target; mov rax, [rdi]; mov [rdi], rax; hlt``: long mode, loads, stores."""
    return b"\xbf" + target.to_bytes(4, "little") + b"\x48\x8b\x07\x48\x89\x07\xf4"


def _cmpxchg16b_payload(target: int) -> bytes:
    """``mov edi, target; rdx:rax = rcx:rbx = [rdi]; lock cmpxchg16b [rdi]; hlt``.

    Compare and swap with equal old and new values: memory keeps its content either way.
    """
    return (
        b"\xbf" + target.to_bytes(4, "little")  # mov edi, imm32
        + b"\x48\x8b\x07"  # mov rax, [rdi]
        + b"\x48\x8b\x57\x08"  # mov rdx, [rdi+8]
        + b"\x48\x89\xc3"  # mov rbx, rax
        + b"\x48\x89\xd1"  # mov rcx, rdx
        + b"\xf0\x48\x0f\xc7\x0f"  # lock cmpxchg16b [rdi]
        + b"\xf4"  # hlt
    )  # fmt: skip


@dataclass(frozen=True)
class BootProbeResult:
    """Outcome of the two runs; ``boots_linux`` is None when the probe itself could not run."""

    control: str
    cmpxchg16b: str
    boots_linux: bool | None

    @property
    def sentence(self) -> str:
        if self.boots_linux:
            return "a 64-bit payload's lock cmpxchg16b reaches HLT under this KVM"
        if self.boots_linux is None:
            return f"the long-mode probe payload did not run under this KVM ({self.control})"
        return (
            "this host's KVM cannot run a Linux guest: a 64-bit payload's lock cmpxchg16b "
            f"ends in {self.cmpxchg16b} (KVM's emulator lacks CMPXCHG16B, which every "
            "x86_64 Linux kernel executes)"
        )


def _describe(exit_: VcpuExit) -> str:
    if isinstance(exit_, HltExit):
        return "HLT"
    if isinstance(exit_, InternalErrorExit):
        kind = "emulation failure" if exit_.suberror == KVM_INTERNAL_ERROR_EMULATION else ""
        return f"KVM_EXIT_INTERNAL_ERROR suberror {exit_.suberror} {kind}".rstrip()
    return type(exit_).__name__


def _long_mode(vcpu: Vcpu, cpuid: list[u.KvmCpuidEntry2]) -> None:
    vcpu.set_cpuid2(cpuid)  # before KVM_SET_SREGS: EFER.LME needs CPUID.80000001h:EDX.LM
    sregs = vcpu.get_sregs()
    code = u.KvmSegment(base=0, limit=0xFFFFFFFF, selector=8, type=11, present=1, dpl=0, db=0, s=1, l=1, g=1)
    data = u.KvmSegment(base=0, limit=0xFFFFFFFF, selector=16, type=3, present=1, dpl=0, db=1, s=1, l=0, g=1)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.cr3 = _PML4
    sregs.cr4 = _CR4_PAE
    sregs.cr0 = _CR0_PE_MP_ET_NE_WP_AM_PG
    sregs.efer = _EFER_LME_LMA
    vcpu.set_sregs(sregs)
    regs = u.KvmRegs()
    regs.rip = _CODE
    regs.rsp = _STACK
    regs.rflags = 0x2
    vcpu.set_regs(regs)


def _run_once(system: KvmSystem, payload: bytes) -> str:
    cpuid = system.supported_cpuid()
    if not any(e.function == u.CPUID_EXT_FEATURES and e.edx & u.CPUID_EXT_EDX_LM for e in cpuid):
        return "no long mode in KVM_GET_SUPPORTED_CPUID (leaf 0x80000001 EDX.LM clear)"
    with (
        HostMapping.anonymous(_MEM_SIZE, "boot probe memory") as mem,
        system.create_vm() as vm,
    ):
        mem.write_u64(_PML4, _PDPT | _PTE_P_RW)
        mem.write_u64(_PDPT, _PD | _PTE_P_RW)
        mem.write_u64(_PD, 0 | _PDE_PS | _PTE_P_RW)
        mem.write(_CODE, payload)
        with vm.add_memslot(0, 0, _MEM_SIZE, mem.addr), vm.create_vcpu(0) as vcpu:
            _long_mode(vcpu, cpuid)
            return _describe(vcpu.run())


def probe_linux_boot(system: KvmSystem) -> BootProbeResult:
    """Run the control, then the cmpxchg16b payload; see the module docstring for the logic."""
    control = _run_once(system, _control_payload(_DATA))
    if control != "HLT":
        result = BootProbeResult(control, "not run", None)
    else:
        outcome = _run_once(system, _cmpxchg16b_payload(_DATA))
        result = BootProbeResult(control, outcome, outcome == "HLT")
    _log.debug("linux boot probe: %s", result)
    return result
