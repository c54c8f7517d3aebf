"""Compare observations with the oracle's expectation, one named check per observable.

The verdict is ``outcome.Verdict``: a list of checks, each carrying expected and actual, so a
failure message reads like the kernel selftests': what should have been there and what was.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import replace
from typing import Any, Final

from gmemtest.observations import HostObservations, Observations
from gmemtest.oracle import SI_CODE_NAMES, Expectation, HostExpectation
from host_stack.gmem_layout import PAGE_SHIFT
from outcome import Check, Finding, Verdict


def _code(code: int | None) -> str:
    if code is None:
        return "none"
    return f"{code} ({SI_CODE_NAMES.get(code, '?')})"


def _hex(value: int | None) -> str:
    return "none" if value is None else f"{value:#x}"


def _check(name: str, expected: Any, actual: Any, *, fmt: Any = str, layer: str = "") -> Check:
    return Check(name, fmt(expected), fmt(actual), expected == actual, layer)


def _layered(checks: list[Check], layer: str) -> list[Check]:
    return [replace(c, layer=layer) for c in checks]


def judge(exp: Expectation, obs: Observations, host: tuple[HostExpectation, HostObservations] | None = None,
          ) -> Verdict:
    """One named check per observable. With ``host`` (a host-poison row) every check names its
    layer, and the host and QEMU layers come first: the chain is read in the order it ran."""
    guest = _judge_guest(exp, obs)
    if host is None:
        return Verdict(exp.scenario, tuple(guest))
    qemu_events = [c for c in guest if c.name == "MEMORY_FAILURE events"]
    rest = [c for c in guest if c.name != "MEMORY_FAILURE events"]
    return Verdict(exp.scenario, (*judge_host(*host), *_layered(qemu_events, "qemu"), *_layered(rest, "guest")),
                   findings=tuple(host_findings(*host)))


def _sigbus_line(code: int, addr: int, lsb: int, thread: str | None) -> str:
    return f"{_code(code)} at {addr:#x} lsb {lsb} to the {thread} thread"


def judge_host(hexp: HostExpectation, hobs: HostObservations) -> list[Check]:
    """The host kernel's and QEMU's part of the chain, against the layout-derived expectation."""
    frame = hexp.frame
    want = "guest_memfd" if hexp.ram_guest_memfd else "userspace memory"
    backing = hobs.ram_backing
    checks = [
        Check(f"KVM serves gpa {frame.gpa:#x} from (memslot QEMU registered, QEMU's fd table)",
              f"{want} (the profile's RAM)", "not read" if backing is None else backing.summary(),
              backing is not None and backing.kind() == want, "host"),
        _check(f"KPF_HWPOISON on host pfn {frame.pfn:#x}", True, hobs.hwpoison_flag, layer="host"),
        _check("host HardwareCorrupted delta (kB)", hexp.host_hardware_corrupted_delta_kb,
               None if hobs.hardware_corrupted_before_kb is None or hobs.hardware_corrupted_after_kb is None
               else hobs.hardware_corrupted_after_kb - hobs.hardware_corrupted_before_kb, layer="host"),
        _recovery_check(hexp, hobs),
        _check("SIGBUS generated for QEMU (signal_generate: code, thread)",
               [f"{_code(s.si_code)} to the {s.thread} thread" for s in hexp.qemu_sigbus],
               [f"{_code(g.code)} to the {hobs.thread_role(g.tid)} thread" for g in hobs.generated],
               fmt=lambda v: "[" + "; ".join(v) + "]", layer="host"),
        _check("SIGBUS sent to QEMU (kprobes on force/send_sig_mceerr: code, si_addr, si_addr_lsb, thread)",
               [_sigbus_line(s.si_code, s.si_addr, s.si_addr_lsb, s.thread) for s in hexp.qemu_sigbus],
               [_sigbus_line(r.si_code, r.si_addr, r.si_addr_lsb, hobs.thread_role(r.tid)) for r in hobs.sent],
               fmt=lambda v: "[" + "; ".join(v) + "]", layer="host"),
        _check("SIGBUS delivered to a QEMU handler (witness siginfo)",
               [_sigbus_line(s.si_code, s.si_addr, s.si_addr_lsb, s.thread) for s in hexp.qemu_sigbus if s.delivered],
               [_sigbus_line(r.si_code, r.si_addr, r.si_addr_lsb, hobs.thread_role(r.tid)) for r in hobs.qemu_sigbus],
               fmt=lambda v: "[" + "; ".join(v) + "]", layer="host"),
        _check("QEMU forwarded (stderr: code, hva, gpa)",
               [(c, hex(h), hex(g)) for c, h, g in hexp.forwarded],
               [(c, hex(h), hex(g)) for c, h, g in hobs.forwarded], layer="qemu"),
        _check("host poison cleaned up (unpoison-pfn)", "cleaned", "failed: " + hobs.cleanup
               if hobs.cleanup_failed else "cleaned", layer="host"),
    ]
    if hexp.reset:
        now = hobs.pfn_after_reset
        replaced = now is not None and now != frame.pfn and hobs.hwpoison_after_reset is False
        checks.append(Check("frame behind the hva after system_reset", f"a healthy frame other than {frame.pfn:#x}",
                            "a healthy frame other than " + hex(frame.pfn) if replaced else
                            f"pfn {'none' if now is None else hex(now)}"
                            f"{' KPF_HWPOISON' if hobs.hwpoison_after_reset else ''}", replaced, "qemu"))
        checks.append(_check(f"rebooted guest's kernel reads gpa {frame.gpa:#x} (/proc/kcore)", "read",
                             hobs.guest_read_after_reset, layer="guest"))
    return checks


def _recovery_check(hexp: HostExpectation, hobs: HostObservations) -> Check:
    """One "Memory failure" line for the frame, with a result the RAM's kind allows."""
    pfn, accepted = hexp.host_recovery
    seen = [(hex(r.pfn), r.result) for r in hobs.recovery_lines]
    ok = len(seen) == 1 and seen[0][0] == hex(pfn) and seen[0][1] in accepted
    return Check("host kernel recovery line (pfn, result)", f"[('{pfn:#x}', {' or '.join(map(repr, accepted))})]",
                 str(seen), ok, "host")


