"""A guest page made private through QMP, and what each layer sees of it.

Used by every private row (``ScenarioSpec.private``): the probe maps and mlocks a region, the
runner converts the first of its pages (highest gpa first) that QEMU accepts, and reads the page
back at every layer after each step:

- the guest: the probe's ``check`` of the page (and ``fill`` to write a known pattern);
- QEMU: its reply, its ``kvm_convert_memory`` trace line, its record of private memory
  (``x-query-kvm-private-memory``) and its own read of the gpa (``pmemsave``);
- the host kernel: KVM's attribute changes (``kvm_vm_set_mem_attributes``) and the bytes at the
  memslot's hva in QEMU's address space (``/proc/PID/mem``);
- and whether the guest still answers (a conversion that takes a page the guest needs wedges it
  silently: QEMU still says ``running``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from gmemtest.errors import ScenarioError
from gmemtest.guest_run import GuestRun
from guests.probe_client import PAGE_4K, Mapping, ProbeClient, ProbeError, SigbusReport, fill_page
from guests.ssh import SshError
from host_stack.attribute_trace import AttributeChange, AttributeTrace
from host_stack.pagemap import PagemapError, read_memory
from qmp_helpers import QemuError
from qmp_helpers.conversions import Conversion, convert, private_ranges, trace_conversions

__all__ = ["LIVENESS_TIMEOUT_S", "Liveness", "PageViews", "PrivatePage", "check_alive", "describe_bytes",
           "make_private", "page_views", "refused_range", "share_all"]

LOG = logging.getLogger(__name__)

# How long the probe may take to answer before the guest counts as stopped (a round trip over
# SSH to a nested guest under TCG takes 10-60 ms).
LIVENESS_TIMEOUT_S: Final = 5.0
# At most this many pages are tried before the row gives up finding one QEMU will convert.
MAX_REFUSALS: Final = 8
# QEMU names the image a refused range overlaps: "... overlaps <what> at 0x<start>+0x<size>".
_OVERLAP: Final = re.compile(r"overlaps (.+?) at (0x[0-9a-f]+)\+(0x[0-9a-f]+)")


def refused_range(error: str) -> tuple[str, int, int] | None:
    """Pure: (what, start, size) of the loaded image a refusal names, or None for other refusals."""
    match = _OVERLAP.search(error)
    return None if match is None else (match[1], int(match[2], 16), int(match[3], 16))


def describe_bytes(data: bytes, seeds: tuple[int, ...] = ()) -> str:
    """Pure: "zeros", "the fill of seed N" (one of ``seeds``) or a short summary of other bytes."""
    if not any(data):
        return "zeros"
    for seed in seeds:
        if data == fill_page(seed)[:len(data)]:
            return f"the fill of seed {seed}"
    nonzero = sum(1 for b in data if b)
    return f"other bytes ({nonzero} of {len(data)} non-zero, first {data[:8].hex()})"


@dataclass(frozen=True)
class Liveness:
    """Whether the guest answered after a step, and how it was found out."""

    alive: bool
    status: str  # QEMU's run state (query-status)
    how: str
    seconds: float


def check_alive(guest: GuestRun, probe: ProbeClient, mapping: Mapping, *,
                timeout_s: float = LIVENESS_TIMEOUT_S) -> Liveness:
    """Ask the probe for one round trip (its process must be scheduled and its kernel answer);
    a silent probe is a stopped guest, whatever QEMU's run state says."""
    t0 = time.monotonic()
    saved, probe.timeout = probe.timeout, timeout_s
    try:
        probe.locate(mapping.id, 0)
        answered, why = True, ""
    except (ProbeError, SshError) as exc:
        answered, why = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        probe.timeout = saved
    seconds = time.monotonic() - t0
    try:
        status = guest.machine.status()
    except QemuError as exc:
        status = f"no answer from QMP ({exc})"
    if answered:
        return Liveness(True, status, f"the probe answered in {seconds * 1000:.0f} ms", round(seconds, 3))
    events = [e.name for e in guest.machine.events if e.name in ("RESET", "GUEST_PANICKED", "SHUTDOWN", "STOP")]
    return Liveness(False, status, f"the probe did not answer within {timeout_s:.0f} s ({why}); QEMU's run state is "
                    f"{status!r}{'; QMP events: ' + ', '.join(events) if events else ', with no QMP event'}",
                    round(seconds, 3))


@dataclass
class PrivatePage:
    """The probe's page the row converts: where it lies and how it was picked."""

    mapping: Mapping
    offset: int  # of the page in the mapping
    gpa: int
    hva: int
    qemu_pid: int
    first: Conversion  # the accepted shared -> private conversion
    refusals: list[Conversion] = field(default_factory=list)  # pages QEMU refused first (loaded images)


