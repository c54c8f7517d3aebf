"""The seed regression's oracle and judge (pure): what a host must report for poison at a file index.

The v11 RFC's ``kvm_gmem_error_page`` reported poison at ``gfn = file index`` and sent one
SIGBUS per 4 KiB page; the review asked for ``gfn = base_gfn + index - pgoff`` and one signal
with ``lsb = PAGE_SHIFT + order``. A host stack answers a guest touch of a poisoned gmem page
under one of two contracts, both accepted here if their addresses follow the layout:

- memory-fault exit: ``KVM_RUN`` returns -1/EHWPOISON with ``exit_reason`` MEMORY_FAULT,
  ``memory_fault.gpa = gfn << 12``, ``size = 4096``, flags 0 or PRIVATE;
- SIGBUS: one ``BUS_MCEERR_AR`` to the vCPU thread with ``si_addr`` = the hva of that gfn
  through the slot's ``userspace_addr`` and ``si_addr_lsb = 12 + order``.

A userspace load from the poisoned page through the guest_memfd mmap must raise one SIGBUS
``BUS_MCEERR_AR`` at its address with the same lsb. Tested with recorded observations; the
live run is ``host_stack.seed_regression``.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from host_stack import gmem_layout as gl
from host_stack import kvm_uapi as u
from host_stack import mm_uapi as m
from outcome import Check, Verdict

if TYPE_CHECKING:
    from host_stack.witness import SigbusRecord

__all__ = [
    "GUEST_ACCESS",
    "SEED_INDEX",
    "SEED_NAME",
    "USER_TOUCH",
    "GuestAccessObservation",
    "MemoryFaultSeen",
    "SeedExpectation",
    "judge_guest_access",
    "judge_user_touch",
]

SEED_INDEX: Final = 9  # file index behind slot 2 of vmm.DEFAULT_LAYOUT (pgoff 8, base gfn 0x40)


@dataclass(frozen=True)
class SeedExpectation:
    """What the oracle says the host must report for poison at file ``index``."""

    index: int
    order: int
    slot: int
    gfn: int
    gpa: int
    hva: int  # through the slot's userspace_addr (SIGBUS contract for the vCPU)
    user_hva: int  # through the guest_memfd mmap (userspace touch)
    lsb: int
    buggy_gfn: int  # what the v11 RFC would have reported, for the failure message

    @classmethod
    def from_layout(
        cls,
        layout: Sequence[gl.SlotLayout],
        index: int,
        slot_userspace_addr: Mapping[int, int],
        gmem_map_addr: int,
        order: int = 0,
    ) -> SeedExpectation:
        slot = gl.slot_for_index(layout, index)
        gfn = gl.gfn_for_index(layout, index)
        if slot is None or gfn is None:
            raise ValueError(f"file index {index} is bound to no slot of {list(layout)}")
        if slot.slot not in slot_userspace_addr:
            raise ValueError(f"no userspace_addr for slot {slot.slot} in {slot_userspace_addr}")
        gpa = gfn << gl.PAGE_SHIFT
        return cls(
            index=index,
            order=order,
            slot=slot.slot,
            gfn=gfn,
            gpa=gpa,
            hva=gl.hva_for_gpa(slot, slot_userspace_addr[slot.slot], gpa),
            user_hva=gmem_map_addr + index * gl.PAGE_SIZE,
            lsb=gl.expected_lsb(order),
            buggy_gfn=gl.seed_buggy_gfn(index),
        )


@dataclass(frozen=True)
class MemoryFaultSeen:
    """``kvm_run.memory_fault`` as read after KVM_RUN."""

    gpa: int
    size: int
    flags: int


@dataclass(frozen=True)
class GuestAccessObservation:
    """Everything recorded while the payload touched the poisoned gfn."""

    run_errno: int | None  # errno of KVM_RUN, None if it returned 0 or never returned
    exit_reason: int | None
    memory_fault: MemoryFaultSeen | None
    sigbus: tuple[SigbusRecord, ...] = ()  # as the witness recorded them
    vcpu_tid: int | None = None


GUEST_ACCESS: Final = "guest access"
USER_TOUCH: Final = "userspace touch"
SEED_NAME: Final = "seed regression"


def _addr_matches(si_addr: int, expected: int, lsb: int) -> bool:
    """The signal names the page itself or the start of the folio containing it."""
    return si_addr in (expected, expected & ~((1 << lsb) - 1))


def _signal_checks(what: str, signals: Sequence[SigbusRecord], hva: int, lsb: int, tid: int | None) -> list[Check]:
    """One SIGBUS with the right code, address, order and (``tid`` not None) receiving thread."""
    lsbs = sorted({s.si_addr_lsb for s in signals})
    checks = [Check(f"{what}: SIGBUS count", f"1 (BUS_MCEERR_AR at {hva:#x}, lsb {lsb})",
                    f"{len(signals)} (lsb values {lsbs})", len(signals) == 1)]
    for sig in signals[:1]:
        folio = hva & ~((1 << lsb) - 1)
        checks += [
            Check(f"{what}: si_code", f"{m.BUS_MCEERR_AR} (BUS_MCEERR_AR)",
                  f"{sig.si_code} ({m.BUS_CODE_NAMES.get(sig.si_code, 'other')})",
                  sig.si_code == m.BUS_MCEERR_AR),
            Check(f"{what}: si_addr", f"{hva:#x}" + (f" or its folio's start {folio:#x}" if folio != hva else ""),
                  f"{sig.si_addr:#x}", _addr_matches(sig.si_addr, hva, lsb)),
            Check(f"{what}: si_addr_lsb", str(lsb), str(sig.si_addr_lsb), sig.si_addr_lsb == lsb),
        ]
        if tid is not None:
            checks.append(Check(f"{what}: receiving thread", f"vCPU thread {tid}", f"thread {sig.tid}", sig.tid == tid))
    return checks


def _memory_fault_checks(exp: SeedExpectation, obs: GuestAccessObservation) -> list[Check]:
    err = "none" if obs.run_errno is None else errno.errorcode.get(obs.run_errno, str(obs.run_errno))
    checks = [Check("KVM_RUN errno", f"EHWPOISON ({u.EHWPOISON})", f"{err} ({obs.run_errno})",
                    obs.run_errno == u.EHWPOISON)]
    mf = obs.memory_fault
    if mf is None:
        return [*checks, Check("kvm_run.memory_fault", "gpa, size and flags recorded", "none", False)]
    hint = " (the v11 RFC's gfn = file index)" if mf.gpa >> gl.PAGE_SHIFT == exp.buggy_gfn else ""
    return [*checks,
            Check("memory_fault.gpa", f"{exp.gpa:#x} (gfn {exp.gfn:#x} = base_gfn + index {exp.index} - pgoff)",
                  f"{mf.gpa:#x}{hint}", mf.gpa == exp.gpa),
            Check("memory_fault.size", f"{gl.PAGE_SIZE:#x}", f"{mf.size:#x}", mf.size == gl.PAGE_SIZE),
            Check("memory_fault.flags", "0 or PRIVATE (0x8)", f"{mf.flags:#x}",
                  not mf.flags & ~u.KVM_MEMORY_EXIT_FLAG_PRIVATE)]


def judge_guest_access(exp: SeedExpectation, obs: GuestAccessObservation) -> Verdict:
    """Judge a guest touch of the poisoned gfn under either contract (pure); the contract the
    host followed is ``evidence["contract"]`` (None when it followed neither)."""
    mce = [s for s in obs.sigbus if s.si_code in (m.BUS_MCEERR_AR, m.BUS_MCEERR_AO)]
    if obs.run_errno is not None and obs.exit_reason == u.KVM_EXIT_MEMORY_FAULT:
        # A host may also signal; if it does, the signal must be right too.
        checks = [*_memory_fault_checks(exp, obs),
                  *(_signal_checks("SIGBUS", mce, exp.hva, exp.lsb, obs.vcpu_tid) if mce else [])]
        return Verdict(GUEST_ACCESS, tuple(checks), evidence={"contract": "memory_fault_exit"})
    if mce:
        checks = _signal_checks("vCPU SIGBUS", mce, exp.hva, exp.lsb, obs.vcpu_tid)
        wrong_gfn_hva = exp.hva - ((exp.gfn - exp.buggy_gfn) << gl.PAGE_SHIFT)
        if wrong_gfn_hva != exp.hva and any(s.si_addr == wrong_gfn_hva for s in mce):
            checks.append(Check("vCPU SIGBUS: the gfn its hva belongs to", f"{exp.gfn:#x}",
                                f"{exp.buggy_gfn:#x} (the file index used as gfn)", False))
        return Verdict(GUEST_ACCESS, tuple(checks), evidence={"contract": "sigbus"})
    reason = u.EXIT_REASON_NAMES.get(obs.exit_reason, str(obs.exit_reason)) if (obs.exit_reason is not None) else "none"
    err = "0" if obs.run_errno is None else errno.errorcode.get(obs.run_errno, str(obs.run_errno))
    check = Check("guest access to the poisoned gfn",
                  f"KVM_RUN -1/EHWPOISON with MEMORY_FAULT at gpa {exp.gpa:#x}, or a SIGBUS BUS_MCEERR_AR "
                  f"at hva {exp.hva:#x} lsb {exp.lsb}",
                  f"KVM_RUN errno {err}, exit {reason}, {len(obs.sigbus)} SIGBUS", False)
    return Verdict(GUEST_ACCESS, (check,), evidence={"contract": None})


def judge_user_touch(exp: SeedExpectation, signals: Sequence[SigbusRecord]) -> Verdict:
    """Judge a userspace load of the poisoned page through the guest_memfd mmap (pure)."""
    checks = _signal_checks("userspace touch", signals, exp.user_hva, exp.lsb, None)
    return Verdict(USER_TOUCH, tuple(checks), evidence={"contract": "sigbus"})
