"""Private/shared conversions of a software-protected VM, as a table in the uAPI table's style.

Each ``ConversionCase`` builds a fresh type-1 VM through the tiny VMM (the 3-slot layout at
guest_memfd offsets 2, 8, 16), converts gfns with ``KVM_SET_MEMORY_ATTRIBUTES``, lets the guest
read or write them, and compares what it saw with what the case's contract says. The oracle
(``gmem_layout.index_for_gfn``) names the guest_memfd page behind each private gfn, so a case
fails if KVM serves a private gfn from another page than that. ``contract`` and ``basis`` say
what the expectation rests on, ``kernels`` where it was measured.

Every case and the whole table (``run_table``) is an ``outcome.Verdict``; the table needs a KVM
that creates a software-protected VM with private memory (``HOST_REQUIREMENTS``).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from host_stack import gmem_layout as gl
from host_stack import kvm_uapi as u
from host_stack import vmm
from host_stack.gmem_uapi_cases import KERNEL_7_3_4, ErrnoSource, attempt
from host_stack.kvm import KvmSystem, MemoryFaultExit
from outcome import Check, Verdict

__all__ = ["CASES", "HOST_REQUIREMENTS", "TABLE_NAME", "ConversionCase", "Seen", "judge_case", "run_case",
           "run_table"]

HOST_REQUIREMENTS: Final = ("kvm", "sw_protected_vm")
TABLE_NAME: Final = "private/shared conversions (software-protected VM)"
LAYOUT: Final = vmm.DEFAULT_LAYOUT
PRIVATE: Final = vmm.private_gfns(LAYOUT)
SW: Final = u.KVM_X86_SW_PROTECTED_VM
_SOURCE: Final = "virt/kvm/kvm_main.c, arch/x86/kvm/mmu/mmu.c"


@dataclass
class Seen:
    """What a case observed: named values (compared with the expectation) and raw evidence."""

    values: dict[str, str] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ConversionCase:
    id: str
    description: str
    contract: ErrnoSource
    basis: str
    expect: Callable[[], dict[str, str]]  # the named values the contract predicts
    run: Callable[[KvmSystem], Seen]
    kernels: str = KERNEL_7_3_4


def _decoy(gfn: int) -> int:
    index = gl.index_for_gfn(LAYOUT, gfn)
    assert index is not None, gfn
    return vmm.anon_marker(index)


def _hex_values(values: dict[int, int]) -> str:
    return ", ".join(f"{gfn:#x}={value:#x}" for gfn, value in values.items())


def _hex_reads(reads: Sequence[vmm.GuestRead]) -> str:
    return _hex_values({r.gfn: r.value for r in reads})


def _tvm(system: KvmSystem, **kw: Any) -> vmm.TinyVm:
    return vmm.TinyVm(system, vm_type=SW, backing="decoy", markers=False, **kw)


# --- what each case does ---------------------------------------------------------------------
def _serving(system: KvmSystem) -> Seen:
    with _tvm(system) as tvm:
        gfns = tvm.all_gfns()
        before = tvm.read_gfns(gfns)
        tvm.set_private(PRIVATE)
        after = tvm.read_gfns(gfns)
    return Seen({"every gfn while shared": _hex_reads(before), "after converting one gfn per slot": _hex_reads(after)})


def _expect_serving() -> dict[str, str]:
    gfns = [g for s in LAYOUT for g in range(s.base_gfn, s.gfn_end)]
    return {"every gfn while shared": _hex_values({g: _decoy(g) for g in gfns}),
            "after converting one gfn per slot": _hex_values({g: 0 if g in PRIVATE else _decoy(g) for g in gfns})}


def _round_trip(system: KvmSystem) -> Seen:
    with _tvm(system) as tvm:
        tvm.set_private(PRIVATE)
        written = tvm.write_gfns([(g, vmm.guest_pattern(g)) for g in PRIVATE])
        tvm.set_private(PRIVATE, private=False)
        shared = tvm.read_gfns(PRIVATE)
        tvm.set_private(PRIVATE)
        back = tvm.read_gfns(PRIVATE)
    return Seen({"written while private": _hex_reads(written), "read once shared": _hex_reads(shared),
                 "read once private again": _hex_reads(back)})


def _expect_round_trip() -> dict[str, str]:
    pattern = _hex_values({g: vmm.guest_pattern(g) for g in PRIVATE})
    return {"written while private": pattern, "read once shared": _hex_values({g: _decoy(g) for g in PRIVATE}),
            "read once private again": pattern}


def _oracle_index(system: KvmSystem) -> Seen:
    """Punch, one at a time, the page the oracle names for each private gfn; after each punch
    the guest reads every private gfn. The host never maps a private page (that is SIGBUS)."""
    values: dict[str, str] = {}
    with _tvm(system) as tvm:
        tvm.set_private(PRIVATE)
        tvm.write_gfns([(g, vmm.guest_pattern(g)) for g in PRIVATE])
        for gfn in PRIVATE:
            index = gl.index_for_gfn(LAYOUT, gfn)
            assert index is not None, gfn
            tvm.gmem.punch_hole(index * gl.PAGE_SIZE, gl.PAGE_SIZE)
            values[f"after punching page {index} (gfn {gfn:#x})"] = _hex_reads(tvm.read_gfns(PRIVATE))
    return Seen(values, {"indexes": {f"{g:#x}": gl.index_for_gfn(LAYOUT, g) for g in PRIVATE}})


def _expect_oracle_index() -> dict[str, str]:
    expected, punched = {}, set()
    for gfn in PRIVATE:
        punched.add(gfn)
        expected[f"after punching page {gl.index_for_gfn(LAYOUT, gfn)} (gfn {gfn:#x})"] = _hex_values(
            {g: 0 if g in punched else vmm.guest_pattern(g) for g in PRIVATE})
    return expected


def _exit_text(fault: object) -> str:
    if not isinstance(fault, MemoryFaultExit):
        return f"no memory-fault exit ({fault!r})"
    return (f"errno {errno.errorcode.get(fault.errno or 0, fault.errno)}, gpa {fault.gpa:#x}, size {fault.size:#x}, "
            f"flags {fault.flags:#x}")


def _no_gmem(system: KvmSystem) -> Seen:
    with _tvm(system) as tvm:
        tvm.set_private([vmm.CODE_GFN])  # the payload's own page: a slot without guest_memfd
        try:
            reads = tvm.read_gfns(PRIVATE)
        except vmm.PayloadError as exc:
            return Seen({"KVM_RUN": _exit_text(exc.exit)}, {"error": str(exc)})
    return Seen({"KVM_RUN": f"ran to HLT ({_hex_reads(reads)})"})


def _expect_no_gmem() -> dict[str, str]:
    return {"KVM_RUN": _exit_text(MemoryFaultExit(gpa=vmm.CODE_GFN << gl.PAGE_SHIFT, size=gl.PAGE_SIZE,
                                                  flags=u.KVM_MEMORY_EXIT_FLAG_PRIVATE, errno=errno.EFAULT))}


def _errno_of(fn: Callable[[], object]) -> str:
    """The errno name of the operation (``gmem_uapi_cases.attempt``), or "success"."""
    err = attempt(fn)
    return "success" if err == 0 else errno.errorcode.get(err, str(err))


def _bad_attributes(system: KvmSystem) -> Seen:
    with system.create_vm(SW) as vm:
        unaligned = _errno_of(lambda: vm.set_memory_attributes(0x20800, gl.PAGE_SIZE, u.KVM_MEMORY_ATTRIBUTE_PRIVATE))
        unknown = _errno_of(lambda: vm.set_memory_attributes(0x20000, gl.PAGE_SIZE, 1 << 0))
        empty = _errno_of(lambda: vm.set_memory_attributes(0x20000, 0, u.KVM_MEMORY_ATTRIBUTE_PRIVATE))
        init_shared = _errno_of(lambda: vm.create_guest_memfd(
            gl.PAGE_SIZE, u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED))
    return Seen({"unaligned gpa": unaligned, "unknown attribute bit 0": unknown, "size 0": empty,
                 "guest_memfd MMAP|INIT_SHARED": init_shared})


def _expect_bad_attributes() -> dict[str, str]:
    return {"unaligned gpa": "EINVAL", "unknown attribute bit 0": "EINVAL", "size 0": "EINVAL",
            "guest_memfd MMAP|INIT_SHARED": "EINVAL"}


CASES: Final[tuple[ConversionCase, ...]] = (
    ConversionCase("serving", "a shared gfn is served from userspace_addr, a private one from the zeroed guest_memfd",
                   "kernel", f"{_SOURCE}: kvm_mem_is_private() picks the guest_memfd for a PRIVATE gfn",
                   _expect_serving, _serving),
    ConversionCase("round_trip", "private content survives private -> shared -> private (KVM copies nothing)",
                   "kernel", "KVM_SET_MEMORY_ATTRIBUTES only changes the attribute and zaps the mappings",
                   _expect_round_trip, _round_trip),
    ConversionCase("oracle_index", "each private gfn is the guest_memfd page index_for_gfn names: punching that "
                   "page zeroes that gfn and no other", "kernel",
                   "virt/kvm/guest_memfd.c kvm_gmem_get_index (slot pgoff + gfn - base_gfn); a punch invalidates "
                   "the range and the next fault allocates a zeroed page", _expect_oracle_index, _oracle_index),
    ConversionCase("private_without_gmem", "a private gfn in a slot without guest_memfd stops KVM_RUN with a "
                   "memory-fault exit", "kernel", "arch/x86/kvm/mmu/mmu.c kvm_mmu_faultin_pfn_private: "
                   "-EFAULT with KVM_EXIT_MEMORY_FAULT, flags PRIVATE", _expect_no_gmem, _no_gmem),
    ConversionCase("bad_requests", "bad attribute requests and flags a software-protected VM refuses",
                   "host", "kvm_vm_ioctl_set_mem_attributes checks alignment, size and supported attributes; "
                   "INIT_SHARED is refused for a VM with private memory", _expect_bad_attributes, _bad_attributes),
)


def judge_case(case: ConversionCase, seen: Seen) -> Verdict:
    """Pure: a check per named value of the contract, expected against what the case saw."""
    expected = case.expect()
    checks = tuple(Check(f"{case.description}: {name} [{case.contract}]", f"{want} (known on {case.kernels})",
                         seen.values.get(name, "not observed"), seen.values.get(name) == want)
                   for name, want in expected.items())
    return Verdict(case.id, checks, evidence={"contract": case.contract, "basis": case.basis, **seen.evidence})


def run_case(case: ConversionCase, system: KvmSystem) -> Verdict:
    """One case in fresh VMs; a set-up failure is a failed check naming it, never a pass."""
    try:
        seen = case.run(system)
    except (OSError, vmm.PayloadError) as exc:
        return Verdict(case.id, (Check(f"{case.description}: set-up", "the case runs", f"{type(exc).__name__}: {exc}",
                                       False),))
    return judge_case(case, seen)


def run_table(system: KvmSystem | None = None) -> Verdict:
    with contextlib.ExitStack() as stack:
        if system is None:
            system = stack.enter_context(KvmSystem())
        parts = [run_case(case, system) for case in CASES]
    return Verdict.combine(TABLE_NAME, parts)