GMEM_DELAYED_FINDING: Final = "gmem-memory-failure-counts-delayed-as-failed"
QEMU_LSB_FINDING: Final = "qemu-forwards-4k-of-a-larger-poisoned-page"


def host_findings(hexp: HostExpectation, hobs: HostObservations) -> list[Finding]:
    """What the host stack did that is understood but differs from the design, with the versions."""
    release = os.uname().release
    findings = []
    failed = [r for r in hobs.recovery_lines if r.pfn == hexp.frame.pfn and r.result == "Failed"]
    if hexp.ram_guest_memfd and failed:
        errno_name = errno.errorcode.get(hobs.injection_errno, str(hobs.injection_errno))
        findings.append(Finding(GMEM_DELAYED_FINDING, "divergence", (
            f"Memory failure of a guest_memfd page of QEMU's RAM ends 'Failed' (kernel {release}): "
            "kvm_gmem_error_folio keeps the folio and returns MF_DELAYED, which truncate_error_folio counts as a "
            f"failure (\"Failed to punch page\"); corrupt-pfn answered {errno_name} although the frame is "
            "poisoned. The mappers were signalled as for any file page, and the page stays in guest_memfd's "
            "page cache until it is punched out or the file is released"),
            {"pfn": hex(hexp.frame.pfn), "injection_errno": errno_name}))
    forwarded = {h for _c, h, _g in hobs.forwarded}
    for sent in hobs.sent:
        if sent.si_addr_lsb > PAGE_SHIFT and sent.si_addr in forwarded:
            findings.append(Finding(QEMU_LSB_FINDING, "divergence", (
                f"QEMU {hobs.qemu_version or '(version not read)'} received {_code(sent.si_code)} for hva "
                f"{sent.si_addr:#x} with si_addr_lsb {sent.si_addr_lsb} ({1 << (sent.si_addr_lsb - 10)} KiB lost "
                "on the host) and forwarded one machine check for one 4 KiB guest page: kvm_on_sigbus*() and "
                "kvm_arch_on_sigbus_vcpu() take only si_addr, so the guest never learns of the rest of the "
                f"{1 << (sent.si_addr_lsb - 10)} KiB (host kernel {release})"),
                {"hva": hex(sent.si_addr), "lsb": sent.si_addr_lsb, "code": sent.si_code}))
            break
    return findings


