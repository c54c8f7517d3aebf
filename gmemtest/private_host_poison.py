"""The host poisons the guest_memfd frame behind a page the guest has made private through QMP.

A private page has no user mapping, so the shared rows' way to the frame (gpa -> hva -> QEMU's
pagemap) leads to the shared side, not to the page the guest uses. KVM names the frame instead:
``kvmmmu:kvm_mmu_spte_requested`` for the guest's first access after the conversion, which is when
guest_memfd allocates the page (``private_frames.prove_private_frame`` with one round: QEMU's
conversions discard the page, so there is no zap that keeps it). Only then is it poisoned
(``corrupt-pfn``), and the program touches the page. Each layer in its own check:

- the host kernel: the frame is poisoned; KVM's fault for exactly the page's gfn ends in
  ``kvm_gmem_get_pfn`` = -EHWPOISON and KVM_RUN fails with EHWPOISON (``gmem_fault_trace``), and no
  SIGBUS is generated for any QEMU thread (KVM returns the error instead of signalling);
- QEMU: what it did, with its version. Stock QEMU stops the VM (``internal-error``) after "kvm run
  failed Memory page has hardware error", with no MEMORY_FAILURE event and no machine check for the
  guest: a PASS that carries the finding;
- the guest: nothing reaches it before it is stopped (no SIGBUS, no panic).

Clean-up: QEMU is stopped (the page stays in guest_memfd's page cache until the file is released),
then the frame is unpoisoned; a frame left poisoned is a warning naming it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from gmemtest.conversion_oracle import step_checks
from gmemtest.errors import ScenarioError
from gmemtest.evidence import Evidence
from gmemtest.guest_run import GuestRun
from gmemtest.oracle import AMD
from gmemtest.private_page import PageViews, PrivatePage, make_private, page_views
from gmemtest.scenarios import ScenarioSpec
from guests.probe_client import PAGE_4K, ProbeClient, ProbeError, SigbusReport
from guests.ssh import SshError
from host_stack import mm_uapi
from host_stack.attribute_trace import AttributeTrace
from host_stack.gmem_fault_trace import GmemFaultTrace
from host_stack.gmem_layout import PAGE_SHIFT
from host_stack.injectors import CorruptPfnInjector, InjectionRecord
from host_stack.kernelfs import DEBUGFS, mounted
from host_stack.kvm_uapi import EHWPOISON, KVM_MEMORY_EXIT_FLAG_PRIVATE
from host_stack.pagemap import hardware_corrupted_kib, read_kpageflags
from host_stack.private_frames import PrivateFrame, SpteTrace, check_private_flags, prove_private_frame
from host_stack.private_poison import release_frame
from host_stack.signal_trace import SignalTrace, threads_of
from outcome import Check, Finding, Verdict
from qmp_helpers import QemuError, QmpEvent
from qmp_helpers.conversions import MEMORY_FAULT_TRACE_EVENT, MemoryFaultExit, parse_memory_fault_trace
from qmp_helpers.mce import forwarded_mce, parse_forwarded_lines

__all__ = ["QEMU_STOPS_FINDING", "run_private_host_poison"]

LOG = logging.getLogger(__name__)

FILL_SEED: Final = 0x5A
QEMU_STOPS_FINDING: Final = "qemu-stops-the-vm-on-a-poisoned-private-page"
# QEMU's words when KVM_RUN fails with EHWPOISON (accel/kvm/kvm-all.c, kvm_cpu_exec: strerror(133)).
QEMU_RUN_FAILED: Final = "kvm run failed Memory page has hardware error"
# How long the touch may take before the row looks at what stopped it.
TOUCH_WAIT_S: Final = 15.0


def _qemu_version(guest: GuestRun) -> str:
    version = guest.machine.qmp("query-version")
    q = version["qemu"]
    return f"{q['major']}.{q['minor']}.{q['micro']} ({str(version.get('package', '')).strip()})"


def _touch(probe: ProbeClient, mapping_id: int, offset: int) -> SigbusReport | str:
    """The program's touch of the poisoned page: its SIGBUS, or what else came back, or why nothing did."""
    saved, probe.timeout = probe.timeout, TOUCH_WAIT_S
    try:
        got = probe.touch(mapping_id, offset)
    except (ProbeError, SshError) as exc:
        return f"no reply ({type(exc).__name__})"
    finally:
        probe.timeout = saved
    return got if isinstance(got, SigbusReport) else f"read {got.value:#x}"


