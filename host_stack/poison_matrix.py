"""The shared-guest_memfd poison matrix: who gets a SIGBUS when a shared gmem page is poisoned.

A guest_memfd created with MMAP|INIT_SHARED is a file: userspace may map it, and it also backs
a memslot. When one of its pages is poisoned, whether a process gets a SIGBUS (and which) has
depended, since the 2026 mm discussion of ``MF_DELAYED``, on four things: the injector
(``MADV_HWPOISON``, action-required-like, or debugfs ``hwpoison/corrupt-pfn``, action-optional
like), the kill policy of the process that maps the page (``prctl(PR_MCE_KILL_EARLY/LATE)``),
whether the process maps the page at all, and whether the page is dirty. The rows below are
those variants as data, in the manner of the kernel's ``selftests/mm/memory-failure.c``.

Each row runs in its own child process (``python -m host_stack.poison_matrix ROW``) that
builds a VM with one guest_memfd bound to a slot with pgoff > 0 (``vmm.TinyVm``, no markers,
decoy ``userspace_addr``), maps and dirties the page as the row says and reports its pfn. For
an *unmapped* row the child maps nothing of the guest_memfd; a forked helper (kill policy
late) maps the page, so the frame can still be proven and ``MADV_HWPOISON`` still has a
caller that maps it. The parent proves the frame (the VMA is the guest_memfd
(``kvm_uapi.GMEM_PROC_NAMES``) at the page's file offset and the pagemap names the reported
pfn), attaches the SIGBUS witness,
injects, and observes three independent observables (the child's siginfo, ``KPF_HWPOISON``
of the pfn, the ``HardwareCorrupted`` delta) plus the KVM side: a vCPU touch of the gfn must
end ``KVM_RUN`` with -1/EHWPOISON and ``KVM_EXIT_MEMORY_FAULT`` at the oracle's gpa
(``(base_gfn + index - pgoff) << 12``). A mapped row then loads from the page in userspace.

Two documented contracts say what must happen at injection (both agree on the touches):

- ``kill_mappers``: mm/memory-failure.c's rules for a file page (Documentation/admin-guide/
  sysctl/vm.rst ``memory_failure_early_kill``, prctl(2) ``PR_MCE_KILL``): a page that cannot
  be reloaded (dirty) is unmapped and its mappers are killed; the injecting process of an
  action-required injection (MADV_HWPOISON) is always among them and gets BUS_MCEERR_AR during
  the call, other mappers only with early kill, with BUS_MCEERR_AO; a clean page is only
  unmapped. Signals name the mapper's own hva with ``si_addr_lsb`` 12.
- ``delayed``: guest_memfd takes the error over (``MF_DELAYED``): no process gets a signal at
  injection; the page stays poisoned in the file, so every later access faults.

The verdict names the contract every row matched, as a finding with the observed table as
evidence; a row that matches neither is a failure. Clean-up unpoisons in ``finally``; a frame
left poisoned is a warning of its row.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from host_stack import gmem_layout as gl
from host_stack import kvm_uapi as u
from host_stack import mm_uapi as m
from host_stack.capabilities import HostReport, probe_host, unmet_reason
from host_stack.injectors import cleanup_warnings
from host_stack.kernelfs import DEBUGFS, mounted
from host_stack.pagemap import find_vma, read_kpageflags, read_pagemap
from host_stack.seed_regression import (
    SEED_INDEX,
    SEED_REQUIREMENTS,
    GuestAccessObservation,
    JsonLineChild,
    MemoryFaultSeen,
    SeedCancelled,
    SeedExpectation,
    judge_guest_access,
    unpoison_injected,
)
from outcome import Check, Finding, Verdict

if TYPE_CHECKING:
    from host_stack.kvm import HostMapping
    from host_stack.witness import SigbusRecord

__all__ = [
    "CONTRACTS",
    "CONTRACT_FINDING_ID",
    "EBUSY_FINDING_ID",
    "MATRIX_NAME",
    "ROWS",
    "Contract",
    "MatrixCancelled",
    "MatrixRow",
    "RowObservation",
    "RowPrediction",
    "judge_matrix",
    "judge_row",
    "predict",
    "row_by_id",
    "row_verdict",
    "run_poison_matrix",
    "run_row",
    "table_row",
]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

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
INDEX: Final = SEED_INDEX  # file index 9 behind slot 2 of vmm.DEFAULT_LAYOUT (gfn 0x41)
ROW_TIMEOUT: Final = 30.0
MATRIX_REQUIREMENTS: Final = SEED_REQUIREMENTS


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


# --- live path --------------------------------------------------------------------------------
class MatrixCancelled(SeedCancelled):
    """The host cannot run the matrix at all; ``reason`` is the probed sentence."""


_libc = ctypes.CDLL(None, use_errno=True)


def _set_kill_policy(kill: KillPolicy) -> int:
    """prctl(PR_MCE_KILL, SET, EARLY/LATE); returns PR_MCE_KILL_GET's answer as proof."""
    policy = m.PR_MCE_KILL_EARLY if kill == "early" else m.PR_MCE_KILL_LATE
    if _libc.prctl(m.PR_MCE_KILL, m.PR_MCE_KILL_SET, policy, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_MCE_KILL_SET, {kill}): {os.strerror(err)}")
    return int(_libc.prctl(m.PR_MCE_KILL_GET, 0, 0, 0, 0))


