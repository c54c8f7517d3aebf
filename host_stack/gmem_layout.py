"""The memslot/guest_memfd address oracle: pure functions, no I/O.

A guest_memfd page at file index ``index`` is seen by the guest at
``gfn = slot.base_gfn + index - slot.gmem_pgoff`` for the slot whose file range
``[gmem_pgoff, gmem_pgoff + npages)`` contains it (KVM's ``kvm_gmem_invalidate_begin`` and the
review of the v11 RFC's ``kvm_gmem_error_page``). Poison of an order-``n`` folio is reported with
``si_addr_lsb = PAGE_SHIFT + n``. Expected values in every test come from here, never from an
observation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "SlotLayout",
    "check_no_overlap",
    "expected_lsb",
    "gfn_for_index",
    "gpa_for_index",
    "hva_for_gpa",
    "index_for_gfn",
    "seed_buggy_gfn",
    "seed_buggy_lsbs",
    "slot_for_gfn",
    "slot_for_index",
]

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT


@dataclass(frozen=True)
class SlotLayout:
    """One memslot bound to a guest_memfd: gfns ``[base_gfn, base_gfn+npages)`` map file
    indices ``[gmem_pgoff, gmem_pgoff+npages)``."""

    slot: int
    base_gfn: int
    npages: int
    gmem_pgoff: int

    def __post_init__(self) -> None:
        for name in ("slot", "base_gfn", "gmem_pgoff"):
            if getattr(self, name) < 0:
                raise ValueError(f"SlotLayout.{name} must be >= 0, got {getattr(self, name)}")
        if self.npages <= 0:
            raise ValueError(f"SlotLayout.npages must be > 0, got {self.npages}")

    @property
    def gfn_end(self) -> int:
        return self.base_gfn + self.npages

    @property
    def index_end(self) -> int:
        return self.gmem_pgoff + self.npages

    @property
    def guest_phys_addr(self) -> int:
        return self.base_gfn << PAGE_SHIFT

    @property
    def memory_size(self) -> int:
        return self.npages << PAGE_SHIFT

    @property
    def gmem_offset(self) -> int:
        return self.gmem_pgoff << PAGE_SHIFT


def _overlap(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


def check_no_overlap(slots: Iterable[SlotLayout]) -> tuple[SlotLayout, ...]:
    """Return the slots as a tuple; ValueError naming both slots if two overlap.

    Two slots overlap if their gfn ranges intersect, if their file ranges intersect (KVM
    refuses binding one file range twice), or if they share a slot id.
    """
    items = tuple(slots)
    for i, a in enumerate(items):
        for b in items[i + 1 :]:
            what = None
            if a.slot == b.slot:
                what = "slot id"
            elif _overlap(a.base_gfn, a.gfn_end, b.base_gfn, b.gfn_end):
                what = "gfn range"
            elif _overlap(a.gmem_pgoff, a.index_end, b.gmem_pgoff, b.index_end):
                what = "guest_memfd index range"
            if what is not None:
                raise ValueError(f"overlapping {what}: {a} and {b}")
    return items


def slot_for_index(slots: Sequence[SlotLayout], index: int) -> SlotLayout | None:
    """The slot whose file range holds ``index``, or None if the page is bound to no slot."""
    if index < 0:
        raise ValueError(f"file index must be >= 0, got {index}")
    for slot in check_no_overlap(slots):
        if slot.gmem_pgoff <= index < slot.index_end:
            return slot
    return None


def slot_for_gfn(slots: Sequence[SlotLayout], gfn: int) -> SlotLayout | None:
    """The slot whose gfn range holds ``gfn``, or None."""
    if gfn < 0:
        raise ValueError(f"gfn must be >= 0, got {gfn}")
    for slot in check_no_overlap(slots):
        if slot.base_gfn <= gfn < slot.gfn_end:
            return slot
    return None


def gfn_for_index(slots: Sequence[SlotLayout], index: int) -> int | None:
    """``base_gfn + index - gmem_pgoff`` of the slot binding ``index``; None if unbound."""
    slot = slot_for_index(slots, index)
    if slot is None:
        return None
    return slot.base_gfn + index - slot.gmem_pgoff


def index_for_gfn(slots: Sequence[SlotLayout], gfn: int) -> int | None:
    """Inverse of ``gfn_for_index``: the file index behind ``gfn``; None if no slot maps it."""
    slot = slot_for_gfn(slots, gfn)
    if slot is None:
        return None
    return slot.gmem_pgoff + gfn - slot.base_gfn


def gpa_for_index(slots: Sequence[SlotLayout], index: int) -> int | None:
    """Guest physical address of file page ``index`` (``gfn << PAGE_SHIFT``), or None."""
    gfn = gfn_for_index(slots, index)
    return None if gfn is None else gfn << PAGE_SHIFT


def hva_for_gpa(slot: SlotLayout, userspace_addr: int, gpa: int) -> int:
    """Host virtual address of ``gpa`` through ``slot``'s ``userspace_addr`` mapping.

    This is the address a SIGBUS for shared memory carries (``si_addr``).
    """
    start = slot.guest_phys_addr
    if not start <= gpa < start + slot.memory_size:
        raise ValueError(f"gpa {gpa:#x} outside slot {slot.slot} [{start:#x}, {start + slot.memory_size:#x})")
    return userspace_addr + (gpa - start)


def expected_lsb(order: int) -> int:
    """``si_addr_lsb`` for poison in an order-``order`` folio: ``PAGE_SHIFT + order``."""
    if not 0 <= order <= 30:
        raise ValueError(f"folio order must be in [0, 30], got {order}")
    return PAGE_SHIFT + order


def seed_buggy_gfn(index: int) -> int:
    """The v11 RFC's translation: it used the file index itself as the gfn.

    Kept so tests can show the oracle tells it apart from the right answer for any slot
    with ``base_gfn != gmem_pgoff``.
    """
    if index < 0:
        raise ValueError(f"file index must be >= 0, got {index}")
    return index


def seed_buggy_lsbs(order: int) -> list[int]:
    """The v11 RFC's signalling: one SIGBUS per 4 KiB page of the folio, each with lsb 12."""
    return [PAGE_SHIFT] * (1 << order)