def _describe(touched: SigbusReport | str) -> str:
    if isinstance(touched, str):
        return touched
    return (f"SIGBUS {mm_uapi.BUS_CODE_NAMES.get(touched.si_code, touched.si_code)} at {touched.si_addr:#x} "
            f"lsb {touched.si_addr_lsb}")


def _qemu_and_guest_checks(spec: ScenarioSpec, *, status: str, stderr: str, events: list[QmpEvent],
                           touched: SigbusReport | str, page_va: int, gpa: int, amd: bool) -> list[Check]:
    """What QEMU did and what the guest saw: stock QEMU stops the VM; with x-private-hwpoison-mce it injects
    an SRAR at the gpa (as for a shared page: qmp_helpers.mce.forwarded_mce) and the guest recovers."""
    names = [e.name for e in events]
    faults = parse_memory_fault_trace(stderr)
    checks = [Check("KVM's memory-fault exit, as QEMU read it (kvm_memory_fault)",
                    MemoryFaultExit(gpa, PAGE_4K, KVM_MEMORY_EXIT_FLAG_PRIVATE).describe() + " (PRIVATE)",
                    "; ".join(f.describe() for f in faults) or "no line",
                    MemoryFaultExit(gpa, PAGE_4K, KVM_MEMORY_EXIT_FLAG_PRIVATE) in faults, "qemu")]
    if not spec.qemu_private_hwpoison_mce:
        return [*checks,
                Check("what QEMU did (its run state and its words)",
                      f"stopped in 'internal-error' after {QEMU_RUN_FAILED!r}",
                      f"{status!r}; QMP events {names or 'none'}; stderr {stderr.strip()[:160]!r}",
                      status == "internal-error" and QEMU_RUN_FAILED in stderr and "MEMORY_FAILURE" not in names,
                      "qemu"),
                Check("what the guest saw", "nothing: its vCPU was stopped at the access (no reply, no SIGBUS, "
                      "no panic)", f"the touch: {_describe(touched)}; QMP events {names or 'none'}",
                      isinstance(touched, str) and touched.startswith("no reply") and "GUEST_PANICKED" not in names,
                      "guest")]
    want = forwarded_mce("BUS_MCEERR_AR", amd=amd)
    failures = [e.data for e in events if e.name == "MEMORY_FAILURE"]
    expected_event = {"recipient": "guest", "action": "inject",
                      "flags": {"action-required": want.action_required, "recursive": False}}
    forwarded = [(f.code, f.gpa) for f in parse_forwarded_lines(stderr)]
    sigbus_ok = (isinstance(touched, SigbusReport) and touched.si_code == mm_uapi.BUS_MCEERR_AR
                 and touched.si_addr == page_va and touched.si_addr_lsb == PAGE_SHIFT)
    return [*checks,
            Check("what QEMU did (x-private-hwpoison-mce=on)", f"BUS_MCEERR_AR injected at gpa {gpa:#x}, VM running",
                  f"{forwarded or 'no injection line'}; run state {status!r}",
                  ("BUS_MCEERR_AR", gpa) in forwarded and status == "running", "qemu"),
            Check("MEMORY_FAILURE event", json.dumps(expected_event, sort_keys=True),
                  json.dumps(failures, sort_keys=True) or "none", failures == [expected_event], "qemu"),
            Check("the program's SIGBUS", f"BUS_MCEERR_AR at {page_va:#x} lsb {PAGE_SHIFT}", _describe(touched),
                  sigbus_ok, "guest"),
            Check("the guest went on", "no GUEST_PANICKED", f"QMP events {names or 'none'}",
                  "GUEST_PANICKED" not in names, "guest")]