def _touch(mapping: HostMapping, offset: int, dirty: bool) -> None:
    if dirty:
        mapping.write_u32(offset, 0xD1 << 24 | INDEX)
    else:
        mapping.read_u32(offset)  # a read fault: INIT_SHARED allocates a zeroed, clean page


def _mapper(gmem_fd: int, row: MatrixRow, cmd_fd: int, evt_fd: int) -> None:  # pragma: no cover - forked
    """Forked helper of an unmapped row: maps the page (kill policy late), injects for madvise."""
    import signal

    from host_stack.injectors import HwpoisonUnsupported, MadviseInjector
    from host_stack.kvm import HostMapping

    signal.signal(signal.SIGBUS, lambda _signo, _frame: None)
    out = os.fdopen(evt_fd, "w")
    _set_kill_policy("late")
    mapping = HostMapping.map(gl.PAGE_SIZE, fd=gmem_fd, offset=INDEX * gl.PAGE_SIZE, description="mapper view")
    _touch(mapping, 0, row.dirty)
    out.write(json.dumps({"pid": os.getpid(), "va": mapping.addr}) + "\n")
    out.flush()
    with os.fdopen(cmd_fd, "r") as cmds:
        for line in cmds:
            if line.strip() == "inject":
                try:
                    rec = MadviseInjector().inject(mapping.addr, gl.PAGE_SIZE)
                    out.write(json.dumps({"record": asdict(rec)}) + "\n")
                except HwpoisonUnsupported as exc:
                    out.write(json.dumps({"unsupported": str(exc)}) + "\n")
                except Exception as exc:  # reported to the row child, which reports it
                    out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
                out.flush()


