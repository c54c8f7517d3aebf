"""The conversion row: QMP converts one guest page back and forth, and every layer is read each time.

Steps (each judged by ``conversion_oracle``): the page the runner picks goes shared -> private ->
shared -> private -> shared; after each conversion the guest reads the page, writes a fresh fill
and reads it back, and QEMU and the host kernel read the gpa. Then the bad requests (each must be
refused by name and leave the guest running), then a conversion of a page the guest needs (its
vCPU 0's GDT, found through QEMU: the guest loses its descriptors and stops) which the row must
notice, and the reset that brings the guest back with every page shared again.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict
from typing import Any, Final

from gmemtest.conversion_oracle import BadRequest, ConversionRecord, Wedge, judge_conversions
from gmemtest.errors import ScenarioError
from gmemtest.evidence import Evidence
from gmemtest.guest_run import GuestRun
from gmemtest.private_page import PrivatePage, check_alive, make_private, page_views, share_all
from gmemtest.scenarios import ScenarioSpec
from guests.probe_client import PAGE_4K, ProbeClient
from guests.ssh import SshError
from host_stack.attribute_trace import AttributeTrace
from outcome import Verdict
from qmp_helpers.conversions import convert, private_ranges

__all__ = ["FILL_SEEDS", "run_conversion_row"]

LOG = logging.getLogger(__name__)

# The seeds the guest fills the page with after each conversion (1-255, all different).
FILL_SEEDS: Final = (0x5A, 0xA5, 0x3C, 0xC3)
# Far above any guest's RAM: "is not guest memory".
OUTSIDE_RAM_GPA: Final = 1 << 40
_GDT_BASE = re.compile(r"^GDT=\s*([0-9a-f]+)\s", re.MULTILINE)
_GVA2GPA = re.compile(r"gpa: (0x[0-9a-f]+)")
_IOMEM_KERNEL_CODE = re.compile(r"^\s*([0-9a-f]+)-[0-9a-f]+ : Kernel code$", re.MULTILINE)


def _bad_targets(guest: GuestRun, page: PrivatePage) -> list[tuple[str, int, int, str]]:
    """(name, gpa, size, what the refusal must name) of every bad request, from this guest's layout."""
    ranges = guest.machine.ram_ranges()
    if guest.profile.firmware is None:
        raise ScenarioError(f"profile {guest.profile.name} names no firmware file: no 'pc.bios' to ask about")
    # QEMU maps the whole -bios file right below 4 GiB (hw/i386/x86-common.c, x86_bios_rom_init).
    firmware = (1 << 32) - guest.profile.firmware.stat().st_size
    low_end = min(end for start, end, _ in ranges if start == 0) + 1  # RAM below the VGA hole ends here
    match = _IOMEM_KERNEL_CODE.search(guest.guest_text("cat /proc/iomem"))
    if match is None:
        raise ScenarioError("the guest's /proc/iomem has no 'Kernel code' line to ask about")
    kernel = int(match[1], 16)
    return [
        ("unaligned gpa", page.gpa + 0x800, PAGE_4K, f"{page.gpa + 0x800:#x}"),
        ("outside guest RAM", OUTSIDE_RAM_GPA, PAGE_4K, f"{OUTSIDE_RAM_GPA:#x}"),
        ("firmware, not guest_memfd", firmware, PAGE_4K, "'pc.bios'"),
        ("across two regions", low_end - PAGE_4K, 2 * PAGE_4K, "crosses"),
        ("over the kernel image", kernel, PAGE_4K, "overlaps"),
    ]


def _bad_requests(guest: GuestRun, probe: ProbeClient, page: PrivatePage, kvm: AttributeTrace) -> list[BadRequest]:
    found = []
    for name, gpa, size, must_name in _bad_targets(guest, page):
        done = convert(guest.machine, gpa, size, True)
        alive = check_alive(guest, probe, page.mapping)
        found.append(BadRequest(name, must_name, done, tuple(kvm.new_changes()), private_ranges(guest.machine), alive))
        LOG.info("bad request (%s): %s", name, done.describe())
    return found