def _judge_guest(exp: Expectation, obs: Observations) -> list[Check]:
    checks: list[Check] = []

    # 1. The program's own view: exactly the oracle's SIGBUS (one per touched page), or none.
    expected_sigbus = exp.sigbus_all
    checks.append(_check("sigbus count", len(expected_sigbus), len(obs.sigbus)))
    for i, want in enumerate(expected_sigbus):
        got = obs.sigbus[i] if i < len(obs.sigbus) else None
        which = "" if i == 0 else f" of SIGBUS {i + 1}"
        checks.append(_check(f"si_code{which}", want.si_code, got.si_code if got else None, fmt=_code))
        checks.append(_check(f"si_addr{which}", want.si_addr, got.si_addr if got else None, fmt=_hex))
        checks.append(_check(f"si_addr_lsb{which}", want.si_addr_lsb, got.si_addr_lsb if got else None))

    # 2. QEMU's view: one MEMORY_FAILURE per vCPU that received the MCE, with the right flags.
    expected_events = [
        {"recipient": e.recipient, "action": e.action,
         "flags": {"action-required": e.action_required, "recursive": e.recursive}}
        for e in exp.memory_failure_events
    ]
    checks.append(_check("MEMORY_FAILURE events", expected_events, obs.memory_failure_events,
                         fmt=lambda v: json.dumps(v, sort_keys=True)))

    # 3. The guest kernel's record of the machine check: bank status and the exact address.
    # A broadcast also raises a bank-1 record without an address on the other vCPUs: look at ours.
    records = [(r.status, r.addr) for r in obs.mce_records if r.bank == exp.mce_bank]
    expected_records = list(exp.expected_records)
    checks.append(_check(f"mce_record of bank {exp.mce_bank} (status, addr)", expected_records,
                         records,
                         fmt=lambda v: "[" + ", ".join(f"({s:#x}, {a:#x})" for s, a in v) + "]"))

    # 4. Panic or survival.
    checks.append(_check("guest panicked (GUEST_PANICKED)", exp.panic, bool(obs.guest_panicked_events)))
    if exp.panic_reason is not None:
        checks.append(_check("panic message on the serial console", exp.panic_reason, obs.panic_message, fmt=repr))
    elif obs.panic_message is not None:  # an unexpected panic: its text is the first thing to read
        checks.append(_check("panic message on the serial console", None, obs.panic_message, fmt=repr))
    if exp.panic_severity is not None:
        checks.append(_check("MCE severity on the serial console", exp.panic_severity, obs.mce_severity, fmt=repr))

    # 5. The guest kernel's account of the recovery.
    if exp.recovery_pfn is not None and exp.recovery_page_type is not None:
        typed = [(hex(r.pfn), r.page_type, r.result) for r in obs.recovery_lines]
        checks.append(_check("dmesg recovery line (pfn, page type, result)",
                             [(hex(pfn), exp.recovery_page_type, "Recovered") for pfn in exp.poison_pfns], typed))
    elif exp.recovery_pfn is not None:
        lines = [(hex(r.pfn), r.result) for r in obs.recovery_lines]
        checks.append(_check("dmesg recovery line (pfn, result)",
                             [(hex(pfn), "Recovered") for pfn in exp.poison_pfns], lines))
    if exp.hardware_corrupted_delta_kb is not None:
        before, after = obs.hardware_corrupted_before_kb, obs.hardware_corrupted_after_kb
        delta = None if before is None or after is None else after - before
        checks.append(_check("HardwareCorrupted delta (kB)", exp.hardware_corrupted_delta_kb, delta))
    if exp.hwpoison_pfn is not None:
        pfns = ", ".join(f"{pfn:#x}" for pfn in exp.poison_pfns)
        checks.append(_check(f"KPF_HWPOISON on pfn {pfns}", True, obs.hwpoison_flag))
    # QEMU's KVM trace over the injection window (KVM guests): conversions are a fact to record.
    if obs.conversions is not None and exp.conversions is not None:
        checks.append(_check("private/shared conversions (kvm_convert_memory)", list(exp.conversions) or "none",
                             obs.conversions or "none", fmt=str, layer="qemu"))
    # 6. What was not poisoned is not lost: a split THP keeps its other pieces, with their data.
    if exp.intact_offsets:
        bad = obs.intact_mismatches
        checks.append(_check(f"the other {len(exp.intact_offsets)} 4 KiB pieces read their pattern",
                             "all intact", "all intact" if not bad and obs.intact_checked == len(exp.intact_offsets)
                             else f"{obs.intact_checked} read, {len(bad)} wrong: {'; '.join(bad[:3])}"))
    return checks
