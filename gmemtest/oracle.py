"""Expected outcomes, computed from the layout alone.

The oracle sees what the probe mapped (virtual base, page size, which PFN backs each page) and
the scenario row; it never sees what happened after the injection. Everything a verdict compares
against comes from here, so a wrong kernel answer cannot leak into its own expectation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

from gmemtest.scenarios import ScenarioSpec, Source, Trigger
from host_stack import gmem_layout as gl
from host_stack.gmem_layout import PAGE_SHIFT
from host_stack.mm_uapi import BUS_CODE_NAMES, BUS_MCEERR_AO, BUS_MCEERR_AR
from qmp_helpers.mce import MCI_STATUS_OVER, forwarded_mce
from qmp_helpers.memslots import MemslotRegistration

PAGE_SIZE = 1 << PAGE_SHIFT
HUGE_2M_SHIFT = 21

# The si_code names as the verdict prints them; the values live in host_stack.mm_uapi.
SI_CODE_NAMES = BUS_CODE_NAMES

# /proc/cpuinfo vendor_id of the guest's vCPU: the guest kernel grades and records a machine
# check by vendor (arch/x86/kernel/cpu/mce/severity.c, core.c).
INTEL = "GenuineIntel"
AMD = "AuthenticAMD"
VENDORS = (INTEL, AMD)


@dataclass(frozen=True)
class PageLayout:
    """One page of the probe's mapping as the probe saw it before the injection."""

    va: int
    pfn: int


@dataclass(frozen=True)
class MappingLayout:
    """The probe's mapping: `page_size` is the size of each entry in `pages` (4 KiB or 2 MiB)."""

    kind: str
    base_va: int
    size: int
    page_size: int
    pages: tuple[PageLayout, ...]
    is_thp: bool | None = None

    def page_for(self, va: int) -> PageLayout:
        for page in self.pages:
            if page.va <= va < page.va + self.page_size:
                return page
        raise ValueError(f"va {va:#x} is outside the mapping [{self.base_va:#x}, {self.base_va + self.size:#x})")

    def gpa_of(self, va: int) -> int:
        page = self.page_for(va)
        return (page.pfn << PAGE_SHIFT) + (va - page.va)


@dataclass(frozen=True)
class ExpectedSigbus:
    """A SIGBUS a process must get. ``thread`` (host rows, QEMU's signals): "main" for QEMU's
    early-kill thread, "vcpu" for a vCPU thread; None for a single-threaded guest program."""

    si_code: int
    si_addr: int
    si_addr_lsb: int
    thread: str | None = None

    @property
    def delivered(self) -> bool:
        """Whether a ptrace witness can see it delivered.

        QEMU's vCPU threads take SIGBUS in a handler; its main thread blocks SIGBUS and reads it
        from the main loop's signalfd (util/main-loop.c qemu_signal_init), where no delivery
        happens: only the kernel's signal_generate tracepoint sees that one, and QEMU's stderr
        line names its hva.
        """
        return self.thread != "main"


@dataclass(frozen=True)
class ExpectedMemoryFailureEvent:
    """QEMU's MEMORY_FAILURE event: it says QEMU queued the MCE, not that the guest recovered."""

    recipient: str
    action: str
    action_required: bool
    recursive: bool


