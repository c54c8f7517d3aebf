"""What a host must do when the frame behind a *private* guest_memfd gfn is poisoned (pure).

The seed's bug class, for private memory: the frame behind private gfn ``base_gfn + index -
pgoff`` of a slot with pgoff > 0 is poisoned (debugfs ``corrupt-pfn``, an action-optional
machine check on that frame) and the vCPU touches the gfn. No process maps a private page, so
nobody can be signalled: the only report is KVM's. The expectation:

- the frame is poisoned (``KPF_HWPOISON``, ``HardwareCorrupted`` grows);
- the vCPU's access ends ``KVM_RUN`` with -1/EHWPOISON and ``KVM_EXIT_MEMORY_FAULT``, gpa exactly
  the gfn's (not the file index: the v11 RFC's bug), size 4096, flags PRIVATE;
- no SIGBUS is delivered to the VM's process (SIGBUS witness) nor generated for its threads
  (``signal:signal_generate``);
- the VM still runs: every other gfn reads what it held (private ones the guest's pattern,
  shared ones their slot's decoy);
- clean-up (punch the page out of the guest_memfd, then unpoison) leaves no poison behind.

The poison matrix's private column (``judge_private_row``) runs this under each kill policy and
predicts each row under both of the matrix's documented contracts (``matrix_oracle``). Two
behaviours of the kernel are findings, with its release: an injection that answers EBUSY yet
poisons, and an unpoison refused until the page is punched out. The live run is
``host_stack.private_poison``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

from host_stack import gmem_layout as gl
from host_stack import kvm_uapi as u
from host_stack import mm_uapi as m
from host_stack.matrix_oracle import CONTRACT_BASIS, CONTRACT_FINDING_ID, CONTRACTS, EBUSY_FINDING_ID, Contract
from host_stack.vmm import anon_marker
from outcome import Check, Finding, Verdict

if TYPE_CHECKING:
    from host_stack.signal_trace import GeneratedSignal
    from host_stack.witness import SigbusRecord

__all__ = [
    "MADVISE_ROW",
    "PRIVATE_MATRIX_NAME",
    "PRIVATE_ROWS",
    "PRIVATE_SEED_NAME",
    "UNPOISON_FINDING_ID",
    "CleanupSteps",
    "PrivateExpectation",
    "PrivateObservation",
    "judge_private",
    "judge_private_matrix",
    "judge_private_row",
    "predict_private",
]

PRIVATE_SEED_NAME: Final = "private seed regression"
PRIVATE_MATRIX_NAME: Final = "poison matrix: private guest_memfd page"
PRIVATE_ROWS: Final = ("corrupt-pfn.early.private", "corrupt-pfn.late.private")
MADVISE_ROW: Final = "madvise.private"
MADVISE_NOT_MEANINGFUL: Final = (
    "MADV_HWPOISON poisons a page through the caller's own mapping, and a private guest_memfd page has none "
    "(a software-protected VM's guest_memfd has no MMAP flag, and KVM never maps a private page to userspace)")
UNPOISON_FINDING_ID: Final = "private-unpoison-needs-punch"


@dataclass(frozen=True)
class PrivateExpectation:
    """The oracle for poison at file ``index``: which gfn KVM must report, what the rest must read."""

    index: int
    gfn: int
    gpa: int
    buggy_gfn: int  # the v11 RFC's gfn = file index, for the failure message
    after: dict[int, int]  # every other gfn -> the value the guest must read after the touch

    @classmethod
    def from_layout(cls, layout: Sequence[gl.SlotLayout], index: int, private: Sequence[int],
                    pattern: Mapping[int, int]) -> PrivateExpectation:
        gfn = gl.gfn_for_index(layout, index)
        if gfn is None or gfn not in private:
            raise ValueError(f"file index {index} is behind no private gfn of {list(layout)} (private {private})")
        after: dict[int, int] = {}
        for s in layout:
            for g in range(s.base_gfn, s.gfn_end):
                if g != gfn:
                    after[g] = pattern[g] if g in private else anon_marker(s.gmem_pgoff + g - s.base_gfn)
        return cls(index=index, gfn=gfn, gpa=gfn << gl.PAGE_SHIFT, buggy_gfn=gl.seed_buggy_gfn(index), after=after)


@dataclass(frozen=True)
class CleanupSteps:
    """Clean-up as it went: errno of each unpoison-pfn write (0: accepted; None: not tried)."""

    unpoison_before_punch: int | None = None
    punch_errno: int | None = None
    unpoison_after_punch: int | None = None
    poisoned_after: bool | None = None  # KPF_HWPOISON once clean-up ended
    hardware_corrupted_kib: tuple[int | None, int | None] = (None, None)  # before the injection, after clean-up


@dataclass(frozen=True)
class PrivateObservation:
    """Everything one run recorded."""

    kill: str
    kill_get: int | None
    pfn: int  # the frame the interlock proved
    proof: str  # how (private_frames.prove_private_frame)
    injected_pfn: int | None  # the frame the injection wrote
    poisoned: bool | None  # KPF_HWPOISON right after the injection
    call_errno: int
    hardware_corrupted_kib: tuple[int | None, int | None]  # around the injection
    run_errno: int | None
    exit_reason: int | None
    memory_fault: dict[str, int] | None  # gpa, size, flags
    delivered: tuple[SigbusRecord, ...] = ()  # the witness, over the whole run
    generated: tuple[GeneratedSignal, ...] = ()  # signal_generate SIGBUS for the VM's threads
    after: dict[int, int] | None = None
    after_error: str | None = None
    cleanup: CleanupSteps = field(default_factory=CleanupSteps)


def _errno_name(err: int | None) -> str:
    if err is None:
        return "none"
    if err == u.EHWPOISON:
        return "EHWPOISON"  # Python's errno module does not know it
    return "0" if err == 0 else errno.errorcode.get(err, str(err))


def _hex_values(values: Mapping[int, int]) -> str:
    return ", ".join(f"{g:#x}={v:#x}" for g, v in sorted(values.items()))


def _exit_checks(exp: PrivateExpectation, obs: PrivateObservation) -> list[Check]:
    reason = "none" if obs.exit_reason is None else u.EXIT_REASON_NAMES.get(obs.exit_reason, str(obs.exit_reason))
    checks = [Check("vCPU access: KVM_RUN errno", f"EHWPOISON ({u.EHWPOISON})",
                    f"{_errno_name(obs.run_errno)} ({obs.run_errno})", obs.run_errno == u.EHWPOISON),
              Check("vCPU access: exit reason", f"KVM_EXIT_MEMORY_FAULT ({u.KVM_EXIT_MEMORY_FAULT})",
                    f"{reason} ({obs.exit_reason})", obs.exit_reason == u.KVM_EXIT_MEMORY_FAULT)]
    mf = obs.memory_fault
    if mf is None:
        return [*checks, Check("vCPU access: kvm_run.memory_fault", "gpa, size and flags recorded", "none", False)]
    hint = " (the v11 RFC's gfn = file index)" if mf["gpa"] >> gl.PAGE_SHIFT == exp.buggy_gfn else ""
    return [*checks,
            Check("vCPU access: memory_fault.gpa", f"{exp.gpa:#x} (gfn {exp.gfn:#x} = base_gfn + index {exp.index} "
                  "- pgoff)", f"{mf['gpa']:#x}{hint}", mf["gpa"] == exp.gpa),
            Check("vCPU access: memory_fault.size", f"{gl.PAGE_SIZE:#x}", f"{mf['size']:#x}",
                  mf["size"] == gl.PAGE_SIZE),
            Check("vCPU access: memory_fault.flags", f"PRIVATE ({u.KVM_MEMORY_EXIT_FLAG_PRIVATE:#x})",
                  f"{mf['flags']:#x}", mf["flags"] == u.KVM_MEMORY_EXIT_FLAG_PRIVATE)]


def _signal_checks(obs: PrivateObservation) -> list[Check]:
    delivered = ", ".join(f"{m.BUS_CODE_NAMES.get(s.si_code, s.si_code)} to thread {s.tid} at {s.si_addr:#x}"
                          for s in obs.delivered)
    generated = ", ".join(f"code {g.code} to thread {g.tid} ({g.result})" for g in obs.generated)
    return [Check("SIGBUS delivered to the VM's process (witness)", "none: no process maps a private page",
                  delivered or "none", not obs.delivered),
            Check("SIGBUS generated for the VM's threads (signal_generate)", "none", generated or "none",
                  not obs.generated)]


def _cleanup_checks(obs: PrivateObservation) -> list[Check]:
    steps = obs.cleanup
    before, after = steps.hardware_corrupted_kib
    checks = [Check(f"clean-up: KPF_HWPOISON on pfn {obs.pfn:#x} after punch and unpoison", "False",
                    str(steps.poisoned_after), steps.poisoned_after is False)]
    if before is not None and after is not None:
        checks.append(Check("clean-up: HardwareCorrupted back where it was (kB)", str(before), str(after),
                            after == before))
    return checks


def judge_private(name: str, exp: PrivateExpectation, obs: PrivateObservation) -> Verdict:
    """Pure: one run's checks and findings (the kernel's release in their text)."""
    injected = "none" if obs.injected_pfn is None else f"{obs.injected_pfn:#x}"
    checks = [Check(f"the poisoned frame is the one proven to back private gfn {exp.gfn:#x}",
                    f"{obs.pfn:#x} ({obs.proof})", injected, obs.injected_pfn == obs.pfn),
              Check(f"KPF_HWPOISON on pfn {obs.pfn:#x} after the injection", "True", str(obs.poisoned),
                    obs.poisoned is True)]
    hc_before, hc_after = obs.hardware_corrupted_kib
    if hc_before is not None and hc_after is not None:
        checks.append(Check("HardwareCorrupted growth at the injection (kB)", f">= {gl.PAGE_SIZE // 1024}",
                            f"{hc_after - hc_before:+d}", hc_after - hc_before >= gl.PAGE_SIZE // 1024))
    checks += _exit_checks(exp, obs)
    checks += _signal_checks(obs)
    after = "none" if obs.after is None else _hex_values(obs.after)
    checks.append(Check("the VM still runs: every other gfn reads what it held", _hex_values(exp.after),
                        obs.after_error or after, obs.after == exp.after))
    checks += _cleanup_checks(obs)
    return Verdict(name, tuple(checks), findings=tuple(_findings(name, obs)),
                   evidence={"expectation": asdict(exp), "observation": asdict(obs)})


def _findings(name: str, obs: PrivateObservation) -> list[Finding]:
    release = os.uname().release
    findings = []
    if obs.call_errno == errno.EBUSY and obs.poisoned:
        findings.append(Finding(
            id=EBUSY_FINDING_ID, severity="divergence",
            text=(f"corrupt-pfn on a private guest_memfd frame returned EBUSY although the frame is poisoned "
                  "(KPF_HWPOISON set): memory_failure reports guest_memfd's MF_DELAYED as a failure; "
                  f"kernel {release}"),
            evidence={"rows": [name], "pfn": obs.pfn}))
    steps = obs.cleanup
    if steps.unpoison_before_punch not in (None, 0) and steps.unpoison_after_punch == 0:
        findings.append(Finding(
            id=UNPOISON_FINDING_ID, severity="info",
            text=(f"unpoison-pfn of a poisoned private guest_memfd frame answers "
                  f"{_errno_name(steps.unpoison_before_punch)} while the page is in guest_memfd's page cache; "
                  f"after a punch hole it succeeds; kernel {release}"),
            evidence={"pfn": obs.pfn, "steps": asdict(steps)}))
    return findings


def predict_private(contract: Contract) -> str:
    """Pure: what ``contract`` says a private-page row sees (no process maps the page, under either)."""
    why = ("MF_DELAYED: nobody is signalled at injection" if contract == "delayed"
           else "no process maps a private page, so there is no mapper to kill")
    return (f"{contract}: no signal at injection, no SIGBUS on the vCPU access, KVM_RUN -1/EHWPOISON with "
            f"KVM_EXIT_MEMORY_FAULT flags PRIVATE at the gfn's gpa ({why})")


def judge_private_row(row: str, exp: PrivateExpectation, obs: PrivateObservation,
                      setup: Sequence[Check] = ()) -> Verdict:
    """Pure: a row of the private column; ``evidence["matches"]`` are the contracts it matched
    (both predict the same, so a row that matches one matches both)."""
    judged = judge_private(row, exp, obs)
    signals_ok = not obs.delivered and not obs.generated
    exit_ok = all(c.ok for c in judged.checks if c.name.startswith("vCPU access"))
    matches: list[Contract] = list(CONTRACTS) if signals_ok and exit_ok else []
    return Verdict(row, (*setup, *judged.checks), findings=judged.findings, evidence={
        **judged.evidence, "matches": matches, "predictions": {c: predict_private(c) for c in CONTRACTS},
        "table": _table_line(row, "PASS" if all(c.ok for c in (*setup, *judged.checks)) else "FAIL", obs, matches)})


def _table_line(row: str, status: str, obs: PrivateObservation, matches: Sequence[Contract]) -> dict[str, Any]:
    mf = obs.memory_fault
    return {"row": row, "status": status, "injection": [], "call_errno": _errno_name(obs.call_errno),
            "kpf_hwpoison": obs.poisoned, "kvm_run": _errno_name(obs.run_errno),
            "exit": None if obs.exit_reason is None else u.EXIT_REASON_NAMES.get(obs.exit_reason, obs.exit_reason),
            "memory_fault": None if mf is None else {"gpa": hex(mf["gpa"]), "size": mf["size"], "flags": mf["flags"]},
            "sigbus": len(obs.delivered) + len(obs.generated), "matches": list(matches)}


def judge_private_matrix(rows: Sequence[Verdict]) -> Verdict:
    """Pure: the live rows plus the MADV_HWPOISON row, NOT MEANINGFUL with its reason; the contract
    the rows are consistent with is a finding (the private column cannot tell the two apart)."""
    madvise = Verdict.did_not_run(MADVISE_ROW, "NOT MEANINGFUL", MADVISE_NOT_MEANINGFUL)
    judged = [r for r in rows if r.passed and r.evidence.get("matches")]
    findings = []
    if judged and len(judged) == len(rows):
        findings.append(Finding(
            id=CONTRACT_FINDING_ID + "-private", severity="info",
            text=(f"A poisoned private guest_memfd page is consistent with every documented contract "
                  f"({', '.join(CONTRACTS)}): no process maps it, so only KVM reports it; {len(judged)} rows judged, "
                  f"kernel {os.uname().release}"),
            evidence={"basis": dict(CONTRACT_BASIS), "table": [r.evidence.get("table") for r in rows]}))
    table = [r.evidence.get("table") or {"row": r.scenario, "status": r.status} for r in rows]
    table.append({"row": MADVISE_ROW, "status": madvise.status, "reason": MADVISE_NOT_MEANINGFUL})
    for kept in _once_each([f for r in rows for f in r.findings], rows):
        findings.append(kept)
    bare = [replace(r, findings=()) for r in rows]
    return Verdict.combine(PRIVATE_MATRIX_NAME, [*bare, madvise], findings=tuple(findings),
                           evidence={"contract": "/".join(CONTRACTS) if judged and len(judged) == len(rows) else None,
                                     "table": table})


def _once_each(findings: Sequence[Finding], rows: Sequence[Verdict]) -> list[Finding]:
    """The rows' findings, one per id, naming every row that found it."""
    by_id: dict[str, Finding] = {}
    for f in findings:
        by_id.setdefault(f.id, f)
    found_in = {fid: [r.scenario for r in rows if any(f.id == fid for f in r.findings)] for fid in by_id}
    return [replace(f, evidence={**f.evidence, "rows": found_in[f.id]}) for f in by_id.values()]
