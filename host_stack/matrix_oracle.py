"""The poison matrix's rows, contracts and judge (pure): who must get a SIGBUS when a shared gmem page is poisoned.

A guest_memfd created with MMAP|INIT_SHARED is a file: userspace may map it, and it also backs
a memslot. When one of its pages is poisoned, whether a process gets a SIGBUS (and which) has
depended, since the 2026 mm discussion of ``MF_DELAYED``, on four things: the injector
(``MADV_HWPOISON``, action-required-like, or debugfs ``hwpoison/corrupt-pfn``, action-optional
like), the kill policy of the process that maps the page (``prctl(PR_MCE_KILL_EARLY/LATE)``),
whether the process maps the page at all, and whether the page is dirty. The rows below are
those variants as data, in the manner of the kernel's ``selftests/mm/memory-failure.c``.

Two documented contracts say what must happen at injection (both agree on the touches):

- ``kill_mappers``: mm/memory-failure.c's rules for a file page (Documentation/admin-guide/
  sysctl/vm.rst ``memory_failure_early_kill``, prctl(2) ``PR_MCE_KILL``): a page that cannot
  be reloaded (dirty) is unmapped and its mappers are killed; the injecting process of an
  action-required injection (MADV_HWPOISON) is always among them and gets BUS_MCEERR_AR during
  the call, other mappers only with early kill, with BUS_MCEERR_AO; a clean page is only
  unmapped. Signals name the mapper's own hva with ``si_addr_lsb`` 12.
- ``delayed``: guest_memfd takes the error over (``MF_DELAYED``): no process gets a signal at
  injection; the page stays poisoned in the file, so every later access faults.

Every contract also requires the frame poisoned and the vCPU's memory-fault exit at the seed
oracle's gpa (``host_stack.seed_oracle``). The verdict names the contract every row matched,
as a finding with the observed table as evidence; a row that matches neither is a failure.
The live run is ``host_stack.poison_matrix``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Literal

from host_stack import gmem_layout as gl
from host_stack import kvm_uapi as u
from host_stack import mm_uapi as m
from host_stack.seed_oracle import GuestAccessObservation, SeedExpectation, judge_guest_access
from outcome import Check, Finding, Verdict

if TYPE_CHECKING:
    from host_stack.witness import SigbusRecord

__all__ = [
    "CONTRACTS",
    "CONTRACT_BASIS",
    "CONTRACT_CHECK",
    "CONTRACT_FINDING_ID",
    "EBUSY_FINDING_ID",
    "MATRIX_NAME",
    "ROWS",
    "Contract",
    "Injector",
    "KillPolicy",
    "MatrixRow",
    "RowObservation",
    "RowPrediction",
    "common_checks",
    "judge_matrix",
    "judge_row",
    "predict",
    "row_by_id",
    "row_verdict",
    "table_row",
]

Injector = Literal["madvise", "corrupt-pfn"]
KillPolicy = Literal["early", "late"]
Contract = Literal["kill_mappers", "delayed"]

CONTRACTS: Final[tuple[Contract, ...]] = ("kill_mappers", "delayed")
CONTRACT_BASIS: Final[Mapping[Contract, str]] = {
    "kill_mappers": (
        "mm/memory-failure.c hwpoison_user_mappings/kill_procs for a file page; "
        "Documentation/admin-guide/sysctl/vm.rst memory_failure_early_kill; prctl(2) PR_MCE_KILL"
    ),
    "delayed": (
        "virt/kvm/guest_memfd.c kvm_gmem_error_folio returns MF_DELAYED: guest_memfd keeps the "
        "poisoned folio and no mapper is signalled at injection (the 2026 mm MF_DELAYED discussion)"
    ),
}


@dataclass(frozen=True)
class MatrixRow:
    """One variant: injector, kill policy of the VM-owning process, mapped, dirty."""

    injector: Injector
    kill: KillPolicy
    mapped: bool
    dirty: bool

    @property
    def id(self) -> str:
        return (
            f"{self.injector}.{self.kill}.{'mapped' if self.mapped else 'unmapped'}."
            f"{'dirty' if self.dirty else 'clean'}"
        )


ROWS: Final[tuple[MatrixRow, ...]] = tuple(
    MatrixRow(injector, kill, mapped, dirty)
    for injector in ("madvise", "corrupt-pfn")
    for kill in ("early", "late")
    for mapped in (True, False)
    for dirty in (True, False)
)


def row_by_id(row_id: str) -> MatrixRow:
    for row in ROWS:
        if row.id == row_id:
            return row
    raise KeyError(f"no poison-matrix row {row_id!r}; known: {', '.join(r.id for r in ROWS)}")


@dataclass(frozen=True)
class RowPrediction:
    """What a contract says the VM-owning process sees for a row."""

    contract: Contract
    injection_signal: int | None  # si_code at injection (at the process's own hva, lsb 12)
    user_touch_signal: int | None  # si_code of a userspace load after injection (mapped rows)
    why: str

    def sentence(self) -> str:
        at = "no signal at injection" if self.injection_signal is None else (
            f"SIGBUS {m.BUS_CODE_NAMES[self.injection_signal]} at injection at the hva, lsb 12"
        )  # fmt: skip
        touch = "" if self.user_touch_signal is None else (
            f", {m.BUS_CODE_NAMES[self.user_touch_signal]} on a userspace load"
        )  # fmt: skip
        return f"{self.contract}: {at}{touch}, KVM_EXIT_MEMORY_FAULT on a vCPU access ({self.why})"


def predict(row: MatrixRow, contract: Contract) -> RowPrediction:
    """Pure: the documented outcome of ``row`` under ``contract``."""
    touch = m.BUS_MCEERR_AR if row.mapped else None
    if contract == "delayed":
        return RowPrediction(contract, None, touch, "MF_DELAYED: nobody is signalled at injection")
    if not row.mapped:
        return RowPrediction(contract, None, touch, "the process maps no part of the page")
    if not row.dirty:
        return RowPrediction(contract, None, touch, "a clean page is only unmapped, nobody is killed")
    if row.injector == "madvise":
        return RowPrediction(
            contract, m.BUS_MCEERR_AR, touch, "the MADV_HWPOISON caller maps a dirty page: forced AR kill"
        )
    if row.kill == "early":
        return RowPrediction(contract, m.BUS_MCEERR_AO, touch, "early kill of a mapper of a dirty page: AO")
    return RowPrediction(contract, None, touch, "late kill: the dirty page is unmapped, the mapper lives on")


@dataclass(frozen=True)
class RowObservation:
    """Everything recorded for one row (the child's signals split by phase)."""

    hva: int | None  # the VM-owning process's mapping of the page (None: unmapped row)
    pfn: int
    injection_signals: tuple[SigbusRecord, ...]  # before the vCPU touch
    poisoned: bool | None  # KPF_HWPOISON of the pfn after the injection call
    hardware_corrupted_kib: tuple[int | None, int | None]
    call_errno: int
    guest: GuestAccessObservation
    user_signals: tuple[SigbusRecord, ...]  # after the userspace load started (mapped rows)
    flags_before: tuple[str, ...] = ()


def _sig_text(s: SigbusRecord) -> str:
    return f"{m.BUS_CODE_NAMES.get(s.si_code, s.si_code)}@{s.si_addr:#x}/lsb{s.si_addr_lsb}"


def _code(code: int | None) -> str:
    return "none" if code is None else m.BUS_CODE_NAMES.get(code, str(code))


def _signal_problems(what: str, seen: Sequence[SigbusRecord], code: int | None, hva: int | None) -> list[str]:
    if code is None:
        if not seen:
            return []
        got = ", ".join(f"{m.BUS_CODE_NAMES.get(s.si_code, s.si_code)} at {s.si_addr:#x}" for s in seen)
        return [f"{what}: expected no SIGBUS, got {len(seen)} ({got})"]
    want = f"1 SIGBUS {m.BUS_CODE_NAMES[code]} at {hva:#x} lsb {gl.PAGE_SHIFT}" if hva is not None else "?"
    if len(seen) != 1:
        return [f"{what}: expected {want}, got {len(seen)} SIGBUS"]
    (sig,) = seen
    problems = []
    if sig.si_code != code:
        problems.append(f"{what}: expected si_code {_code(code)}, got {_code(sig.si_code)}")
    if sig.si_addr != hva:
        problems.append(f"{what}: expected si_addr {hva:#x}, got {sig.si_addr:#x}")
    if sig.si_addr_lsb != gl.PAGE_SHIFT:
        problems.append(f"{what}: expected si_addr_lsb {gl.PAGE_SHIFT}, got {sig.si_addr_lsb}")
    return problems


MATRIX_NAME: Final = "poison matrix"
CONTRACT_CHECK: Final = "one documented contract across the rows judged"


def common_checks(exp: SeedExpectation, obs: RowObservation) -> list[Check]:
    """Pure: what every contract requires (the frame poisoned, the vCPU's memory-fault exit)."""
    checks = [Check(f"KPF_HWPOISON on pfn {obs.pfn:#x} after the injection", "True", str(obs.poisoned),
                    obs.poisoned is True)]
    before, after = obs.hardware_corrupted_kib
    if before is not None and after is not None:
        checks.append(Check("HardwareCorrupted growth (kB)", f">= {gl.PAGE_SIZE // 1024}", f"{after - before:+d}",
                            after - before >= gl.PAGE_SIZE // 1024))
    access = judge_guest_access(exp, obs.guest)
    contract = access.evidence["contract"]
    checks.append(Check("vCPU access", f"KVM_RUN -1/EHWPOISON with KVM_EXIT_MEMORY_FAULT at gpa {exp.gpa:#x}",
                        "memory-fault exit" if contract == "memory_fault_exit" else
                        f"{contract or 'neither contract'}: " + "; ".join(c.line() for c in access.checks),
                        contract == "memory_fault_exit"))
    if contract == "memory_fault_exit":
        checks += [replace(c, name=f"vCPU access: {c.name}") for c in access.checks]
    return checks


def _contract_check(row: MatrixRow, obs: RowObservation) -> tuple[tuple[Contract, ...], Check]:
    """The documented contracts the signals match, as one check (a row needs at least one)."""
    matches: list[Contract] = []
    per_contract: list[str] = []
    for contract in CONTRACTS:
        pred = predict(row, contract)
        problems = _signal_problems("at injection", obs.injection_signals, pred.injection_signal, obs.hva)
        if row.mapped:
            problems += _signal_problems("userspace load", obs.user_signals, pred.user_touch_signal, obs.hva)
        if problems:
            per_contract.append(f"not {contract} ({'; '.join(problems)})")
        else:
            matches.append(contract)
    actual = ("matches " + "/".join(matches) if matches
              else "matches no documented contract: " + " | ".join(per_contract))
    expected = " or ".join(predict(row, c).sentence() for c in CONTRACTS)
    return tuple(matches), Check("signals to the VM-owning process", expected, actual, bool(matches))


def table_row(row: MatrixRow, status: str, obs: RowObservation | None,
              matches: Sequence[Contract] = ()) -> dict[str, Any]:
    """The observed outcome of a row in a few words, for reports (and the matrix finding)."""
    if obs is None:
        return {"row": row.id, "status": status}
    mf = obs.guest.memory_fault
    run_err, reason = obs.guest.run_errno, obs.guest.exit_reason
    return {
        "row": row.id,
        "status": status,
        "injection": [_sig_text(s) for s in obs.injection_signals],
        "call_errno": errno.errorcode.get(obs.call_errno, obs.call_errno) if obs.call_errno else 0,
        "kpf_hwpoison": obs.poisoned,
        "hardware_corrupted_kib": list(obs.hardware_corrupted_kib),
        "kvm_run": errno.errorcode.get(run_err, run_err) if run_err else None,
        "exit": None if reason is None else u.EXIT_REASON_NAMES.get(reason, reason),
        "memory_fault": None if mf is None else {"gpa": hex(mf.gpa), "size": mf.size, "flags": mf.flags},
        "user_touch": [_sig_text(s) for s in obs.user_signals],
        "matches": list(matches),
    }  # fmt: skip


def row_verdict(row: MatrixRow, checks: Sequence[Check], obs: RowObservation | None = None,
                matches: Sequence[Contract] = (), **evidence: Any) -> Verdict:
    """A row's verdict with what reports read from it: its variant, matches, predictions, table line."""
    draft = Verdict(row.id, tuple(checks))
    return Verdict(row.id, tuple(checks), evidence={
        "variant": asdict(row), "matches": list(matches),
        "predictions": {c: predict(row, c).sentence() for c in CONTRACTS},
        "observation": None if obs is None else asdict(obs),
        "table": table_row(row, draft.status, obs, matches), **evidence})


def judge_row(row: MatrixRow, exp: SeedExpectation, obs: RowObservation, setup: Sequence[Check] = (),
              **evidence: Any) -> Verdict:
    """Pure: the live run's ``setup`` checks, the common checks and the contracts the observation
    matches (``evidence["matches"]``); ``evidence`` is kept beside them."""
    matches, contract = _contract_check(row, obs)
    return row_verdict(row, [*setup, *common_checks(exp, obs), contract], obs, matches, **evidence)


CONTRACT_FINDING_ID: Final = "poison-matrix-contract"
EBUSY_FINDING_ID: Final = "poison-injection-ebusy-yet-poisoned"


def _findings(judged: Sequence[Verdict], rows: Sequence[Verdict], chosen: Contract | None,
              candidates: set[Contract]) -> list[Finding]:
    findings: list[Finding] = []
    if chosen is not None:
        others = sorted(candidates - {chosen})
        alike = f" -- the rows run do not tell it from: {', '.join(others)}" if others else ""
        findings.append(Finding(
            id=CONTRACT_FINDING_ID, severity="info",
            text=(f"A poisoned shared guest_memfd page follows the '{chosen}' contract ({CONTRACT_BASIS[chosen]})"
                  f"{alike}; {len(judged)} rows judged, kernel {os.uname().release}"),
            evidence={"table": [_table_line(r) for r in rows], "candidates": sorted(candidates)}))
    ebusy = [r.scenario for r in judged if (r.evidence.get("observation") or {}).get("call_errno") == errno.EBUSY]
    if ebusy:
        findings.append(Finding(
            id=EBUSY_FINDING_ID, severity="divergence",
            text=("The injection call returned EBUSY although the frame is poisoned (KPF_HWPOISON set): "
                  "memory_failure reports guest_memfd's MF_DELAYED as a failure"),
            evidence={"rows": ebusy}))
    return findings


def _table_line(row: Verdict) -> dict[str, Any]:
    return dict(row.evidence.get("table") or {"row": row.scenario, "status": row.status})


def judge_matrix(rows: Sequence[Verdict]) -> Verdict:
    """Pure: the one contract every judged row matched, as a finding; rows that disagree fail it.

    The contract is ``evidence["contract"]`` (None: no single one); every row's verdict is a part.
    """
    judged = [r for r in rows if r.passed and r.evidence.get("matches")]
    candidates: set[Contract] = set(CONTRACTS)
    for r in judged:
        candidates &= set(r.evidence["matches"])
    chosen: Contract | None = next((c for c in CONTRACTS if c in candidates), None) if judged else None
    parts = list(rows)
    if judged:
        by_row = "; ".join(f"{r.scenario}: {'/'.join(r.evidence['matches'])}" for r in judged)
        parts.append(Verdict("matrix", (Check(CONTRACT_CHECK, f"one of {', '.join(CONTRACTS)} for every row",
                                              chosen if chosen else f"rows disagree: {by_row}", chosen is not None),)))
    return Verdict.combine(MATRIX_NAME, parts, findings=tuple(_findings(judged, rows, chosen, candidates)),
                           evidence={"contract": chosen, "table": [_table_line(r) for r in rows]})
