"""The poison matrix's live run: each row in its own child, the frame proven, poisoned, observed, judged.

Each row runs the matrix's child program (``host_stack.matrix_child``), which maps and dirties
the page as the row says and reports its pfn. The parent proves the frame (the VMA is the
guest_memfd (``kvm_uapi.GMEM_PROC_NAMES``) at the page's file offset and the pagemap names the
reported pfn), attaches the SIGBUS witness, injects, and observes three independent observables
(the child's siginfo, ``KPF_HWPOISON`` of the pfn, the ``HardwareCorrupted`` delta) plus the KVM
side: a vCPU touch of the gfn must end ``KVM_RUN`` with -1/EHWPOISON and
``KVM_EXIT_MEMORY_FAULT`` at the oracle's gpa (``(base_gfn + index - pgoff) << 12``). A mapped
row then loads from the page in userspace. The rows, contracts and judge are
``host_stack.matrix_oracle``. Clean-up unpoisons in ``finally``; a frame left poisoned is a
warning of its row.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from host_stack import gmem_layout as gl
from host_stack import kvm_uapi as u
from host_stack import mm_uapi as m
from host_stack.capabilities import HostReport, probe_host, unmet_reason
from host_stack.injectors import cleanup_warnings
from host_stack.kernelfs import DEBUGFS, mounted
from host_stack.live_child import ChildCancelled, JsonLineChild, child_argv, unpoison_injected
from host_stack.matrix_oracle import ROWS, MatrixRow, RowObservation, judge_matrix, judge_row, row_verdict
from host_stack.pagemap import find_vma, read_pagemap
from host_stack.seed_oracle import SEED_INDEX, GuestAccessObservation, MemoryFaultSeen, SeedExpectation
from host_stack.vmm import HOST_REQUIREMENTS
from outcome import Check, Verdict
from polling import poll_until

if TYPE_CHECKING:
    from host_stack.injectors import InjectionRecord
    from host_stack.witness import SigbusRecord

__all__ = ["MATRIX_REQUIREMENTS", "ROW_TIMEOUT", "run_poison_matrix", "run_row"]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

ROW_TIMEOUT: Final = 30.0
# The seed regression's: the tiny VMM's shared gmem slots, and a kernel that can poison a page at all.
MATRIX_REQUIREMENTS: Final = (*HOST_REQUIREMENTS, "hwpoison")


def _prove_gmem_frame(pid: int, va: int, pfn: int | None) -> str | None:
    """The interlock's extra half: the VMA is the guest_memfd at the page's offset, same pfn."""
    vma = find_vma(va, pid)
    if vma is None or vma.path not in u.GMEM_PROC_NAMES:
        names = " or ".join(u.GMEM_PROC_NAMES)
        return f"expected va {va:#x} of pid {pid} in a guest_memfd mapping ({names}), got {vma}"
    if vma.file_offset(va) != SEED_INDEX * gl.PAGE_SIZE:
        return f"expected file offset {SEED_INDEX * gl.PAGE_SIZE:#x} at va {va:#x}, got {vma.file_offset(va):#x}"
    now = read_pagemap(va, pid).pfn
    if pfn is None or now != pfn:
        return f"expected pfn {pfn} behind va {va:#x} of pid {pid} (reported by the row child), pagemap shows {now}"
    return None


def _wait_gone(pid: int | None, timeout: float = 10.0) -> None:
    """The mapper is not our child: wait until it no longer holds the page (gone or zombie)."""
    if pid is None:
        return
    def gone() -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        return state in ("Z", "X")

    if poll_until(gone, timeout=timeout, interval=0.01):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)


def _signals(records: Sequence[SigbusRecord], start: int | None, end: int | None) -> tuple[SigbusRecord, ...]:
    return tuple(r for r in records if (start is None or r.t_mono_ns >= start) and (end is None or r.t_mono_ns < end))


class _RowRun:
    """One row's child, what it reported, and the clean-up of what it poisoned."""

    def __init__(self, row: MatrixRow, debugfs: Path, lock: threading.Lock) -> None:
        self.row = row
        self.debugfs = debugfs
        self.lock = lock
        self.child = JsonLineChild(row.id, child_argv("host_stack.matrix_child", row.id), "poison-matrix child")
        self.events: list[dict[str, Any]] = []
        self.ready: dict[str, Any] | None = None

    def wait_ready(self) -> dict[str, Any]:
        self.ready = self.child.read_ready(time.monotonic() + ROW_TIMEOUT)
        return self.ready

    def _take(self, ev: dict[str, Any] | None, awaiting: str) -> str:
        if ev is None:
            raise self.child.error(f"ended its output while {awaiting} was awaited")
        self.events.append(ev)
        if ev["event"] == "unsupported":
            raise ChildCancelled(str(ev["reason"]))
        if ev["event"] == "refused":
            raise self.child.error(f"the injector's interlock refused the guest_memfd page: {ev['reason']}")
        return str(ev["event"])

    def _inject(self, ready: Mapping[str, Any], deadline: float) -> int:
        """Poison the page (one injection host-wide at a time); returns when it started (ns)."""
        from host_stack.injectors import CorruptPfnInjector

        with self.lock:
            t_inject = time.monotonic_ns()
            if self.row.injector == "madvise":  # by the process that maps the page
                self.child.send("inject")
                while self._take(self.child.read_event(deadline, "an 'injected' event"), "'injected'") != "injected":
                    pass
            else:
                rec = CorruptPfnInjector(self.debugfs).inject(int(ready["target_pid"]), int(ready["va"]),
                                                              int(ready["pfn"]))
                self.events.append({"event": "injected", "record": asdict(rec), "t_mono_ns": rec.t_start_ns})
        return t_inject

    def _collect(self, deadline: float) -> int:
        """Let the child touch the page and report to its end; returns its exit status."""
        self.child.send("touch")
        while (ev := self.child.read_event(deadline, "the next event or the end of output")) is not None:
            self._take(ev, "the next event")
        try:
            return self.child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            raise self.child.error("closed its output but did not exit") from exc

    def observe(self, ready: dict[str, Any]) -> Verdict:
        """Inject and collect under the SIGBUS witness, then judge."""
        from host_stack.witness import SigbusWitness

        with SigbusWitness(self.child.proc.pid) as witness:
            deadline = time.monotonic() + ROW_TIMEOUT
            t_inject = self._inject(ready, deadline)
            status = self._collect(deadline)
            records = witness.records
        return _judge_live(self.row, ready, self.events, records, status=status, t_inject=t_inject)

    def clean_up(self) -> tuple[list[InjectionRecord], list[str]]:
        """Stop the child, wait for its mapper, unpoison; the records and the warnings of a failed unpoison."""
        self.child.stop()
        _wait_gone(self.ready.get("mapper_pid") if self.ready else None)
        with self.lock:
            done = unpoison_injected(self.events, self.debugfs)
        warnings = cleanup_warnings(done)
        for warning in warnings:
            _log.warning("poison matrix row %s: %s", self.row.id, warning)
        return done, warnings