def _finding(version: str, gpa: int, stderr: str, status: str) -> Finding:
    first = next((line for line in stderr.splitlines() if QEMU_RUN_FAILED in line), QEMU_RUN_FAILED)
    return Finding(QEMU_STOPS_FINDING, "divergence",
                   f"QEMU {version}: KVM_RUN failed with EHWPOISON and a KVM_EXIT_MEMORY_FAULT for private gpa "
                   f"{gpa:#x} (the guest touched a page whose guest_memfd frame is poisoned). QEMU printed {first!r}, "
                   f"dumped the registers and stopped the VM ({status!r}): no MEMORY_FAILURE event, no machine check "
                   "for the guest, which could have recovered the page as it does a shared one. kvm_cpu_exec() "
                   "treats KVM_EXIT_MEMORY_FAULT only with EFAULT (a conversion request); with EHWPOISON "
                   "run->memory_fault.gpa/size/flags are valid too, and an SRAR at that gpa (as "
                   "kvm_arch_on_sigbus_vcpu() injects for a poisoned shared page) would let the guest go on; "
                   "the project's series keeps this default and offers -accel kvm,x-private-hwpoison-mce=on, "
                   "which does that (row private-host-poison-mce-4k).",
                   {"gpa": gpa, "qemu": version, "run_state": status})


def _release(guest: GuestRun, record: InjectionRecord, debugfs: Path) -> str:
    """Stop QEMU (releasing its guest_memfd), then unpoison the frame; a warning if it stays poisoned."""
    guest.machine.shutdown()
    released = release_frame(record, debugfs)
    LOG.info("clean-up of pfn %#x: %s", record.pfn or 0, released.cleanup)
    return f"clean-up: {released.cleanup}" if released.cleanup_failed else ""


def _private_frame(spec: ScenarioSpec, guest: GuestRun, probe: ProbeClient, page: PrivatePage, *,
                   kvm: AttributeTrace, spte: SpteTrace, vcpu_tid: int) -> tuple[PageViews, PrivateFrame]:
    """Every layer's view of the page just made private, the guest's first access to it among them, and the
    frame KVM mapped for it on that access, proven (``prove_private_frame``, one round)."""
    spte.take()  # faults before the conversion are another page's business
    views = page_views("made private", guest, probe, page, conversion=page.first, kvm=kvm,
                       previous_seed=FILL_SEED ^ 0xFF, fill_seed=FILL_SEED)
    gfn = page.gpa >> 12
    requests = spte.take()
    pfn = next((r.pfn for r in requests if r.gfn == gfn), None)
    if pfn is None:
        raise ScenarioError(f"{spec.name}: KVM traced no fault for private gfn {gfn:#x} on the guest's access "
                            f"after the conversion ({len(requests)} other faults): no frame to poison")
    written = FILL_SEED if views.guest_after_fill == f"the fill of seed {FILL_SEED}" else 0
    return views, prove_private_frame(gfn, 0, vcpu_tid, rounds=[requests], read_back={gfn: (FILL_SEED, written)},
                                      flags=read_kpageflags(pfn), min_rounds=1)