@dataclass(frozen=True)
class Expectation:
    scenario: str
    poison_va: int
    poison_gpa: int
    poison_pfn: int
    sigbus: ExpectedSigbus | None
    memory_failure_events: tuple[ExpectedMemoryFailureEvent, ...]
    panic: bool
    hwpoison_pfn: int | None
    hardware_corrupted_delta_kb: int | None
    recovery_pfn: int | None
    mce_status: int
    mce_bank: int
    mce_record_addr: int
    # arch/x86/kernel/cpu/mce/severity.c: what the grader must say when the guest panics.
    panic_severity: str | None = None
    panic_reason: str | None = None
    # Further injections after the first (two pages of one mapping): (gpa, recorded address),
    # and the SIGBUS each one's touch must give, in order after `sigbus`.
    more_poison: tuple[tuple[int, int], ...] = ()
    more_sigbus: tuple[ExpectedSigbus, ...] = ()
    # mm/memory-failure.c action_page_types: checked when the page's type is the point ("free buddy page").
    recovery_page_type: str | None = None
    # Offsets of the mapping that must still read their pattern: the other 4 KiB pieces of a THP.
    intact_offsets: tuple[int, ...] = ()
    # The private/shared conversions QEMU must trace (kvm_convert_memory) over the injection:
    # none for a guest that is not confidential; None where the oracle cannot say (SNP, TDX).
    conversions: tuple[str, ...] | None = ()
    # Every (status, addr) the guest must record in the bank, when the injections differ in kind
    # (a forwarded AO, then an AR); None: every injection records ``mce_status``.
    mce_records: tuple[tuple[int, int], ...] | None = None

    @property
    def expected_records(self) -> tuple[tuple[int, int], ...]:
        if self.mce_records is not None:
            return self.mce_records
        return ((self.mce_status, self.mce_record_addr), *((self.mce_status, a) for _, a in self.more_poison))

    @property
    def poison_pfns(self) -> tuple[int, ...]:
        return (self.poison_pfn, *(gpa >> PAGE_SHIFT for gpa, _ in self.more_poison))

    @property
    def sigbus_all(self) -> tuple[ExpectedSigbus, ...]:
        return ((self.sigbus,) if self.sigbus is not None else ()) + self.more_sigbus


def poison_unit_shift(layout: MappingLayout) -> int:
    """log2 of what the guest kernel loses when one byte goes bad.

    hugetlb pages are poisoned whole; a THP is split first, so only its 4 KiB piece is lost.
    """
    if layout.kind == "hugetlb2m":
        return HUGE_2M_SHIFT
    return PAGE_SHIFT


def free_page_layout(pfn: int) -> MappingLayout:
    """A free frame as a one-page 'mapping' at va 0: nothing maps it, so offsets are page offsets."""
    return MappingLayout(kind="free", base_va=0, size=PAGE_SIZE, page_size=PAGE_SIZE,
                         pages=(PageLayout(0, pfn),), is_thp=False)


def _touch_sigbus(spec: ScenarioSpec, layout: MappingLayout, poison_offset: int, touch_offset: int,
                  shift: int) -> ExpectedSigbus:
    unit_mask = ~((1 << shift) - 1)
    poison_va, touch_va = layout.base_va + poison_offset, layout.base_va + touch_offset
    if touch_va & unit_mask != poison_va & unit_mask:
        raise ValueError(
            f"{spec.name}: touch at {touch_va:#x} is outside the poisoned unit of {1 << shift:#x} bytes at "
            f"{poison_va & unit_mask:#x}; the touch would not fault"
        )
    # do_user_addr_fault reports the faulting address itself, not the page base.
    return ExpectedSigbus(BUS_MCEERR_AR, touch_va, shift)


def _sigbus_after_touch(spec: ScenarioSpec, layout: MappingLayout, poison_va: int, shift: int) -> ExpectedSigbus:
    assert spec.touch_offset is not None
    return _touch_sigbus(spec, layout, spec.poison_offset, spec.touch_offset, shift)


def _sigbus_while_waiting(spec: ScenarioSpec, layout: MappingLayout, poison_va: int, shift: int) -> ExpectedSigbus:
    # kill_proc reports the page's address in the victim's VMA.
    return ExpectedSigbus(BUS_MCEERR_AO, poison_va & ~((1 << shift) - 1), shift)


def _sigbus_while_spinning(spec: ScenarioSpec, layout: MappingLayout, poison_va: int, shift: int) -> ExpectedSigbus:
    return ExpectedSigbus(BUS_MCEERR_AR, poison_va & ~((1 << shift) - 1), shift)


def _no_sigbus(spec: ScenarioSpec, layout: MappingLayout, poison_va: int, shift: int) -> None:
    return None


