"""Poison the frame behind a private gfn of a software-protected VM, for real, and judge what each layer saw.

Each run starts the private child (``host_stack.private_child``), which builds the VM and lets
KVM name the frames behind its private gfns. The parent proves the seed's frame
(``private_frames.prove_private_frame``; it re-reads the frame's flags itself right before the
write) and, under the SIGBUS witness and a host-wide ``signal_generate`` trace, poisons it
through debugfs ``corrupt-pfn``; the child's vCPU then touches the gfn and reads every other
one. Clean-up is part of the run: unpoison (refused while guest_memfd still holds the page, a
finding), punch the page out of the guest_memfd, unpoison again. Whatever happens, the frame
is unpoisoned in ``finally`` once the child is gone; a frame left poisoned is a warning of the
verdict naming it. The judge is ``host_stack.private_oracle``.

``run_private_seed`` is the seed regression for a private page (the process's own kill
policy); ``run_private_matrix`` is the poison matrix's private column (kill policy early and
late, and MADV_HWPOISON, which is NOT MEANINGFUL for a page nobody maps).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from host_stack import gmem_layout as gl
from host_stack import live_child
from host_stack import mm_uapi as m
from host_stack.capabilities import HostReport, probe_host, unmet_reason
from host_stack.injectors import InjectionRecord, InjectionRefused, cleanup_warnings, unpoison_pfn
from host_stack.kernelfs import DEBUGFS, mounted
from host_stack.live_child import ChildCancelled, JsonLineChild, child_argv
from host_stack.pagemap import hardware_corrupted_kib, read_kpageflags
from host_stack.private_frames import PrivateFrame, SpteRequest, check_private_flags, prove_private_frame
from host_stack.private_oracle import (
    PRIVATE_ROWS,
    PRIVATE_SEED_NAME,
    CleanupSteps,
    PrivateExpectation,
    PrivateObservation,
    judge_private,
    judge_private_matrix,
    judge_private_row,
)
from host_stack.vmm import guest_pattern
from outcome import Check, Verdict

if TYPE_CHECKING:
    from host_stack.signal_trace import GeneratedSignal
    from host_stack.witness import SigbusRecord

__all__ = ["PRIVATE_REQUIREMENTS", "release_frame", "run_private_matrix", "run_private_seed"]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

# A VM with private memory, a kernel that poisons pages, and debugfs corrupt-pfn to poison a
# frame nobody maps.
PRIVATE_REQUIREMENTS: Final = ("kvm", "sw_protected_vm", "hwpoison", "hwpoison_inject")


def release_frame(record: InjectionRecord, debugfs: Path,
                  still_poisoned: Callable[[int], bool] | None = None) -> InjectionRecord:
    """The last clean-up, once the child is gone: unpoison the frame if it still is poisoned.

    The record comes back with what happened; ``cleanup_failed`` when the frame stays poisoned
    (``cleanup_warnings`` then names it). ``still_poisoned`` reads ``KPF_HWPOISON`` (default:
    /proc/kpageflags).
    """
    poisoned = still_poisoned if still_poisoned is not None else (lambda pfn: read_kpageflags(pfn).hwpoison)
    pfn = record.pfn
    if pfn is None:
        return record.with_cleanup("no pfn recorded: nothing to unpoison")
    if not poisoned(pfn):
        return record.with_cleanup(f"pfn {pfn:#x} is not poisoned any more ({record.cleanup})")
    err = unpoison_pfn(debugfs / m.HWPOISON_UNPOISON_PFN, pfn)
    if err == 0 and not poisoned(pfn):
        return record.with_cleanup(f"unpoisoned pfn {pfn:#x} after the VM was gone")
    return record.with_cleanup(f"pfn {pfn:#x} stays poisoned: unpoison-pfn answered "
                               f"{errno.errorcode.get(err, err) if err else '0'} after the VM was gone", failed=True)


@dataclass
class _Run:
    """One child run: what it reported and what the parent did."""

    ready: dict[str, Any]
    events: list[dict[str, Any]]
    frame: PrivateFrame | None = None
    refusal: str | None = None
    record: InjectionRecord | None = None
    delivered: tuple[SigbusRecord, ...] = ()
    generated: tuple[GeneratedSignal, ...] = ()
    cleanup: CleanupSteps = field(default_factory=CleanupSteps)
    hc_before: int | None = None


def _prove(ready: Mapping[str, Any]) -> PrivateFrame:
    gfn, tid = int(ready["gfn"]), int(ready["tid"])
    rounds = [[SpteRequest(**r) for r in requests] for requests in ready["rounds"]]
    seed = [r.pfn for r in rounds[0] if r.gfn == gfn] if rounds else []
    read_back = {int(g, 16): (int(v[0]), int(v[1])) for g, v in ready["read_back"].items()}
    return prove_private_frame(gfn, int(ready["index"]), tid, rounds=rounds, read_back=read_back,
                               flags=read_kpageflags(seed[0] if seed else 0))


def _expect(ready: Mapping[str, Any]) -> PrivateExpectation:
    private = [int(g) for g in ready["private"]]
    layout = [gl.SlotLayout(**s) for s in ready["layout"]]
    return PrivateExpectation.from_layout(layout, int(ready["index"]), private, {g: guest_pattern(g) for g in private})


class _Session:
    """The child, the witness and the signal trace of one run; every step bounded by a deadline."""

    def __init__(self, child: JsonLineChild, run: _Run, debugfs: Path) -> None:
        self.child, self.run, self.debugfs = child, run, debugfs
        self.deadline = time.monotonic() + live_child.CHILD_TIMEOUT

    def until(self, event: str) -> dict[str, Any]:
        while True:
            ev = self.child.read_event(self.deadline, f"a {event!r} event")
            if ev is None:
                raise self.child.error(f"ended its output while a {event!r} event was awaited")
            self.run.events.append(ev)
            if ev["event"] == event:
                return ev

    def inject(self, frame: PrivateFrame) -> None:
        from host_stack.injectors import CorruptPfnInjector

        def recheck() -> None:
            check_private_flags(read_kpageflags(frame.pfn))

        self.run.hc_before = hardware_corrupted_kib()
        self.run.record = CorruptPfnInjector(self.debugfs).inject_private(
            frame.pfn, pid=self.child.proc.pid, gpa=frame.gpa, recheck=recheck)

    def touch(self) -> None:
        self.child.send("touch")
        self.until("after")

    def clean_up(self, pfn: int) -> CleanupSteps:
        """Unpoison, punch, unpoison: each answer kept (the order is the finding)."""
        unpoison = self.debugfs / m.HWPOISON_UNPOISON_PFN
        before = unpoison_pfn(unpoison, pfn)
        self.child.send("punch")
        punched = int(self.until("punched")["errno"])
        after = unpoison_pfn(unpoison, pfn) if read_kpageflags(pfn).hwpoison else None
        return CleanupSteps(unpoison_before_punch=before, punch_errno=punched, unpoison_after_punch=after,
                            poisoned_after=read_kpageflags(pfn).hwpoison,
                            hardware_corrupted_kib=(self.run.hc_before, hardware_corrupted_kib()))

    def finish(self) -> None:
        self.child.send("end")
        while self.child.read_event(self.deadline, "the end of output") is not None:
            pass
        try:
            self.child.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired as exc:
            raise self.child.error("closed its output but did not exit") from exc


def _observe(kill: str, debugfs: Path) -> tuple[_Run, list[str]]:
    """One child run; returns it and the clean-up warnings (a frame left poisoned)."""
    from host_stack.signal_trace import SignalTrace
    from host_stack.witness import SigbusWitness

    child = JsonLineChild(kill, child_argv("host_stack.private_child", kill), "private-poison child")
    run: _Run | None = None
    warnings: list[str] = []
    try:
        ready = child.read_ready(time.monotonic() + live_child.CHILD_TIMEOUT)
        run = _Run(ready, [])
        try:
            run.frame = _prove(ready)
        except InjectionRefused as exc:
            run.refusal = str(exc)
            return run, warnings
        session = _Session(child, run, debugfs)
        tids = {int(ready["pid"]), int(ready["tid"])}
        with SignalTrace(m.SIGBUS) as trace, SigbusWitness(child.proc.pid) as witness:
            session.inject(run.frame)
            session.touch()
            run.cleanup = session.clean_up(run.frame.pfn)
            session.finish()
            run.delivered = tuple(witness.records)
            run.generated = tuple(g for g in trace.records() if g.tid in tids)
    finally:
        child.stop()
        if run is not None and run.record is not None:
            done = release_frame(run.record, debugfs)
            run.record = done
            warnings = cleanup_warnings([done])
            for warning in warnings:
                _log.warning("private poison (%s): %s", kill, warning)
            in_flight = sys.exc_info()[1]
            if in_flight is not None and warnings:
                in_flight.add_note("cleanup: " + "; ".join(warnings))
    return run, warnings


def _observation(run: _Run) -> PrivateObservation:
    assert run.frame is not None
    ev = {e["event"]: e for e in run.events}
    touch, after, rec = ev.get("run", {}), ev.get("after", {}), run.record
    return PrivateObservation(
        kill=str(run.ready["kill"]), kill_get=run.ready.get("kill_get"), pfn=run.frame.pfn, proof=run.frame.proof,
        injected_pfn=None if rec is None else rec.pfn, poisoned=None if rec is None else rec.poisoned,
        call_errno=0 if rec is None else rec.call_errno,
        hardware_corrupted_kib=(None, None) if rec is None else rec.hardware_corrupted_kib,
        run_errno=touch.get("run_errno"), exit_reason=touch.get("exit_reason"), memory_fault=touch.get("memory_fault"),
        delivered=run.delivered, generated=run.generated,
        after={int(g, 16): int(v) for g, v in after["values"].items()} if "values" in after else None,
        after_error=after.get("error"), cleanup=run.cleanup)


def _judged(name: str, kill: str, debugfs: Path, row: bool) -> Verdict:
    """One run as a verdict: the interlock's refusal is a failed check (nothing was poisoned)."""
    try:
        run, warnings = _observe(kill, debugfs)
    except ChildCancelled:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        notes = tuple(getattr(exc, "__notes__", ()))  # a frame the clean-up left poisoned, named
        return Verdict.did_not_run(name, "ERROR", f"{type(exc).__name__}: {exc}", warnings=notes)
    if run.frame is None:
        return Verdict(name, (Check("interlock: the frame behind the private gfn is proven", "proven",
                                    str(run.refusal), False),), evidence={"ready": run.ready})
    exp, obs = _expect(run.ready), _observation(run)
    evidence = {"events": run.events, "record": None if run.record is None else asdict(run.record)}
    if not row:
        verdict = judge_private(name, exp, obs)
    else:
        want = m.PR_MCE_KILL_EARLY if kill == "early" else m.PR_MCE_KILL_LATE
        setup = [Check(f"PR_MCE_KILL_GET after setting {kill}", str(want), str(obs.kill_get), obs.kill_get == want)]
        verdict = judge_private_row(name, exp, obs, setup)
    return replace(verdict, warnings=(*verdict.warnings, *warnings), evidence={**verdict.evidence, **evidence})


