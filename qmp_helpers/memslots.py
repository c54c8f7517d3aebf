"""The memory slots QEMU registered with KVM, as QEMU's ``kvm_set_user_memory`` trace event prints them.

KVM reaches guest memory through these slots only: a gfn is served from the slot's
``userspace_addr`` or, for a ``KVM_MEM_GUEST_MEMFD`` slot, from its guest_memfd at
``guest_memfd_offset``. So they, not QEMU's memory-region tree (HMP ``gpa2hva``), say which
host memory KVM uses behind a gpa, and the hva a SIGBUS for that gpa must carry.

QEMU registers its slots while it builds the machine, before its QMP monitor exists, so
``trace-event-set-state`` comes too late for them: the event is switched on from the command
line (:data:`MEMSLOT_TRACE_ARGS`). The log trace backend (Debian's) prints to stderr, one line per
``KVM_SET_USER_MEMORY_REGION(2)`` call, in the format of ``accel/kvm/trace-events`` (the same in
QEMU 10.0.2 and 11.1.3, read from both binaries)::

    kvm_set_user_memory AddrSpace#0 Slot#3 flags=0x0 gpa=0x100000 size=0x1ff00000 ua=0x7f2e4c100000 \
guest_memfd=-1 guest_memfd_offset=0x0 ret=0

A size of 0 deletes the slot; a slot is registered again after each change of the region
(PAM, SMRAM, BAR moves), so only the last registration of an id counts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from .trace_log import TRACE_PREFIX

__all__ = [
    "MEMSLOT_TRACE_ARGS",
    "MEMSLOT_TRACE_EVENT",
    "MemslotRegistration",
    "live_memslots",
    "memslot_for_gpa",
    "parse_memslot_registrations",
]

MEMSLOT_TRACE_EVENT: Final = "kvm_set_user_memory"
MEMSLOT_TRACE_ARGS: Final = ("-trace", f"enable={MEMSLOT_TRACE_EVENT}")

_LINE = re.compile(
    rf"^{TRACE_PREFIX}kvm_set_user_memory AddrSpace#(?P<as>\d+) Slot#(?P<slot>\d+) flags=(?P<flags>0x[0-9a-f]+) "
    r"gpa=(?P<gpa>0x[0-9a-f]+) size=(?P<size>0x[0-9a-f]+) ua=(?P<ua>0x[0-9a-f]+) "
    r"guest_memfd=(?P<fd>-?\d+) guest_memfd_offset=(?P<off>0x[0-9a-f]+) ret=(?P<ret>-?\d+)\s*$",
    re.MULTILINE)


@dataclass(frozen=True)
class MemslotRegistration:
    """One ``KVM_SET_USER_MEMORY_REGION(2)`` call of QEMU, as traced."""

    address_space: int  # 0: ordinary memory; 1: SMM (x86)
    slot: int
    flags: int  # KVM_MEM_* (host_stack.kvm_uapi): QEMU sets KVM_MEM_GUEST_MEMFD exactly when it passes a fd
    gpa: int
    size: int
    hva: int  # userspace_addr
    guest_memfd: int  # QEMU's fd number of the slot's guest_memfd, -1 without one
    guest_memfd_offset: int
    ret: int

    @property
    def deletes(self) -> bool:
        return self.size == 0

    @property
    def uses_guest_memfd(self) -> bool:
        return self.guest_memfd >= 0

    def covers(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size

    def describe(self) -> str:
        backing = (f"guest_memfd fd {self.guest_memfd} at offset {self.guest_memfd_offset:#x}"
                   if self.uses_guest_memfd else "no guest_memfd")
        return (f"AS#{self.address_space} slot {self.slot}: gpa [{self.gpa:#x}, {self.gpa + self.size:#x}) "
                f"ua {self.hva:#x} flags {self.flags:#x}, {backing}")


def parse_memslot_registrations(text: str) -> list[MemslotRegistration]:
    """Pure: every ``kvm_set_user_memory`` line of QEMU's stderr, in order; other lines are ignored."""
    return [MemslotRegistration(int(m["as"]), int(m["slot"]), int(m["flags"], 16), int(m["gpa"], 16),
                                int(m["size"], 16), int(m["ua"], 16), int(m["fd"]), int(m["off"], 16), int(m["ret"]))
            for m in _LINE.finditer(text)]


def live_memslots(registrations: Iterable[MemslotRegistration]) -> tuple[MemslotRegistration, ...]:
    """The slots in force after ``registrations`` ran in order: failed calls change nothing, a
    size of 0 deletes, a later registration of an id replaces the earlier one. Sorted by gpa."""
    live: dict[tuple[int, int], MemslotRegistration] = {}
    for reg in registrations:
        if reg.ret != 0:
            continue
        key = (reg.address_space, reg.slot)
        if reg.deletes:
            live.pop(key, None)
        else:
            live[key] = reg
    return tuple(sorted(live.values(), key=lambda r: (r.address_space, r.gpa)))


def memslot_for_gpa(slots: Sequence[MemslotRegistration], gpa: int,
                    address_space: int = 0) -> MemslotRegistration | None:
    """The live slot of ``address_space`` that covers ``gpa``; None if none does.

    ValueError if two do: KVM refuses overlapping slots, so that would be a misread trace.
    """
    if gpa < 0:
        raise ValueError(f"gpa must be >= 0, got {gpa}")
    hits = [s for s in slots if s.address_space == address_space and s.covers(gpa)]
    if len(hits) > 1:
        raise ValueError(f"gpa {gpa:#x} is covered by {len(hits)} slots of AS#{address_space}: "
                         + "; ".join(s.describe() for s in hits))
    return hits[0] if hits else None