def _gdt_gpa(guest: GuestRun) -> tuple[int, int]:
    """(gva, gpa) of vCPU 0's GDT, as QEMU reads the vCPU's registers and page tables."""
    machine = guest.machine
    regs = machine.hmp("info registers")
    base = _GDT_BASE.search(regs)
    if base is None:
        raise ScenarioError(f"no GDT= line in QEMU's register dump: {regs[:300]!r}")
    gva = int(base[1], 16)
    text = machine.hmp(f"gva2gpa {gva:#x}")
    gpa = _GVA2GPA.search(text)
    if gpa is None:
        raise ScenarioError(f"QEMU cannot translate the GDT's address {gva:#x}: {text.strip()!r}")
    return gva, int(gpa[1], 16) & ~(PAGE_4K - 1)


def _wedge(guest: GuestRun, probe: ProbeClient, page: PrivatePage, kvm: AttributeTrace) -> Wedge:
    """Convert the page of vCPU 0's GDT: the next segment load reads zeros and the guest stops (measured:
    a triple fault, QEMU resets it). The row notices through the probe, then brings the guest back."""
    gva, gpa = _gdt_gpa(guest)
    mark = guest.machine.event_mark()
    done = convert(guest.machine, gpa, PAGE_4K, True)
    alive = check_alive(guest, probe, page.mapping)
    probe.abandon()
    reset_itself = any(e.name == "RESET" and e.data.get("guest") for e in guest.machine.events[mark:])
    if reset_itself:
        recovery = "it reset itself (QMP RESET guest=true), QEMU's reset handlers ran"
        seconds = guest.rejoin()
    else:
        recovery = "system_reset"
        seconds = guest.reboot()
    LOG.info("guest back %.1f s after the GDT conversion: %s", seconds, recovery)
    answers = ""
    try:
        guest.guest_text("true")
    except SshError as exc:
        answers = str(exc)[:300]
    # From the conversion on: its own change (to private), then the reset's (to shared), which may
    # come while the liveness check still waits.
    reset_changes = tuple(c for c in kvm.new_changes() if not c.private)
    return Wedge(f"vCPU 0's GDT, gva {gva:#x}", gpa, done, alive, recovery, reset_changes,
                 private_ranges(guest.machine), answers)


def run_conversion_row(spec: ScenarioSpec, guest: GuestRun, probe: ProbeClient, ev: Evidence,
                       setup: dict[str, Any]) -> Verdict:
    """Carry out the conversion row on ``guest`` (kvm-swprot) with ``probe``; the verdict of every layer."""
    machine = guest.machine
    warnings: list[str] = []
    with AttributeTrace() as kvm:
        try:
            mapping = probe.map(spec.page_kind, spec.npages)
            probe.lock(mapping.id)
            page = make_private(guest, probe, mapping)
            ev.json("private-page.json", {"gpa": page.gpa, "hva": page.hva, "offset": page.offset,
                                          "refused_first": [asdict(r) for r in page.refusals]})
            steps = []
            previous = FILL_SEEDS[-1]  # the probe's own pattern is there first: the check says "zeros" or not
            conversion = page.first
            for n, seed in enumerate(FILL_SEEDS):
                to_private = n % 2 == 0
                if n:
                    conversion = convert(machine, page.gpa, PAGE_4K, to_private)
                step = f"step {n + 1}, {'shared -> private' if to_private else 'private -> shared'}"
                steps.append(page_views(step, guest, probe, page, conversion=conversion, kvm=kvm,
                                        previous_seed=previous, fill_seed=seed))
                previous = seed
            bad = _bad_requests(guest, probe, page, kvm)
            wedge = _wedge(guest, probe, page, kvm)
        finally:
            ev.text("kvm-attributes.trace", kvm.text())
            warnings += share_all(guest)
    record = ConversionRecord(page.gpa, tuple(steps), tuple(bad), wedge)
    ev.json("conversions.json", asdict(record))
    timings = {"round_trip_ms": [round((a.conversion.traced_ms or 0) + (b.conversion.traced_ms or 0), 2)
                                 for a, b in zip(steps[::2], steps[1::2], strict=True)],
               "refused_first": len(page.refusals)}
    return Verdict(spec.name, tuple(judge_conversions(record)), setup=setup, warnings=tuple(warnings),
                   evidence={"gpa": page.gpa, "conversions": "conversions.json", "kvm_trace": "kvm-attributes.trace",
                             **timings})