# The expectation half of each trigger (its act is gmemtest.acts.ACTS): the SIGBUS the program
# must get when the guest recovers, from the row, the mapping's layout, the poisoned va and the
# poison unit's shift.
SIGBUS_OF_TRIGGER: dict[Trigger, Callable[[ScenarioSpec, MappingLayout, int, int], ExpectedSigbus | None]] = {
    Trigger.TOUCH: _sigbus_after_touch,
    Trigger.WAIT: _sigbus_while_waiting,
    Trigger.SPIN: _sigbus_while_spinning,
    Trigger.KERNEL: _no_sigbus,
    Trigger.NONE: _no_sigbus,
}


def _intact_offsets(spec: ScenarioSpec, layout: MappingLayout) -> tuple[int, ...]:
    """Offsets that must still read their pattern: split_huge_page() leaves the other pieces of a THP mapped."""
    if not layout.is_thp:
        return ()
    piece = spec.poison_offset >> PAGE_SHIFT
    within = spec.poison_offset & (PAGE_SIZE - 1)
    return tuple((i << PAGE_SHIFT) + within for i in range(min(layout.size, 1 << HUGE_2M_SHIFT) >> PAGE_SHIFT)
                 if i != piece)


def amd_panics(spec: ScenarioSpec) -> bool:
    """Whether an AMD guest must panic where an Intel guest recovers.

    Linux's mce_severity_amd (6.1 and later): an uncorrected error without PCC, with SUCCOR
    (QEMU sets it for KVM guests), is action required unless it arrives in kernel context,
    where it panics ("Uncorrected unrecoverable error in kernel context"). AMD has no
    action-optional class for a #MC: only the rows whose program runs in user mode on the
    target vCPU (SPIN) can recover; in every other row the vCPU idles in the kernel.
    """
    return spec.trigger is not Trigger.SPIN


def expect(
    spec: ScenarioSpec, layout: MappingLayout, *, vcpus: int, mce_status: int, mce_misc: int, mce_bank: int,
    vendor: str = INTEL,
) -> Expectation:
    """What must happen when `spec` runs against `layout` on a guest with `vcpus` vCPUs of `vendor`."""
    if vendor not in VENDORS:
        raise ValueError(f"guest vCPU vendor {vendor!r} has no machine-check oracle; known: {', '.join(VENDORS)}")
    if spec.poison_offset >= layout.size:
        raise ValueError(
            f"{spec.name}: poison offset {spec.poison_offset:#x} is beyond the mapping size {layout.size:#x}"
        )
    poison_va = layout.base_va + spec.poison_offset
    poison_gpa = layout.gpa_of(poison_va)
    poison_pfn = poison_gpa >> PAGE_SHIFT
    shift = poison_unit_shift(layout)

    panic = spec.expects_panic or (vendor == AMD and amd_panics(spec))
    sigbus = None if panic else SIGBUS_OF_TRIGGER[spec.trigger](spec, layout, poison_va, shift)

    event = ExpectedMemoryFailureEvent("guest", "inject", spec.mce_kind == "SRAR", False)
    # A broadcast (mce -b) gives the other vCPUs a bank-1 UC record without AR: their events are
    # never action-required, whatever the kind of the MCE on the target vCPU.
    others = ExpectedMemoryFailureEvent("guest", "inject", False, False)
    nevents = vcpus if spec.broadcast else 1
    rendezvous = spec.broadcast and vcpus > 1

    more_poison: tuple[tuple[int, int], ...] = ()
    more_sigbus: tuple[ExpectedSigbus, ...] = ()
    # A guest that panics at the first injection gets no second one, and nothing is read back.
    if spec.second_poison_offset is not None and not panic:
        assert spec.second_touch_offset is not None
        gpa = layout.gpa_of(layout.base_va + spec.second_poison_offset)
        more_poison = ((gpa, mce_record_addr(gpa, mce_misc, vendor)),)
        more_sigbus = (_touch_sigbus(spec, layout, spec.second_poison_offset, spec.second_touch_offset, shift),)
    injections = 1 + len(more_poison)
    intact = () if panic else _intact_offsets(spec, layout)
    recovered = not panic
    return Expectation(
        scenario=spec.name,
        poison_va=poison_va,
        poison_gpa=poison_gpa,
        poison_pfn=poison_pfn,
        sigbus=sigbus,
        memory_failure_events=(event, *(others,) * (nevents - 1)) * injections,
        panic=panic,
        # The mark ends up on the raw 4 KiB frame that was hit, for hugetlb too: the free huge
        # page is dissolved after unmapping and the poison moves to its raw page.
        hwpoison_pfn=poison_pfn if recovered else None,
        # HardwareCorrupted counts raw 4 KiB pages handed to memory_failure(): one per injection.
        hardware_corrupted_delta_kb=injections * PAGE_SIZE // 1024 if recovered else None,
        recovery_pfn=poison_pfn if recovered else None,
        mce_status=mce_status,
        mce_bank=mce_bank,
        mce_record_addr=mce_record_addr(poison_gpa, mce_misc, vendor),
        panic_severity=_panic_severity(vendor) if panic else None,
        panic_reason=_panic_reason(vendor, rendezvous) if panic else None,
        more_poison=more_poison,
        more_sigbus=more_sigbus,
        recovery_page_type="free buddy page" if spec.page_kind == "free" else None,
        intact_offsets=intact,
    )