def run_private_host_poison(spec: ScenarioSpec, guest: GuestRun, probe: ProbeClient, ev: Evidence,
                            setup: dict[str, Any]) -> Verdict:
    """Carry out a private host-poison row on ``guest`` (kvm-swprot, inside a host with memory failure)."""
    machine = guest.machine
    vcpu_tid = int(machine.qmp("query-cpus-fast")[0]["thread-id"])
    version = _qemu_version(guest)
    warnings: list[str] = []
    with contextlib.ExitStack() as stack:
        debugfs = stack.enter_context(mounted(DEBUGFS))
        injector = CorruptPfnInjector(debugfs)
        injector.require()
        assert debugfs is not None  # require() refuses a missing debugfs
        kvm = stack.enter_context(AttributeTrace())
        faults = stack.enter_context(GmemFaultTrace(vcpu_tid))
        signals = stack.enter_context(SignalTrace(mm_uapi.SIGBUS))
        spte = stack.enter_context(SpteTrace(vcpu_tid))
        mapping = probe.map(spec.page_kind, spec.npages)
        probe.lock(mapping.id)
        page = make_private(guest, probe, mapping)
        views, frame = _private_frame(spec, guest, probe, page, kvm=kvm, spte=spte, vcpu_tid=vcpu_tid)
        gfn = frame.gfn
        ev.json("private-frame.json", asdict(frame))
        hc_before = hardware_corrupted_kib()
        record = injector.inject_private(frame.pfn, pid=machine.pid, gpa=page.gpa,
                                         recheck=lambda: check_private_flags(read_kpageflags(frame.pfn)))
        try:
            machine.trace_event_set_state(MEMORY_FAULT_TRACE_EVENT, True)
            mark, event_mark = machine.stderr_mark(), machine.event_mark()
            touched = _touch(probe, mapping.id, page.offset + (spec.touch_offset or 0) % PAGE_4K)
            if spec.qemu_private_hwpoison_mce:  # the MEMORY_FAILURE QEMU emits when it injects
                with contextlib.suppress(QemuError):
                    machine.wait_event("MEMORY_FAILURE", timeout=5.0, since=event_mark)
            status = machine.status()
            stderr = machine.stderr_since(mark)
            events = machine.events[event_mark:]
            poisoned = read_kpageflags(frame.pfn).hwpoison
            hc_after = hardware_corrupted_kib()
            gmem = [f for f in faults.faults() if f.gfn == gfn]
            returns = faults.run_returns()
            tids = threads_of(machine.pid)
            generated = [g for g in signals.records() if g.tid in tids]
            ev.text("gmem-faults.trace", faults.text())
            ev.text("qemu-after-touch.txt", stderr)
        finally:
            if cleanup := _release(guest, record, debugfs):
                warnings.append(cleanup)
    checks = [
        *step_checks(page.gpa, views),
        Check("the frame behind the private gfn (KVM's own fault trace)", f"proven for gfn {gfn:#x}", frame.proof,
              True, "host"),
        Check(f"pfn {frame.pfn:#x} poisoned (KPF_HWPOISON)", "True", str(poisoned), poisoned, "host"),
        Check("HardwareCorrupted delta (kB)", "4", str((hc_after or 0) - (hc_before or 0)),
              hc_before is not None and hc_after is not None and hc_after - hc_before == 4, "host"),
        Check(f"KVM's fault for gfn {gfn:#x} (kvm_gmem_get_pfn)", "-EHWPOISON, for exactly that gfn",
              "; ".join(f.describe() for f in gmem) or "no call for that gfn",
              any(f.ret == -EHWPOISON for f in gmem), "host"),
        Check("KVM_RUN's return to QEMU (kvm_userspace_exit)", "failed with EHWPOISON",
              "; ".join(r.describe() for r in ([r for r in returns if r.what == "error"] or returns[-3:])) or "none",
              any(r.what == "error" and r.number == EHWPOISON for r in returns), "host"),
        Check("SIGBUS generated for QEMU's threads (signal_generate)", "none: KVM returns the error instead",
              "; ".join(f"si_code {g.code} to thread {g.tid}" for g in generated) or "none", not generated, "host"),
        *_qemu_and_guest_checks(spec, status=status, stderr=stderr, events=events, touched=touched,
                                page_va=mapping.va + page.offset, gpa=page.gpa,
                                amd=setup.get("guest_cpu_vendor") == AMD),
    ]
    findings = () if spec.qemu_private_hwpoison_mce else (_finding(version, page.gpa, stderr, status),)
    return Verdict(spec.name, tuple(checks), setup=setup, findings=findings,
                   warnings=tuple(warnings),
                   evidence={"gpa": page.gpa, "gfn": gfn, "pfn": frame.pfn, "qemu": version,
                             "injection": asdict(record), "frame": "private-frame.json"})
