"""The seed's regression: poison a guest_memfd page behind a slot with a non-zero offset.

The v11 RFC's ``kvm_gmem_error_page`` reported poison at ``gfn = file index`` and sent one
SIGBUS per 4 KiB page; the review asked for ``gfn = base_gfn + index - pgoff`` and one signal
with ``lsb = PAGE_SHIFT + order``. A host stack answers a guest touch of a poisoned gmem page
under one of two contracts, both accepted here if their addresses follow the layout:

- memory-fault exit: ``KVM_RUN`` returns -1/EHWPOISON with ``exit_reason`` MEMORY_FAULT,
  ``memory_fault.gpa = gfn << 12``, ``size = 4096``, flags 0 or PRIVATE;
- SIGBUS: one ``BUS_MCEERR_AR`` to the vCPU thread with ``si_addr`` = the hva of that gfn
  through the slot's ``userspace_addr`` and ``si_addr_lsb = 12 + order``.

A userspace load from the poisoned page through the guest_memfd mmap must raise one SIGBUS
``BUS_MCEERR_AR`` at its address with the same lsb.

The verdict functions are pure (tested with recorded observations). The live path runs the
VM in a child process (``python -m host_stack.seed_regression guest|user``) watched by the
SIGBUS witness, because a poisoned touch kills the toucher; it needs a kernel with memory
failure and returns a cancel reason, found by a real ``MADV_HWPOISON``, where there is none.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

from host_stack import gmem_layout as gl
from host_stack import kvm_uapi as u

__all__ = [
    "BUS_MCEERR_AR",
    "GuestAccessObservation",
    "MemoryFaultSeen",
    "SeedCancelled",
    "SeedExpectation",
    "SeedRegressionResult",
    "SigbusSeen",
    "Verdict",
    "judge_guest_access",
    "judge_user_touch",
    "run_seed_regression",
]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

BUS_MCEERR_AR: Final = 4  # include/uapi/asm-generic/siginfo.h
BUS_MCEERR_AO: Final = 5  # include/uapi/asm-generic/siginfo.h
SEED_INDEX: Final = 9  # file index behind slot 2 of vmm.DEFAULT_LAYOUT (pgoff 8, base gfn 0x40)
CHILD_TIMEOUT: Final = 60.0


@dataclass(frozen=True)
class SeedExpectation:
    """What the oracle says the host must report for poison at file ``index``."""

    index: int
    order: int
    slot: int
    gfn: int
    gpa: int
    hva: int  # through the slot's userspace_addr (SIGBUS contract for the vCPU)
    user_hva: int  # through the guest_memfd mmap (userspace touch)
    lsb: int
    buggy_gfn: int  # what the v11 RFC would have reported, for the failure message

    @classmethod
    def from_layout(
        cls,
        layout: Sequence[gl.SlotLayout],
        index: int,
        slot_userspace_addr: Mapping[int, int],
        gmem_map_addr: int,
        order: int = 0,
    ) -> SeedExpectation:
        slot = gl.slot_for_index(layout, index)
        gfn = gl.gfn_for_index(layout, index)
        if slot is None or gfn is None:
            raise ValueError(f"file index {index} is bound to no slot of {list(layout)}")
        if slot.slot not in slot_userspace_addr:
            raise ValueError(f"no userspace_addr for slot {slot.slot} in {slot_userspace_addr}")
        gpa = gfn << gl.PAGE_SHIFT
        return cls(
            index=index,
            order=order,
            slot=slot.slot,
            gfn=gfn,
            gpa=gpa,
            hva=gl.hva_for_gpa(slot, slot_userspace_addr[slot.slot], gpa),
            user_hva=gmem_map_addr + index * gl.PAGE_SIZE,
            lsb=gl.expected_lsb(order),
            buggy_gfn=gl.seed_buggy_gfn(index),
        )


@dataclass(frozen=True)
class SigbusSeen:
    """One SIGBUS as recorded (by the witness) on the thread ``tid``."""

    si_code: int
    si_addr: int
    si_addr_lsb: int
    tid: int | None = None


@dataclass(frozen=True)
class MemoryFaultSeen:
    """``kvm_run.memory_fault`` as read after KVM_RUN."""

    gpa: int
    size: int
    flags: int


@dataclass(frozen=True)
class GuestAccessObservation:
    """Everything recorded while the payload touched the poisoned gfn."""

    run_errno: int | None  # errno of KVM_RUN, None if it returned 0 or never returned
    exit_reason: int | None
    memory_fault: MemoryFaultSeen | None
    sigbus: tuple[SigbusSeen, ...] = ()
    vcpu_tid: int | None = None


Contract = Literal["memory_fault_exit", "sigbus"]


@dataclass(frozen=True)
class Verdict:
    """``ok`` plus one message per check, each stating expected and actual."""

    ok: bool
    contract: Contract | None
    messages: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "contract": self.contract, "messages": list(self.messages)}


def _addr_matches(si_addr: int, expected: int, lsb: int) -> bool:
    """The signal names the page itself or the start of the folio containing it."""
    return si_addr in (expected, expected & ~((1 << lsb) - 1))


def _judge_signals(what: str, signals: Sequence[SigbusSeen], hva: int, lsb: int, tid: int | None) -> list[str]:
    problems: list[str] = []
    if len(signals) != 1:
        lsbs = sorted({s.si_addr_lsb for s in signals})
        problems.append(
            f"{what}: expected 1 SIGBUS BUS_MCEERR_AR at {hva:#x} with lsb {lsb}, "
            f"got {len(signals)} (lsb values {lsbs})"
        )
    for sig in signals[:1]:
        if sig.si_code != BUS_MCEERR_AR:
            problems.append(f"{what}: expected si_code BUS_MCEERR_AR ({BUS_MCEERR_AR}), got {sig.si_code}")
        if not _addr_matches(sig.si_addr, hva, lsb):
            problems.append(f"{what}: expected si_addr {hva:#x}, got {sig.si_addr:#x}")
        if sig.si_addr_lsb != lsb:
            problems.append(f"{what}: expected si_addr_lsb {lsb}, got {sig.si_addr_lsb}")
        if tid is not None and sig.tid is not None and sig.tid != tid:
            problems.append(f"{what}: expected delivery to vCPU thread {tid}, got {sig.tid}")
    return problems


def judge_guest_access(exp: SeedExpectation, obs: GuestAccessObservation) -> Verdict:
    """Judge a guest touch of the poisoned gfn under either contract (pure)."""
    mce = [s for s in obs.sigbus if s.si_code in (BUS_MCEERR_AR, BUS_MCEERR_AO)]
    if obs.run_errno is not None and obs.exit_reason == u.KVM_EXIT_MEMORY_FAULT:
        problems: list[str] = []
        if obs.run_errno != u.EHWPOISON:
            problems.append(
                f"memory-fault exit: expected errno EHWPOISON ({u.EHWPOISON}), "
                f"got {errno.errorcode.get(obs.run_errno, obs.run_errno)}"
            )
        mf = obs.memory_fault
        if mf is None:
            problems.append("memory-fault exit: no memory_fault fields recorded")
        else:
            if mf.gpa != exp.gpa:
                hint = " (the v11 RFC's gfn = file index)" if mf.gpa >> 12 == exp.buggy_gfn else ""
                problems.append(
                    f"memory-fault exit: expected gpa {exp.gpa:#x} (gfn {exp.gfn:#x} = base_gfn + "
                    f"index {exp.index} - pgoff), got {mf.gpa:#x}{hint}"
                )
            if mf.size != gl.PAGE_SIZE:
                problems.append(f"memory-fault exit: expected size 4096, got {mf.size}")
            if mf.flags & ~u.KVM_MEMORY_EXIT_FLAG_PRIVATE:
                problems.append(f"memory-fault exit: expected flags 0 or PRIVATE (0x8), got {mf.flags:#x}")
        if mce:  # a host may also signal; if it does, the signal must be right too
            problems += _judge_signals("SIGBUS", mce, exp.hva, exp.lsb, obs.vcpu_tid)
        return Verdict(
            not problems,
            "memory_fault_exit",
            tuple(problems) or (f"memory-fault exit at gpa {exp.gpa:#x} as the oracle predicts",),
        )
    if mce:
        problems = _judge_signals("vCPU SIGBUS", mce, exp.hva, exp.lsb, obs.vcpu_tid)
        wrong_gfn_hva = exp.hva - ((exp.gfn - exp.buggy_gfn) << gl.PAGE_SHIFT)
        if any(s.si_addr == wrong_gfn_hva for s in mce) and wrong_gfn_hva != exp.hva:
            problems.append(
                f"vCPU SIGBUS names the hva of gfn {exp.buggy_gfn:#x} (file index used as gfn), "
                f"expected gfn {exp.gfn:#x}"
            )
        return Verdict(
            not problems,
            "sigbus",
            tuple(problems) or (f"SIGBUS BUS_MCEERR_AR at hva {exp.hva:#x} lsb {exp.lsb} as the oracle predicts",),
        )
    reason = u.EXIT_REASON_NAMES.get(obs.exit_reason, str(obs.exit_reason)) if (obs.exit_reason is not None) else "none"
    err = "0" if obs.run_errno is None else errno.errorcode.get(obs.run_errno, str(obs.run_errno))
    return Verdict(
        False,
        None,
        (
            f"expected KVM_RUN -1/EHWPOISON with MEMORY_FAULT at gpa {exp.gpa:#x} or a SIGBUS "
            f"BUS_MCEERR_AR at hva {exp.hva:#x} lsb {exp.lsb}; got KVM_RUN errno {err}, exit "
            f"{reason}, {len(obs.sigbus)} SIGBUS",
        ),
    )


def judge_user_touch(exp: SeedExpectation, signals: Sequence[SigbusSeen]) -> Verdict:
    """Judge a userspace load of the poisoned page through the guest_memfd mmap (pure)."""
    problems = _judge_signals("userspace touch", signals, exp.user_hva, exp.lsb, None)
    return Verdict(not problems, "sigbus", tuple(problems) or (
        f"SIGBUS BUS_MCEERR_AR at {exp.user_hva:#x} lsb {exp.lsb} as the oracle predicts",
    ))  # fmt: skip


# --- live path --------------------------------------------------------------------------------
class SeedCancelled(RuntimeError):
    """The host cannot run the regression; ``reason`` is a sentence a lab engineer can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SeedRegressionResult:
    expectation: SeedExpectation
    guest: GuestAccessObservation
    guest_verdict: Verdict
    user_signals: tuple[SigbusSeen, ...]
    user_verdict: Verdict
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.guest_verdict.ok and self.user_verdict.ok

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "expectation": asdict(self.expectation),
            "guest": asdict(self.guest),
            "guest_verdict": self.guest_verdict.to_json(),
            "user_signals": [asdict(s) for s in self.user_signals],
            "user_verdict": self.user_verdict.to_json(),
            "evidence": self.evidence,
        }