def _panic_severity(vendor: str) -> str:
    # severity.c: the Intel table's kernel-context SRAR row, and mce_severity_amd's message.
    return "Uncorrected unrecoverable error in kernel context" if vendor == AMD \
        else "Data load in unrecoverable area of kernel"


def _panic_reason(vendor: str, rendezvous: bool) -> str:
    if vendor == AMD:
        return "Fatal local machine check"
    # With more than one vCPU in the rendezvous, the monarch panics from mce_reign() ("Fatal
    # machine check"); a lone vCPU panics in do_machine_check() ("... on current CPU").
    return "Fatal machine check" if rendezvous else "Fatal machine check on current CPU"


def mce_record_addr(gpa: int, misc: int, vendor: str = INTEL) -> int:
    """The address the guest kernel records: on Intel, MCi_ADDR masked to MCi_MISC's recoverable LSB.

    arch/x86/kernel/cpu/mce/core.c (mce_read_aux) shifts the low bits out when MISC reports a
    physical address mode (Intel software error recovery), so an injection at gpa+0x80 with
    MISC 0x8c is recorded page-aligned. An AMD guest records MCi_ADDR as injected (measured:
    ADDR 2974040 for an SRAR at gpa 0x2974040, Debian 6.1 under KVM inside the lab host).
    """
    if vendor == AMD:
        return gpa
    lsb = misc & 0x3F  # MCi_MISC[5:0]: recoverable address LSB
    mode = (misc >> 6) & 0x7  # MCi_MISC[8:6]: address mode, 2 = physical
    if mode != 2:
        return gpa
    return gpa & ~((1 << lsb) - 1)


# ----- the whole chain: the host poisons the frame behind a guest page --------------------------

def slot_layout(memslot: MemslotRegistration) -> gl.SlotLayout:
    """A memslot QEMU registered, in the oracle's terms (a slot without guest_memfd has pgoff 0)."""
    if memslot.gpa % PAGE_SIZE or memslot.size % PAGE_SIZE or memslot.guest_memfd_offset % PAGE_SIZE:
        raise ValueError(f"memslot not page-aligned: {memslot.describe()}")
    return gl.SlotLayout(memslot.slot, memslot.gpa >> PAGE_SHIFT, memslot.size >> PAGE_SHIFT,
                         memslot.guest_memfd_offset >> PAGE_SHIFT)


def memslot_hva(memslot: MemslotRegistration, gpa: int) -> int:
    """The hva KVM uses for ``gpa``: the memslot's userspace_addr plus the offset into the slot."""
    return gl.hva_for_gpa(slot_layout(memslot), memslot.hva, gpa)