@contextlib.contextmanager
def _gate(report: HostReport | None, debugfs: Path | None) -> Iterator[Path]:
    reason = unmet_reason(report if report is not None else probe_host(), PRIVATE_REQUIREMENTS)
    if reason is not None:
        raise ChildCancelled(reason)
    with contextlib.ExitStack() as stack:
        where = debugfs if debugfs is not None else stack.enter_context(mounted(DEBUGFS))
        if where is None:
            raise ChildCancelled("debugfs is not mounted and could not be mounted: no corrupt-pfn or unpoison-pfn")
        yield where


def run_private_seed(*, report: HostReport | None = None, debugfs: Path | None = None) -> Verdict:
    """The seed regression for a private page; ``ChildCancelled`` with the probed reason where the
    host cannot run it (``PRIVATE_REQUIREMENTS``)."""
    with _gate(report, debugfs) as where:
        return _judged(PRIVATE_SEED_NAME, "default", where, row=False)


def run_private_matrix(*, report: HostReport | None = None, debugfs: Path | None = None) -> Verdict:
    """The poison matrix's private column: corrupt-pfn under kill policy early and late, one run
    each (one injection at a time), and the MADV_HWPOISON row NOT MEANINGFUL."""
    with _gate(report, debugfs) as where:
        rows = [_judged(row, row.split(".")[1], where, row=True) for row in PRIVATE_ROWS]
    return judge_private_matrix(rows)