def _unsupported_reason(exc: BaseException) -> str:
    """The injector's own sentence (it names the missing kernel support), placed in context."""
    return f"{exc} (a real madvise(MADV_HWPOISON) on a guest_memfd page behind a slot with pgoff > 0)"


def _child(mode: Literal["guest", "user"]) -> int:  # pragma: no cover - runs in a child
    """Child side: build the VM, report, wait for 'go', poison the page, touch it.

    Poison is injected only after the parent's witness is attached, so a SIGBUS sent at
    injection time (memory_failure kills mappers of the page) is recorded too; a Python
    SIGBUS handler keeps the child alive through such non-faulting signals. For the
    userspace touch the default action is restored first: a faulting load must not return
    into the handler and retry forever.
    """
    import signal
    import threading
    import time

    from host_stack.kvm import InterruptedExit, KvmSystem, MemoryFaultExit, RunFailedExit
    from host_stack.vmm import PayloadError, TinyVm

    def emit(obj: dict[str, Any]) -> None:
        obj["t_mono_ns"] = time.monotonic_ns()
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    signal.signal(signal.SIGBUS, lambda _signo, _frame: None)
    with KvmSystem() as system, TinyVm(system) as tvm:
        index = SEED_INDEX
        tvm.gmem_map.write_u32(index * gl.PAGE_SIZE, 0x5EED)  # allocate the page first
        emit({
            "event": "ready",
            "layout": [asdict(s) for s in tvm.layout],
            "slot_hva": tvm.slot_hva,
            "gmem_map_addr": tvm.gmem_map.addr,
            "index": index,
            "tid": threading.get_native_id(),
        })  # fmt: skip
        if sys.stdin.readline().strip() != "go":
            return 1
        try:
            from host_stack.injectors import HwpoisonUnsupported, InjectionRefused, MadviseInjector
        except ImportError as exc:
            emit({"event": "unsupported", "reason": f"no poison injector available: {exc}"})
            return 0
        injector = MadviseInjector()
        try:
            record = injector.inject(tvm.gmem_map.addr + index * gl.PAGE_SIZE, gl.PAGE_SIZE)
        except HwpoisonUnsupported as exc:
            emit({"event": "unsupported", "reason": _unsupported_reason(exc)})
            return 0
        except InjectionRefused as exc:
            emit({"event": "refused", "reason": str(exc)})
            return 0
        emit({"event": "injected", "record": asdict(record)})
        if mode == "user":
            signal.signal(signal.SIGBUS, signal.SIG_DFL)
            emit({"event": "touch_start"})
            tvm.gmem_map.read(index * gl.PAGE_SIZE, 8)
            emit({"event": "touched"})
            return 0
        gfn = gl.gfn_for_index(tvm.layout, index)
        assert gfn is not None
        emit({"event": "touch_start"})
        ex = None
        try:
            reads = tvm.read_gfns([gfn])
            emit({"event": "read", "value": reads[0].value})
        except PayloadError as exc:
            ex = exc.exit
            emit({"event": "payload_error", "error": str(exc)})
        if isinstance(ex, MemoryFaultExit):
            emit({
                "event": "run",
                "run_errno": ex.errno,
                "exit_reason": u.KVM_EXIT_MEMORY_FAULT,
                "memory_fault": {"gpa": ex.gpa, "size": ex.size, "flags": ex.flags},
            })  # fmt: skip
        elif isinstance(ex, RunFailedExit):
            emit({"event": "run", "run_errno": ex.errno, "exit_reason": ex.exit_reason})
        elif isinstance(ex, InterruptedExit):
            emit({"event": "run", "run_errno": ex.errno, "exit_reason": u.KVM_EXIT_INTR})
        return 0