@dataclass(frozen=True)
class HostFrameLayout:
    """Where the guest page lives on the host, as resolved before the injection: the memslot KVM
    serves its gpa from (QEMU's registration), the hva through that slot, the pfn behind the hva.

    Every hva the oracle expects comes from ``memslot`` (``hva_of``), so a QEMU whose own
    gpa -> hva answer disagreed with what it told KVM could not hide behind it.
    """

    gpa: int
    hva: int
    pfn: int
    qemu_pid: int
    memslot: MemslotRegistration
    # log2 of the host page the frame belongs to: 21 when guest RAM is on 2 MiB hugetlb pages
    # (KPF_HUGE), 12 otherwise (a THP is split before it is poisoned: 4 KiB is lost).
    host_page_shift: int = PAGE_SHIFT

    def __post_init__(self) -> None:
        if self.hva != self.hva_of(self.gpa):
            raise ValueError(f"hva {self.hva:#x} of gpa {self.gpa:#x} is not the memslot's "
                             f"{self.hva_of(self.gpa):#x} ({self.memslot.describe()})")

    def hva_of(self, gpa: int) -> int:
        """The hva KVM uses for ``gpa`` (another page of the same slot, say)."""
        return memslot_hva(self.memslot, gpa)


# What memory failure reports for a guest_memfd folio: MF_DELAYED by design; "Failed" on kernels
# that count MF_DELAYED as a failure (7.3.4: truncate_error_folio), which is a finding.
GMEM_RECOVERY: Final = ("Delayed", "Failed")


@dataclass(frozen=True)
class HostExpectation:
    """The host and QEMU layers of a host-poison row."""

    frame: HostFrameLayout
    qemu_sigbus: tuple[ExpectedSigbus, ...]
    # QEMU's "Guest MCE Memory Error at QEMU addr <hva> and GUEST addr <gpa> of type <code>" lines.
    forwarded: tuple[tuple[str, int, int], ...]
    host_hardware_corrupted_delta_kb: int
    # (pfn, results accepted) of the host's "Memory failure: <pfn>: recovery action for ...: <result>"
    # line: a memfd page is truncated ("Recovered"); guest_memfd keeps its poisoned folio
    # (kvm_gmem_error_folio returns MF_DELAYED: "Delayed"), which 7.3.4 counts as "Failed" (a finding).
    host_recovery: tuple[int, tuple[str, ...]]
    # The guest handles the forwarded AO on its own, before the program touches the page (the
    # runner waits for that recovery before the touch).
    guest_recovers_first: bool = True
    # system_reset with the frame still poisoned: QEMU remaps every page it recorded as poisoned
    # (kvm_unpoison_all -> qemu_ram_remap), so the hva is backed by another, healthy frame and
    # the rebooted guest's kernel reads the gpa without a machine check.
    reset: bool = False
    # KVM serves the page from a guest_memfd (the profile backs RAM with one), not from QEMU's
    # userspace mapping: the memslot carries a guest_memfd and QEMU's fd table holds it.
    ram_guest_memfd: bool = False