def _unproven_frame(row: MatrixRow, ready: Mapping[str, Any]) -> Verdict | None:
    """The row's verdict when the interlock cannot prove the frame, else None."""
    target_pid, va, pfn = int(ready["target_pid"]), int(ready["va"]), ready["pfn"]
    refusal = _prove_gmem_frame(target_pid, va, pfn)
    if refusal is None:
        return None
    check = Check(f"interlock: pfn {pfn} backs the child's guest_memfd page", "proven", refusal, False)
    return row_verdict(row, [check], ready=ready)


def run_row(
    row: MatrixRow, *, report: HostReport, debugfs: Path, poison_lock: threading.Lock | None = None
) -> Verdict:
    """One row in its own child; never raises for the row's own trouble (a failed row says why).

    ``poison_lock`` serialises what moves the host-wide ``HardwareCorrupted`` counter (the
    injection and the unpoison) when rows run side by side, so each row's delta is its own.
    """
    if row.injector == "corrupt-pfn":
        reason = report.missing("hwpoison_inject")
        if reason is not None:
            return Verdict.did_not_run(row.id, "CANNOT RUN", reason)
    run = _RowRun(row, debugfs, poison_lock if poison_lock is not None else threading.Lock())
    result: Verdict | None = None
    try:
        ready = run.wait_ready()
        unproven = _unproven_frame(row, ready)
        if unproven is not None:
            return unproven
        result = run.observe(ready)
    except ChildCancelled:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        result = Verdict.did_not_run(row.id, "ERROR", f"{type(exc).__name__}: {exc}", evidence={"events": run.events})
    finally:
        done, warnings = run.clean_up()
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
        layout, int(ready["index"]), {int(k): int(v) for k, v in ready["slot_hva"].items()},
        va - SEED_INDEX * gl.PAGE_SIZE,
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
    """Run every row; raises ``ChildCancelled`` with the probed sentence where it cannot run.

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
        raise ChildCancelled(reason)
    lock = threading.Lock()
    with contextlib.ExitStack() as stack:
        where = debugfs if debugfs is not None else stack.enter_context(mounted(DEBUGFS))
        if where is None:
            raise ChildCancelled(
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
            results = list(pool.map(one, rows))  # table order; a ChildCancelled propagates
    return judge_matrix(results)