def _read_event(proc: subprocess.Popen[str]) -> dict[str, Any] | None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return json.loads(line) if line else None


def _spawn(mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "host_stack.seed_regression", mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    proc.wait(timeout=CHILD_TIMEOUT)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


@dataclass(frozen=True)
class _ChildRun:
    ready: dict[str, Any]
    events: list[dict[str, Any]]
    touch_signals: list[SigbusSeen]  # delivered at or after touch_start
    injection_signals: list[SigbusSeen]  # delivered before (e.g. by memory_failure itself)
    exit_status: int | None
    cleanup: list[str] = field(default_factory=list)


def _observe(mode: Literal["guest", "user"]) -> _ChildRun:
    """Run one child under the SIGBUS witness; SeedCancelled if it cannot poison."""
    from host_stack.witness import SigbusWitness

    proc = _spawn(mode)
    try:
        ready = _read_event(proc)
        if ready is None or ready.get("event") != "ready":
            raise RuntimeError(f"seed child ({mode}) did not report ready: {ready} ")
        events: list[dict[str, Any]] = []
        with SigbusWitness(proc.pid) as witness:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            while (ev := _read_event(proc)) is not None:
                events.append(ev)
                if ev["event"] == "unsupported":
                    raise SeedCancelled(str(ev["reason"]))
                if ev["event"] == "refused":
                    raise RuntimeError(f"the injector's interlock refused the guest_memfd page: {ev['reason']}")
            status = proc.wait(timeout=CHILD_TIMEOUT)
            records = witness.records
        touch_t = next((e["t_mono_ns"] for e in events if e["event"] == "touch_start"), None)
        touch: list[SigbusSeen] = []
        early: list[SigbusSeen] = []
        for r in records:
            seen = SigbusSeen(r.si_code, r.si_addr, r.si_addr_lsb, r.tid)
            (touch if touch_t is not None and r.t_mono_ns >= touch_t else early).append(seen)
        return _ChildRun(ready, events, touch, early, status, _unpoison(events))
    finally:
        _stop(proc)


def _unpoison(events: Sequence[Mapping[str, Any]]) -> list[str]:
    """Unpoison the child's page once it is gone, where the kernel allows; say what happened."""
    from host_stack.injectors import InjectionRecord, MadviseInjector

    injector = MadviseInjector()
    for ev in events:
        if ev["event"] == "injected":
            fields = dict(ev["record"])
            fields["flags_before"] = tuple(fields.get("flags_before", ()))
            injector.records.append(InjectionRecord(**fields))
    return [rec.cleanup for rec in injector.cleanup()]


def run_seed_regression(order: int = 0) -> SeedRegressionResult:
    """Live regression; raises ``SeedCancelled`` with the probed reason where it cannot run."""
    guest_run = _observe("guest")
    layout = [gl.SlotLayout(**s) for s in guest_run.ready["layout"]]

    def expectation(ready: Mapping[str, Any]) -> SeedExpectation:
        return SeedExpectation.from_layout(
            layout,
            int(ready["index"]),
            {int(k): int(v) for k, v in ready["slot_hva"].items()},
            int(ready["gmem_map_addr"]),
            order,
        )

    exp = expectation(guest_run.ready)
    run = next((e for e in guest_run.events if e["event"] == "run"), None)
    mf = run.get("memory_fault") if run else None
    guest = GuestAccessObservation(
        run_errno=run["run_errno"] if run else None,
        exit_reason=run["exit_reason"] if run else None,
        memory_fault=MemoryFaultSeen(**mf) if mf else None,
        sigbus=tuple(guest_run.touch_signals),
        vcpu_tid=int(guest_run.ready["tid"]),
    )
    user_run = _observe("user")
    return SeedRegressionResult(
        exp,
        guest,
        judge_guest_access(exp, guest),
        tuple(user_run.touch_signals),
        judge_user_touch(expectation(user_run.ready), user_run.touch_signals),
        {
            "guest_events": guest_run.events,
            "guest_injection_signals": [asdict(s) for s in guest_run.injection_signals],
            "user_events": user_run.events,
            "user_injection_signals": [asdict(s) for s in user_run.injection_signals],
            "user_exit_status": user_run.exit_status,
            "cleanup": guest_run.cleanup + user_run.cleanup,
        },
    )


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 2 or sys.argv[1] not in ("guest", "user"):
        sys.stderr.write("usage: python -m host_stack.seed_regression guest|user\n")
        sys.exit(2)
    sys.exit(_child("guest" if sys.argv[1] == "guest" else "user"))