def expect_host(spec: ScenarioSpec, layout: MappingLayout, frame: HostFrameLayout, *, vendor: str,
                mce_bank: int, ram_guest_memfd: bool = False) -> tuple[Expectation, HostExpectation]:
    """What every layer must show when the host poisons the frame behind ``spec``'s page.

    Host: memory_failure() on QEMU's anonymous page unmaps it, counts it (+4 kB) and, QEMU having
    asked for early kill, sends QEMU's early-kill thread (the main thread) BUS_MCEERR_AO at the
    page's hva with lsb 12. QEMU forwards it as an action-optional MCE at the page's gpa.
    Guest, by vendor (QEMU's encoding, qmp_helpers.mce.forwarded_mce):
    - Intel: the AO raises #MC (SRAO): the guest recovers the page at once; a later touch
      faults in the guest (BUS_MCEERR_AR at the byte touched), KVM never sees an access.
    - AMD: the AO is a deferred error written to bank 9, no #MC. A guest that polls its banks
      recovers it at the next poll (then as on Intel); one that does not poll still maps the
      page, so the touch reaches the poisoned frame: KVM sends QEMU's vCPU thread BUS_MCEERR_AR
      at the hva (lsb 12: x86 KVM always reports PAGE_SHIFT), QEMU injects an SRAR whose bank
      overflows the deferred record (OVER), and the guest kills the program with BUS_MCEERR_AR
      at the page (kill_me_maybe -> memory_failure with MF_ACTION_REQUIRED).
    """
    if spec.source is not Source.HOST:
        raise ValueError(f"{spec.name} is not a host-poison row")
    if vendor not in VENDORS:
        raise ValueError(f"guest vCPU vendor {vendor!r} has no machine-check oracle; known: {', '.join(VENDORS)}")
    amd = vendor == AMD
    poison_va = layout.base_va + spec.poison_offset
    gpa = layout.gpa_of(poison_va)
    if gpa != frame.gpa:
        raise ValueError(f"{spec.name}: the host frame was resolved for gpa {frame.gpa:#x}, the layout says {gpa:#x}")
    if frame.host_page_shift > PAGE_SHIFT:
        exp, host = _expect_host_huge(spec, layout, frame, amd=amd, mce_bank=mce_bank)
        return exp, replace(host, ram_guest_memfd=ram_guest_memfd)
    page_mask = ~(PAGE_SIZE - 1)
    gpa_page, va_page = gpa & page_mask, poison_va & page_mask
    hva_page = frame.hva_of(gpa_page)
    ao = forwarded_mce("BUS_MCEERR_AO", amd=amd)
    guest_learns_of_ao = ao.raises_mc or bool(spec.guest_mce_poll_s)
    qemu_sigbus = [ExpectedSigbus(BUS_MCEERR_AO, hva_page, PAGE_SHIFT, "main")]
    forwarded = [("BUS_MCEERR_AO", hva_page, gpa_page)]
    events = [ExpectedMemoryFailureEvent("guest", "inject", ao.action_required, False)]
    status = ao.status
    sigbus: ExpectedSigbus
    if spec.trigger is Trigger.WAIT:
        if not guest_learns_of_ao:
            raise ValueError(f"{spec.name}: an early-kill row needs a guest that learns of the AO "
                             "(an Intel vCPU, or guest_mce_poll_s > 0)")
        sigbus = ExpectedSigbus(BUS_MCEERR_AO, va_page, PAGE_SHIFT)
    elif spec.trigger is Trigger.TOUCH and guest_learns_of_ao:
        assert spec.touch_offset is not None
        sigbus = _touch_sigbus(spec, layout, spec.poison_offset, spec.touch_offset, PAGE_SHIFT)
    elif spec.trigger is Trigger.TOUCH:
        ar = forwarded_mce("BUS_MCEERR_AR", amd=amd)
        qemu_sigbus.append(ExpectedSigbus(BUS_MCEERR_AR, hva_page, PAGE_SHIFT, "vcpu"))
        forwarded.append(("BUS_MCEERR_AR", hva_page, gpa_page))
        events.append(ExpectedMemoryFailureEvent("guest", "inject", ar.action_required, False))
        status = ar.status | MCI_STATUS_OVER  # the deferred AO record is still valid in the bank
        sigbus = ExpectedSigbus(BUS_MCEERR_AR, va_page, PAGE_SHIFT)
    else:
        raise ValueError(f"{spec.name}: host-poison rows know triggers touch and wait, got {spec.trigger.value}")
    exp = Expectation(
        scenario=spec.name, poison_va=poison_va, poison_gpa=gpa, poison_pfn=gpa >> PAGE_SHIFT, sigbus=sigbus,
        memory_failure_events=tuple(events), panic=False, hwpoison_pfn=gpa >> PAGE_SHIFT,
        hardware_corrupted_delta_kb=PAGE_SIZE // 1024, recovery_pfn=gpa >> PAGE_SHIFT, mce_status=status,
        mce_bank=mce_bank, mce_record_addr=gpa_page,
    )
    host = HostExpectation(frame=frame, qemu_sigbus=tuple(qemu_sigbus), forwarded=tuple(forwarded),
                           host_hardware_corrupted_delta_kb=PAGE_SIZE // 1024,
                           host_recovery=(frame.pfn, GMEM_RECOVERY if ram_guest_memfd else ("Recovered",)),
                           guest_recovers_first=guest_learns_of_ao and spec.trigger is Trigger.TOUCH,
                           reset=spec.reset_after, ram_guest_memfd=ram_guest_memfd)
    return exp, host