def _child(row: MatrixRow) -> int:  # pragma: no cover - runs in a child
    """Row child: build the VM, map/dirty per row, report the frame, then inject/touch on command."""
    import signal
    import threading

    from host_stack.injectors import HwpoisonUnsupported, InjectionRefused, MadviseInjector
    from host_stack.kvm import KvmSystem, MemoryFaultExit, RunFailedExit
    from host_stack.vmm import GmemUnsupported, PayloadError, TinyVm

    def emit(obj: dict[str, Any]) -> None:
        obj["t_mono_ns"] = time.monotonic_ns()
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    signal.signal(signal.SIGBUS, lambda _signo, _frame: None)  # survive AO/AR sent at injection
    with KvmSystem() as system:
        try:
            tvm = TinyVm(system, backing="decoy", markers=False)
        except GmemUnsupported as exc:
            emit({"event": "unsupported", "reason": str(exc)})
            return 0
        with tvm:
            mapper_pid: int | None = None
            cmd_w = evt_r = None
            if row.mapped:
                target_pid, va = os.getpid(), tvm.gmem_map.addr + INDEX * gl.PAGE_SIZE
                _touch(tvm.gmem_map, INDEX * gl.PAGE_SIZE, row.dirty)
            else:
                tvm.gmem_map.close()  # no VMA of this process covers the page
                cmd_r, cmd_w_fd = os.pipe()
                evt_r_fd, evt_w = os.pipe()
                mapper_pid = os.fork()
                if mapper_pid == 0:
                    os.close(cmd_w_fd)
                    os.close(evt_r_fd)
                    try:
                        _mapper(tvm.gmem.fd, row, cmd_r, evt_w)
                    finally:
                        os._exit(0)
                os.close(cmd_r)
                os.close(evt_w)
                cmd_w = os.fdopen(cmd_w_fd, "w")
                evt_r = os.fdopen(evt_r_fd, "r")
                hello = json.loads(evt_r.readline())
                target_pid, va = int(hello["pid"]), int(hello["va"])
            kill_get = _set_kill_policy(row.kill)  # after the fork: the mapper keeps "late"
            entry = read_pagemap(va, target_pid)
            emit({
                "event": "ready", "layout": [asdict(s) for s in tvm.layout], "slot_hva": tvm.slot_hva,
                "index": INDEX, "tid": threading.get_native_id(), "target_pid": target_pid, "va": va,
                "pfn": entry.pfn, "mapper_pid": mapper_pid, "kill_get": kill_get,
                "flags_before": list(read_kpageflags(entry.pfn).names) if entry.pfn is not None else [],
            })  # fmt: skip
            for line in sys.stdin:
                cmd = line.strip()
                if cmd == "inject":  # madvise, by whoever maps the page
                    if row.mapped:
                        try:
                            rec = MadviseInjector().inject(va, gl.PAGE_SIZE, [int(entry.pfn or -1)])
                        except HwpoisonUnsupported as exc:
                            emit({"event": "unsupported", "reason": str(exc)})
                            return 0
                        except InjectionRefused as exc:
                            emit({"event": "refused", "reason": str(exc)})
                            return 0
                        emit({"event": "injected", "record": asdict(rec)})
                    else:
                        assert cmd_w is not None and evt_r is not None
                        cmd_w.write("inject\n")
                        cmd_w.flush()
                        answer = json.loads(evt_r.readline())
                        if "unsupported" in answer:
                            emit({"event": "unsupported", "reason": answer["unsupported"]})
                            return 0
                        if "error" in answer:
                            emit({"event": "refused", "reason": f"mapper: {answer['error']}"})
                            return 0
                        emit({"event": "injected", "record": answer["record"]})
                elif cmd == "touch":
                    break
            gfn = gl.gfn_for_index(tvm.layout, INDEX)
            assert gfn is not None
            emit({"event": "touch_start"})
            try:
                tvm.read_gfns([gfn])
                emit({"event": "run", "run_errno": None, "exit_reason": None, "note": "the read succeeded"})
            except PayloadError as exc:
                ex = exc.exit
                if isinstance(ex, MemoryFaultExit):
                    emit({"event": "run", "run_errno": ex.errno, "exit_reason": u.KVM_EXIT_MEMORY_FAULT,
                          "memory_fault": {"gpa": ex.gpa, "size": ex.size, "flags": ex.flags}})  # fmt: skip
                elif isinstance(ex, RunFailedExit):
                    emit({"event": "run", "run_errno": ex.errno, "exit_reason": ex.exit_reason})
                else:
                    emit({"event": "run", "run_errno": None, "exit_reason": None, "error": str(exc)})
            if mapper_pid is not None:
                assert cmd_w is not None
                cmd_w.close()  # EOF: the mapper exits
                os.waitpid(mapper_pid, 0)
                emit({"event": "mapper_gone", "pid": mapper_pid})
            if row.mapped:
                emit({"event": "user_touch_start"})
                signal.signal(signal.SIGBUS, signal.SIG_DFL)  # a faulting load must not retry forever
                tvm.gmem_map.read(INDEX * gl.PAGE_SIZE, 8)
                emit({"event": "user_touched"})
    return 0


def _prove_gmem_frame(pid: int, va: int, pfn: int | None) -> str | None:
    """The interlock's extra half: the VMA is the guest_memfd at the page's offset, same pfn."""
    vma = find_vma(va, pid)
    if vma is None or vma.path not in u.GMEM_PROC_NAMES:
        names = " or ".join(u.GMEM_PROC_NAMES)
        return f"expected va {va:#x} of pid {pid} in a guest_memfd mapping ({names}), got {vma}"
    if vma.file_offset(va) != INDEX * gl.PAGE_SIZE:
        return f"expected file offset {INDEX * gl.PAGE_SIZE:#x} at va {va:#x}, got {vma.file_offset(va):#x}"
    now = read_pagemap(va, pid).pfn
    if pfn is None or now != pfn:
        return f"expected pfn {pfn} behind va {va:#x} of pid {pid} (reported by the row child), pagemap shows {now}"
    return None


def _wait_gone(pid: int | None, timeout: float = 10.0) -> None:
    """The mapper is not our child: wait until it no longer holds the page (gone or zombie)."""
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)


def _signals(records: Sequence[SigbusRecord], start: int | None, end: int | None) -> tuple[SigbusRecord, ...]:
    return tuple(r for r in records if (start is None or r.t_mono_ns >= start) and (end is None or r.t_mono_ns < end))


