"""Pure judge of a conversion row: what every layer must see of a page converted through QEMU.

The expected view per layer, after a conversion through QEMU's ``kvm_convert_memory()``:

- QEMU replies, traces one ``kvm_convert_memory`` line for exactly the page, and records the page
  as private exactly while it is;
- KVM (the host kernel) changes the page's attributes once, to PRIVATE (0x8) or back to 0;
- the guest reads zeros right after every conversion: QEMU discards the side the page leaves
  (shared -> private frees the shared page, private -> shared punches the guest_memfd page), so
  what the guest wrote before is gone, and it reads back what it writes after;
- the host (QEMU's ``pmemsave`` and the memslot's hva in QEMU's address space) sees the guest's
  bytes while the page is shared and zeros while it is private: what the guest writes to a
  private page must never be visible there.

A bad request is refused with an error naming the bad value, changes no attribute and leaves
the guest running. A conversion that takes a page the guest needs stops it; the row must notice
(not time out), and a reset must make every page shared again.
"""

from __future__ import annotations

from dataclasses import dataclass

from gmemtest.private_page import Liveness, PageViews
from guests.probe_client import PAGE_4K
from host_stack.attribute_trace import AttributeChange
from outcome import Check
from qmp_helpers.conversions import Conversion, TracedConversion

__all__ = ["BadRequest", "ConversionRecord", "Wedge", "judge_conversions", "step_checks"]


@dataclass(frozen=True)
class BadRequest:
    """One request QEMU must refuse, and what it left behind."""

    name: str
    must_name: str  # what QEMU's error must say (the bad value, the region, the image)
    conversion: Conversion
    kvm_changes: tuple[AttributeChange, ...]
    qemu_private: tuple[tuple[int, int], ...]
    alive: Liveness


@dataclass(frozen=True)
class Wedge:
    """A conversion of a page the guest needs, how the row found out, and the reset after it."""

    what: str
    gpa: int
    conversion: Conversion
    alive: Liveness
    recovery: str  # how the guest came back
    reset_changes: tuple[AttributeChange, ...]  # KVM's changes while the guest was reset
    private_after_reset: tuple[tuple[int, int], ...]
    answers_after_reset: str  # "" when it answered, else why not


@dataclass(frozen=True)
class ConversionRecord:
    gpa: int  # the page the steps convert
    steps: tuple[PageViews, ...]
    bad: tuple[BadRequest, ...] = ()
    wedge: Wedge | None = None


def _ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(f"{g:#x}+{s:#x}" for g, s in ranges) or "none"


def _changes(changes: tuple[AttributeChange, ...]) -> str:
    return "; ".join(c.describe() for c in changes) or "none"


def step_checks(gpa: int, views: PageViews) -> list[Check]:
    conv = views.conversion
    private = conv.to_private
    name = views.step
    side = "private" if private else "shared"
    checks = [
        Check(f"{name}: QEMU converts", "a reply without error", "converted" if conv.ok else f"refused: {conv.error}",
              conv.ok, "qemu"),
        Check(f"{name}: QEMU's trace (kvm_convert_memory)", TracedConversion(gpa, PAGE_4K, private).describe(),
              "; ".join(t.describe() for t in conv.traced) or "no line",
              conv.traced == (TracedConversion(gpa, PAGE_4K, private),), "qemu"),
        Check(f"{name}: QEMU's record (x-query-kvm-private-memory)", _ranges(((gpa, PAGE_4K),) if private else ()),
              _ranges(views.qemu_private), views.qemu_private == (((gpa, PAGE_4K),) if private else ()), "qemu"),
        Check(f"{name}: KVM's attributes (kvm_vm_set_mem_attributes)",
              f"{gpa:#x}+{PAGE_4K:#x} attributes {0x8 if private else 0:#x}, once", _changes(views.kvm_changes),
              len(views.kvm_changes) == 1 and views.kvm_changes[0].gpa == gpa
              and views.kvm_changes[0].size == PAGE_4K and views.kvm_changes[0].private == private, "host"),
        Check(f"{name}: the guest still answers", "alive", views.alive.how, views.alive.alive, "guest"),
        Check(f"{name}: the guest reads the page right after", "zeros (QEMU discarded the side the page left)",
              views.guest_before_fill, views.guest_before_fill == "zeros", "guest"),
        Check(f"{name}: the guest reads back what it wrote", f"the fill of seed {views.fill_seed}",
              views.guest_after_fill, views.guest_after_fill == f"the fill of seed {views.fill_seed}", "guest"),
    ]
    host_expected = "zeros" if private else f"the fill of seed {views.fill_seed}"
    why = " (the guest's bytes in a private page must not be visible)" if private else ""
    checks += [
        Check(f"{name}: QEMU's read of the gpa (pmemsave) while {side}", host_expected + why, views.qemu_bytes,
              views.qemu_bytes == host_expected, "qemu"),
        Check(f"{name}: the bytes at the memslot's hva while {side}", host_expected + why, views.hva_bytes,
              views.hva_bytes == host_expected, "host"),
    ]
    return checks


def _bad_checks(bad: BadRequest) -> list[Check]:
    conv = bad.conversion
    return [
        Check(f"bad request ({bad.name}): QEMU refuses it by name", f"an error naming {bad.must_name}",
              f"refused: {conv.error}" if conv.error else "converted",
              conv.error is not None and bad.must_name in conv.error, "qemu"),
        Check(f"bad request ({bad.name}): no attribute changes", "none", _changes(bad.kvm_changes),
              not bad.kvm_changes, "host"),
        Check(f"bad request ({bad.name}): QEMU's record unchanged", "none", _ranges(bad.qemu_private),
              not bad.qemu_private, "qemu"),
        Check(f"bad request ({bad.name}): the guest still answers", "alive", bad.alive.how, bad.alive.alive, "guest"),
    ]


def _wedge_checks(wedge: Wedge, page_gpa: int) -> list[Check]:
    conv = wedge.conversion
    shared_again = {gpa for gpa in (wedge.gpa, page_gpa)
                    if any(not c.private and c.gpa <= gpa < c.gpa + c.size for c in wedge.reset_changes)}
    return [
        Check(f"a page the guest needs ({wedge.what}): QEMU converts it", "converted (QEMU cannot know)",
              "converted" if conv.ok else f"refused: {conv.error}", conv.ok, "qemu"),
        Check(f"a page the guest needs ({wedge.what}): the row notices the guest stopped",
              "the probe silent within the liveness limit, and how the guest stopped said", wedge.alive.how,
              not wedge.alive.alive, "guest"),
        Check("after the reset: QEMU's record", "none private", _ranges(wedge.private_after_reset),
              not wedge.private_after_reset, "qemu"),
        Check("after the reset: KVM made the pages shared", f"attributes 0 over {wedge.gpa:#x} and {page_gpa:#x}",
              _changes(wedge.reset_changes), shared_again == {wedge.gpa, page_gpa}, "host"),
        Check("after the reset: the guest answers", f"it boots again ({wedge.recovery}) and answers SSH",
              wedge.answers_after_reset or "answered", not wedge.answers_after_reset, "guest"),
    ]


def judge_conversions(record: ConversionRecord) -> list[Check]:
    """Every check of the row, in the order it ran."""
    checks = [c for views in record.steps for c in step_checks(record.gpa, views)]
    checks += [c for bad in record.bad for c in _bad_checks(bad)]
    if record.wedge is not None:
        checks += _wedge_checks(record.wedge, record.gpa)
    return checks