def _expect_host_huge(spec: ScenarioSpec, layout: MappingLayout, frame: HostFrameLayout, *, amd: bool,
                      mce_bank: int) -> tuple[Expectation, HostExpectation]:
    """The frame lies in a 2 MiB hugetlb page of the host, under a guest THP on exactly that page.

    memory_failure() takes the whole huge page (HardwareCorrupted still counts the raw 4 KiB
    page) and tells QEMU's early-kill thread with BUS_MCEERR_AO at the raw page, lsb 21. QEMU
    forwards the address alone: one 4 KiB action-optional MCE at that gpa (it never reads the
    lsb), which the guest (polling, or an Intel vCPU at once) recovers. The rest of the 2 MiB is
    gone on the host but not in the guest: the program's touch of another piece q reaches the
    host page, KVM signals the vCPU thread BUS_MCEERR_AR at q's hva with lsb 12 (x86 KVM reports
    PAGE_SHIFT even for hugetlb), QEMU injects an SRAR at q's gpa (a bank the poll emptied: no
    OVER), and the program gets BUS_MCEERR_AR at q's page.
    """
    huge = 1 << frame.host_page_shift
    if spec.page_kind != "thp" or not layout.is_thp:
        raise ValueError(f"{spec.name}: guest RAM on host huge pages is judged through a guest THP over one of them")
    if (frame.hva - frame.gpa) % huge:
        raise ValueError(f"{spec.name}: hva {frame.hva:#x} and gpa {frame.gpa:#x} are not congruent modulo {huge:#x}: "
                         "the guest THP does not lie on one host huge page")
    if spec.trigger is not Trigger.TOUCH or spec.touch_offset is None:
        raise ValueError(f"{spec.name}: the huge-page row touches another piece of the THP")
    ao, ar = forwarded_mce("BUS_MCEERR_AO", amd=amd), forwarded_mce("BUS_MCEERR_AR", amd=amd)
    if not (ao.raises_mc or spec.guest_mce_poll_s):
        raise ValueError(f"{spec.name}: the guest must learn of the forwarded AO first (poll, or an Intel vCPU)")
    page_mask = ~(PAGE_SIZE - 1)
    touch_va = layout.base_va + spec.touch_offset
    gpa_p, gpa_q = frame.gpa & page_mask, layout.gpa_of(touch_va) & page_mask
    if gpa_q == gpa_p or gpa_q // huge != gpa_p // huge:
        raise ValueError(f"{spec.name}: the touch must hit another 4 KiB piece of the same huge page")
    hva_p, hva_q = frame.hva_of(gpa_p), frame.hva_of(gpa_q)
    exp = Expectation(
        scenario=spec.name, poison_va=layout.base_va + spec.poison_offset, poison_gpa=frame.gpa,
        poison_pfn=gpa_p >> PAGE_SHIFT, sigbus=ExpectedSigbus(BUS_MCEERR_AR, touch_va & page_mask, PAGE_SHIFT),
        memory_failure_events=(ExpectedMemoryFailureEvent("guest", "inject", ao.action_required, False),
                               ExpectedMemoryFailureEvent("guest", "inject", ar.action_required, False)),
        panic=False, hwpoison_pfn=gpa_p >> PAGE_SHIFT, hardware_corrupted_delta_kb=2 * PAGE_SIZE // 1024,
        recovery_pfn=gpa_p >> PAGE_SHIFT, mce_status=ao.status, mce_bank=mce_bank, mce_record_addr=gpa_p,
        more_poison=((gpa_q, gpa_q),), mce_records=((ao.status, gpa_p), (ar.status, gpa_q)),
    )
    host = HostExpectation(
        frame=frame,
        qemu_sigbus=(ExpectedSigbus(BUS_MCEERR_AO, hva_p, frame.host_page_shift, "main"),
                     ExpectedSigbus(BUS_MCEERR_AR, hva_q, PAGE_SHIFT, "vcpu")),
        forwarded=(("BUS_MCEERR_AO", hva_p, gpa_p), ("BUS_MCEERR_AR", hva_q, gpa_q)),
        host_hardware_corrupted_delta_kb=PAGE_SIZE // 1024, host_recovery=(frame.pfn, ("Recovered",)),
        guest_recovers_first=True, reset=spec.reset_after)
    return exp, host