def make_private(guest: GuestRun, probe: ProbeClient, mapping: Mapping, *,
                 confirm: Callable[[int, int], None] | None = None) -> PrivatePage:
    """Convert the mapping's page with the highest gpa that QEMU accepts; refusals that name a loaded
    image skip every page inside it. The probe must have mlocked the mapping. ``confirm(offset, gpa)``
    runs before each conversion (an interlock that raises to refuse the page). QEMU's conversion trace is
    switched on here and stays on."""
    trace_conversions(guest.machine)
    candidates = sorted(((page.gpa, i * PAGE_4K) for i, page in enumerate(mapping.pages)), reverse=True)
    refusals: list[Conversion] = []
    excluded: list[tuple[int, int]] = []
    for gpa, offset in candidates:
        if any(start <= gpa < start + size for start, size in excluded):
            continue
        located = probe.locate(mapping.id, offset)
        if located.gpa != gpa:
            raise ScenarioError(f"the probe's page at offset {offset:#x} moved from gpa {gpa:#x} to {located.gpa:#x} "
                                "although the mapping is mlocked")
        if confirm is not None:
            confirm(offset, gpa)
        hva = guest.machine.gpa2hva(gpa)
        done = convert(guest.machine, gpa, PAGE_4K, True)
        if done.ok:
            LOG.info("page at offset %#x of mapping %d, gpa %#x, made private in %.1f ms (%d refused first)",
                     offset, mapping.id, gpa, done.reply_ms, len(refusals))
            return PrivatePage(mapping, offset, gpa, hva, guest.machine.pid, done, refusals)
        refusals.append(done)
        image = refused_range(done.error or "")
        if image is None or len(refusals) >= MAX_REFUSALS:
            break
        excluded.append(image[1:])
    raise ScenarioError(f"QEMU converted none of the probe's pages: {'; '.join(r.describe() for r in refusals)}")


@dataclass(frozen=True)
class PageViews:
    """Every layer's view of the page after one step (a conversion, then the guest's fill)."""

    step: str
    conversion: Conversion
    kvm_changes: tuple[AttributeChange, ...]  # KVM's attribute changes during the step
    qemu_private: tuple[tuple[int, int], ...]  # QEMU's record after it
    guest_before_fill: str  # what the guest read of the page right after the conversion
    fill_seed: int
    guest_after_fill: str
    qemu_bytes: str  # QEMU's read of the gpa (pmemsave) after the fill
    hva_bytes: str  # the host kernel's: the memslot's hva in QEMU's address space
    alive: Liveness


def _guest_read(probe: ProbeClient, page: PrivatePage, seed: int) -> str:
    got = probe.check(page.mapping.id, page.offset, seed)
    if isinstance(got, SigbusReport):
        return f"SIGBUS si_code {got.si_code} at {got.si_addr:#x}"
    return got.describe()


def page_views(step: str, guest: GuestRun, probe: ProbeClient, page: PrivatePage, *, conversion: Conversion,
               kvm: AttributeTrace, previous_seed: int, fill_seed: int) -> PageViews:
    """Read every layer's view of ``page`` after ``conversion``: the guest reads it (against the seed
    written before), writes ``fill_seed`` and reads it back; QEMU and the host kernel read the gpa."""
    alive = check_alive(guest, probe, page.mapping)
    changes = tuple(kvm.new_changes())
    recorded = private_ranges(guest.machine)
    if not alive.alive:
        return PageViews(step, conversion, changes, recorded, "not read: the guest stopped answering", fill_seed,
                         "not read", "not read", "not read", alive)
    before = _guest_read(probe, page, previous_seed)
    probe.fill(page.mapping.id, page.offset, fill_seed)
    after = _guest_read(probe, page, fill_seed)
    seeds = (previous_seed, fill_seed)
    qemu_bytes = describe_bytes(guest.machine.read_physical(page.gpa, PAGE_4K), seeds)
    try:
        hva_bytes = describe_bytes(read_memory(page.qemu_pid, page.hva, PAGE_4K), seeds)
    except PagemapError as exc:
        hva_bytes = f"unreadable ({exc})"
    return PageViews(step, conversion, changes, recorded, before, fill_seed, after, qemu_bytes, hva_bytes, alive)


def share_all(guest: GuestRun) -> list[str]:
    """The end of a private row: every range QEMU records as private made shared again. A warning for
    each range QEMU would not convert, for what it still records after, or for why it could not be asked."""
    warnings: list[str] = []
    try:
        trace_conversions(guest.machine)  # a row's act may have switched QEMU's trace off
        for gpa, size in private_ranges(guest.machine):
            done = convert(guest.machine, gpa, size, False)
            if not done.ok:
                warnings.append(f"clean-up: {gpa:#x}+{size:#x} stays private: {done.error}")
        left = private_ranges(guest.machine)
    except QemuError as exc:
        return [*warnings, f"clean-up: QEMU could not be asked to make private memory shared again: {exc}"]
    if left:
        warnings.append("clean-up: QEMU still records private memory: " + ", ".join(f"{g:#x}+{s:#x}" for g, s in left))
    return warnings