def run_row(
    row: MatrixRow, *, report: HostReport, debugfs: Path, poison_lock: threading.Lock | None = None
) -> Verdict:
    """One row in its own child; never raises for the row's own trouble (a failed row says why).

    ``poison_lock`` serialises what moves the host-wide ``HardwareCorrupted`` counter (the
    injection and the unpoison) when rows run side by side, so each row's delta is its own.
    """
    from host_stack.injectors import CorruptPfnInjector, InjectionRecord
    from host_stack.witness import SigbusWitness

    if row.injector == "corrupt-pfn":
        reason = report.missing("hwpoison_inject")
        if reason is not None:
            return Verdict.did_not_run(row.id, "CANNOT RUN", reason)
    lock = poison_lock if poison_lock is not None else threading.Lock()
    child = JsonLineChild(row.id, [sys.executable, "-m", "host_stack.poison_matrix", row.id], "poison-matrix child")
    events: list[dict[str, Any]] = []
    ready: dict[str, Any] | None = None
    result: Verdict | None = None
    warnings: list[str] = []

    def take(ev: dict[str, Any] | None, awaiting: str) -> str:
        if ev is None:
            raise child.error(f"ended its output while {awaiting} was awaited")
        events.append(ev)
        if ev["event"] == "unsupported":
            raise MatrixCancelled(str(ev["reason"]))
        if ev["event"] == "refused":
            raise child.error(f"the injector's interlock refused the guest_memfd page: {ev['reason']}")
        return str(ev["event"])

    try:
        ready = child.read_event(time.monotonic() + ROW_TIMEOUT, "a 'ready' event")
        if ready is None or ready.get("event") != "ready":
            if ready is not None and ready.get("event") == "unsupported":
                raise MatrixCancelled(str(ready["reason"]))
            raise child.error(f"expected a 'ready' event, got {ready}")
        target_pid, va, pfn = int(ready["target_pid"]), int(ready["va"]), ready["pfn"]
        refusal = _prove_gmem_frame(target_pid, va, pfn)
        if refusal is not None:
            check = Check(f"interlock: pfn {pfn} backs the child's guest_memfd page", "proven", refusal, False)
            return row_verdict(row, [check], ready=ready)
        with SigbusWitness(child.proc.pid) as witness:
            deadline = time.monotonic() + ROW_TIMEOUT
            with lock:
                t_inject = time.monotonic_ns()
                if row.injector == "madvise":  # by the process that maps the page
                    child.send("inject")
                    while take(child.read_event(deadline, "an 'injected' event"), "'injected'") != "injected":
                        pass
                else:
                    rec = CorruptPfnInjector(debugfs).inject(target_pid, va, int(pfn))
                    events.append({"event": "injected", "record": asdict(rec), "t_mono_ns": rec.t_start_ns})
            child.send("touch")
            while (ev := child.read_event(deadline, "the next event or the end of output")) is not None:
                take(ev, "the next event")
            try:
                status = child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise child.error("closed its output but did not exit") from exc
            records = witness.records
        result = _judge_live(row, ready, events, records, status=status, t_inject=t_inject)
    except MatrixCancelled:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        result = Verdict.did_not_run(row.id, "ERROR", f"{type(exc).__name__}: {exc}", evidence={"events": events})
    finally:
        child.stop()
        _wait_gone(ready.get("mapper_pid") if ready else None)
        with lock:
            done: list[InjectionRecord] = unpoison_injected(events, debugfs)
        warnings = cleanup_warnings(done)
        for warning in warnings:
            _log.warning("poison matrix row %s: %s", row.id, warning)
    assert result is not None
    return replace(result, warnings=(*result.warnings, *warnings),
                   evidence={**result.evidence, "cleanup": [r.cleanup for r in done]})


def _hc_pair(raw: Sequence[int | None] | None) -> tuple[int | None, int | None]:
    if raw is None or len(raw) != 2:
        return (None, None)
    return (raw[0], raw[1])


