"""Which frame backs a private gfn, proven before anything poisons it.

A private guest_memfd page has no user mapping, so the pagemap interlock
(``injectors.prove_frame``) has nothing to read. KVM itself names the frame: the
``kvmmmu:kvm_mmu_spte_requested`` tracepoint prints (gfn, pfn, level) each time the vCPU
faults a gfn in (arch/x86/kvm/mmu/mmutrace.h). It fires only on a new fault, so the check
causes the faults itself, in rounds: the guest writes every private gfn (first fault), the
attributes go private -> shared -> private (which zaps the mappings but keeps the guest_memfd
pages, as the conversion table shows), and the guest reads them again (second fault).

``prove_private_frame`` (pure) accepts a pfn for a gfn only if

- every round has exactly one 4 KiB request for that gfn, from the VM's vCPU thread, and all
  name the same pfn (the page survived a zap, so it is the guest_memfd's, not a transient one);
- no other private gfn of the VM was given that pfn;
- the guest read back what it wrote after the round trip (the page holds this VM's data);
- its kpageflags say it is an ordinary page-cache page with no user mapping: none of the
  forbidden flags (kernel, free, hole, poisoned), not anonymous, not mapped, up to date.

Anything else raises ``InjectionRefused`` with the reason; nothing is poisoned.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from host_stack import mm_uapi as m
from host_stack.injectors import InjectionRefused, RefusalReason, check_forbidden_flags
from host_stack.pagemap import PageFlags
from host_stack.trace_instance import TraceInstance

__all__ = ["SPTE_EVENT", "PrivateFrame", "SpteRequest", "SpteTrace", "check_private_flags", "parse_spte_requested",
           "prove_private_frame"]

SPTE_EVENT: Final = "kvmmmu/kvm_mmu_spte_requested"
PG_LEVEL_4K: Final = 1  # arch/x86/include/asm/pgtable_types.h
# "<comm>-<pid> [cpu] flags ts: kvm_mmu_spte_requested: gfn %llx pfn %llx level %d access %x" (7.3)
_LINE: Final = re.compile(r"-(\d+)\s+\[\d+\][^\n]*?kvm_mmu_spte_requested: gfn ([0-9a-f]+) pfn ([0-9a-f]+) "
                          r"level (\d+)")


@dataclass(frozen=True)
class SpteRequest:
    """One fault KVM resolved: the gfn, the host frame it maps, at which level, for which thread."""

    tid: int
    gfn: int
    pfn: int
    level: int


def parse_spte_requested(text: str) -> list[SpteRequest]:
    """Pure: every kvm_mmu_spte_requested line of a trace buffer, in order."""
    return [SpteRequest(int(mt.group(1)), int(mt.group(2), 16), int(mt.group(3), 16), int(mt.group(4)))
            for mt in _LINE.finditer(text)]


class SpteTrace(TraceInstance):
    """KVM's faults for thread ``tid`` (the vCPU thread) while open; ``take()`` returns the new ones."""

    def __init__(self, tid: int) -> None:
        super().__init__({SPTE_EVENT: f"common_pid == {tid}"})
        self._seen = 0

    def take(self) -> list[SpteRequest]:
        requests = parse_spte_requested(self.text())
        new, self._seen = requests[self._seen:], len(requests)
        return new


@dataclass(frozen=True)
class PrivateFrame:
    """A frame proven to back private ``gfn`` (guest_memfd page ``index``) of the VM run by ``tid``."""

    gfn: int
    index: int
    pfn: int
    tid: int
    flags: tuple[str, ...]
    proof: str

    @property
    def gpa(self) -> int:
        return self.gfn << 12


def _refuse(reason: RefusalReason, text: str) -> InjectionRefused:
    return InjectionRefused(reason, f"refusing to poison the frame behind a private gfn: {text}")