def _judge_live(
    row: MatrixRow,
    ready: Mapping[str, Any],
    events: Sequence[Mapping[str, Any]],
    records: Sequence[SigbusRecord],
    *,
    status: int,
    t_inject: int,
) -> Verdict:
    layout = [gl.SlotLayout(**s) for s in ready["layout"]]
    va = int(ready["va"])
    exp = SeedExpectation.from_layout(
        layout, int(ready["index"]), {int(k): int(v) for k, v in ready["slot_hva"].items()}, va - INDEX * gl.PAGE_SIZE
    )
    injected = next((e for e in events if e["event"] == "injected"), None)
    if injected is None:
        got = [e["event"] for e in events]
        return row_verdict(row, [Check("injection record", "an 'injected' event", f"events {got}", False)])
    rec = injected["record"]
    touch_t = next((e["t_mono_ns"] for e in events if e["event"] == "touch_start"), None)
    user_t = next((e["t_mono_ns"] for e in events if e["event"] == "user_touch_start"), None)
    run = next((e for e in events if e["event"] == "run"), None)
    mf = run.get("memory_fault") if run else None
    guest = GuestAccessObservation(
        run_errno=run["run_errno"] if run else None,
        exit_reason=run["exit_reason"] if run else None,
        memory_fault=MemoryFaultSeen(**mf) if mf else None,
        sigbus=_signals(records, touch_t, user_t),
        vcpu_tid=int(ready["tid"]),
    )
    obs = RowObservation(
        hva=va if row.mapped else None,
        pfn=int(ready["pfn"]),
        injection_signals=_signals(records, t_inject, touch_t),
        poisoned=rec.get("poisoned"),
        hardware_corrupted_kib=_hc_pair(rec.get("hardware_corrupted_kib")),
        call_errno=int(rec.get("call_errno", 0)),
        guest=guest,
        user_signals=_signals(records, user_t, None) if user_t is not None else (),
        flags_before=tuple(ready.get("flags_before", ())),
    )
    want_kill = m.PR_MCE_KILL_EARLY if row.kill == "early" else m.PR_MCE_KILL_LATE
    dirty_before = "dirty" in obs.flags_before
    if not row.dirty and dirty_before:
        return Verdict.did_not_run(row.id, "CANNOT RUN", (
            f"clean row: pfn {obs.pfn:#x} is already dirty after a read fault (kpageflags {obs.flags_before}): "
            "this kernel gives no clean guest_memfd page"), evidence={"observation": asdict(obs)})  # fmt: skip
    setup = [Check(f"PR_MCE_KILL_GET after setting {row.kill}", str(want_kill), str(ready["kill_get"]),
                   int(ready["kill_get"]) == want_kill)]
    if row.dirty:
        setup.append(Check(f"KPF_DIRTY on pfn {obs.pfn:#x} before the injection", "dirty",
                           ",".join(obs.flags_before) or "no flags", dirty_before))
    return judge_row(row, exp, obs, setup, events=list(events), exit_status=status, expectation=asdict(exp))


def run_poison_matrix(
    rows: Sequence[MatrixRow] = ROWS,
    *,
    report: HostReport | None = None,
    debugfs: Path | None = None,
    on_row: Callable[[Verdict], None] | None = None,
    parallel: int = 2,
) -> Verdict:
    """Run every row; raises ``MatrixCancelled`` with the probed sentence where it cannot run.

    ``report`` defaults to ``probe_host()`` (its KVM and hwpoison facts are read; the hwpoison
    probe poisons and unpoisons a scratch page of a throw-away child); ``debugfs`` is where
    corrupt-pfn and unpoison-pfn live (default: the real one, mounted for the run).
    ``parallel`` rows run side by side (each in its own child; the lab host's L1 has two vCPUs
    and a row mostly waits for Python processes to start); injections and unpoisons stay one
    at a time, so each row's ``HardwareCorrupted`` delta is its own. ``on_row`` hears of each
    row as it finishes (from a worker thread).
    """
    report = report if report is not None else probe_host()
    reason = unmet_reason(report, MATRIX_REQUIREMENTS)
    if reason is not None:
        raise MatrixCancelled(reason)
    lock = threading.Lock()
    with contextlib.ExitStack() as stack:
        where = debugfs if debugfs is not None else stack.enter_context(mounted(DEBUGFS))
        if where is None:
            raise MatrixCancelled(
                "debugfs is not mounted and could not be mounted: no hwpoison unpoison-pfn for clean-up"
            )
        report.missing("hwpoison_inject")  # probed once, before rows run side by side

        def one(row: MatrixRow) -> Verdict:
            result = run_row(row, report=report, debugfs=where, poison_lock=lock)
            _log.info("poison matrix %s", result.summary().replace("\n", "; "))
            if on_row is not None:
                on_row(result)
            return result

        with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="poison-row") as pool:
            results = list(pool.map(one, rows))  # table order; a MatrixCancelled propagates
    return judge_matrix(results)


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m host_stack.poison_matrix ROW_ID\n")
        sys.exit(2)
    sys.exit(_child(row_by_id(sys.argv[1])))