def _pfn_of_round(gfn: int, tid: int, requests: Sequence[SpteRequest], n: int) -> int:
    mine = [r for r in requests if r.gfn == gfn and r.tid == tid]
    if len(mine) != 1:
        raise _refuse("not-proven", f"fault round {n}: expected 1 kvm_mmu_spte_requested for gfn {gfn:#x} from "
                                    f"thread {tid}, got {len(mine)}")
    (req,) = mine
    if req.level != PG_LEVEL_4K:
        raise _refuse("not-proven", f"fault round {n}: gfn {gfn:#x} was mapped at level {req.level}, expected "
                                    f"{PG_LEVEL_4K} (4 KiB)")
    return req.pfn


def check_private_flags(flags: PageFlags) -> None:
    """Refuse a frame whose kpageflags are not those of a private guest_memfd page."""
    check_forbidden_flags(flags)
    where = f"pfn {flags.pfn:#x} (kpageflags {flags.raw:#x}: {','.join(flags.names) or 'none'})"
    if flags.has(m.KPF_ANON):
        raise _refuse("not-guest-memfd", f"{where} is anonymous memory, not a guest_memfd page")
    if flags.mapped_to_user:
        raise _refuse("user-mapped", f"{where} is mapped by a process: a private guest_memfd page is not")
    if not flags.has(m.KPF_UPTODATE):
        raise _refuse("not-guest-memfd", f"{where} is not up to date: guest_memfd marks every page it hands "
                                         "to KVM up to date")


def prove_private_frame(gfn: int, index: int, tid: int, *, rounds: Sequence[Sequence[SpteRequest]],
                        read_back: Mapping[int, tuple[int, int]], flags: PageFlags,
                        min_rounds: int = 2) -> PrivateFrame:
    """Pure: the frame behind private ``gfn``, or ``InjectionRefused`` naming what is not proven.

    ``rounds`` are the faults of each round (at least ``min_rounds``, a zap between them);
    ``read_back`` maps each private gfn to (written, read after the round trip); ``flags`` are the
    pfn's kpageflags read by the caller just now. A caller that cannot zap without losing the page
    (QEMU's conversions discard it) passes ``min_rounds=1``: its one round is the guest's first
    access after the page became private, which is when guest_memfd allocates it.
    """
    if len(rounds) < min_rounds or not rounds:
        raise _refuse("not-proven", f"expected at least {max(min_rounds, 1)} fault round(s), got {len(rounds)}")
    pfns = [_pfn_of_round(gfn, tid, requests, n) for n, requests in enumerate(rounds, 1)]
    if len(set(pfns)) != 1:
        raise _refuse("not-proven", f"gfn {gfn:#x} was given pfns {', '.join(f'{p:#x}' for p in pfns)} in "
                                    "successive rounds: not one guest_memfd page")
    pfn = pfns[0]
    if flags.pfn != pfn:
        raise _refuse("not-proven", f"kpageflags were read for pfn {flags.pfn:#x}, the faults name {pfn:#x}")
    shared_with = sorted({r.gfn for requests in rounds for r in requests if r.pfn == pfn and r.gfn != gfn})
    if shared_with:
        others = ", ".join(f"{g:#x}" for g in shared_with)
        raise _refuse("not-proven", f"pfn {pfn:#x} was also given to gfn(s) {others}")
    if gfn not in read_back:
        raise _refuse("not-proven", f"gfn {gfn:#x} was not read back after the round trip")
    wrong = {g: v for g, v in read_back.items() if v[0] != v[1]}
    if wrong:
        text = ", ".join(f"gfn {g:#x} wrote {w:#x} read {r:#x}" for g, (w, r) in wrong.items())
        raise _refuse("not-proven", f"the private pages did not keep the guest's data across the round trip ({text})")
    check_private_flags(flags)
    rounds_text = (f"{len(pfns)} fault rounds with a zap between them" if len(pfns) > 1 else
                   "the guest's first access after the page became private")
    proof = (f"kvm_mmu_spte_requested named pfn {pfn:#x} for gfn {gfn:#x} (thread {tid}, 4 KiB) in {rounds_text}, "
             f"no other gfn got it, the guest's data survived, kpageflags {','.join(flags.names) or 'none'}")
    return PrivateFrame(gfn=gfn, index=index, pfn=pfn, tid=tid, flags=flags.names, proof=proof)
