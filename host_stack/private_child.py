"""The private-poison child program: a software-protected VM whose private pages the parent poisons.

Runs as ``python -m host_stack.private_child KILL`` (``early``, ``late`` or ``default``: the
machine-check kill policy it sets, ``default`` leaves the process's own) and is started by
``host_stack.private_poison`` under the SIGBUS witness. It builds a type-1 VM through the tiny
VMM (the 3-slot layout at guest_memfd offsets 2, 8, 16, no host mapping of the guest_memfd),
makes one gfn of each slot private, and lets KVM name the frames behind them in two fault
rounds (``private_frames.SpteTrace``): the guest writes a pattern to each private gfn, the
attributes go private -> shared -> private, the guest reads them back. It reports all of it as
``ready`` and then serves the parent's commands, one JSON line each:

- ``touch``: the vCPU reads the seed's gfn (``run``: how KVM_RUN ended), then every other gfn
  (``after``: the private ones must still hold their patterns, the shared ones their decoys);
- ``punch``: punch the seed's page out of the guest_memfd (``punched``), which clean-up needs;
- ``end``: exit.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final

from host_stack import gmem_layout as gl
from host_stack import kvm_uapi as u
from host_stack import mm_uapi as m
from host_stack.seed_oracle import SEED_INDEX

if TYPE_CHECKING:
    from types import FrameType

    from host_stack.vmm import TinyVm

__all__ = ["KILL_POLICIES"]

KILL_POLICIES: Final = ("early", "late", "default")


def _ignore(_signo: int, _frame: FrameType | None) -> None:
    """A SIGBUS handler that keeps the child alive to report (the witness records the signal)."""


def _emit(obj: dict[str, Any]) -> None:
    obj["t_mono_ns"] = time.monotonic_ns()
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _set_kill_policy(kill: str) -> int:  # pragma: no cover - runs in a child
    libc = ctypes.CDLL(None, use_errno=True)
    if kill != "default":
        policy = m.PR_MCE_KILL_EARLY if kill == "early" else m.PR_MCE_KILL_LATE
        if libc.prctl(m.PR_MCE_KILL, m.PR_MCE_KILL_SET, policy, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_MCE_KILL_SET, {kill}): {os.strerror(err)}")
    return int(libc.prctl(m.PR_MCE_KILL_GET, 0, 0, 0, 0))


def _fault_rounds(tvm: TinyVm, gfns: tuple[int, ...], tid: int) -> dict[str, Any]:  # pragma: no cover - child
    """The two fault rounds KVM names the frames in, and what the guest wrote and read back."""
    from host_stack.private_frames import SpteTrace
    from host_stack.vmm import guest_pattern

    with SpteTrace(tid) as trace:
        written = tvm.write_gfns([(g, guest_pattern(g)) for g in gfns])
        first = trace.take()
        tvm.set_private(gfns, private=False)  # zaps the mappings; the guest_memfd keeps its pages
        tvm.set_private(gfns)
        back = tvm.read_gfns(gfns)
        second = trace.take()
    return {"rounds": [[asdict(r) for r in first], [asdict(r) for r in second]],
            "read_back": {f"{w.gfn:#x}": [w.value, b.value] for w, b in zip(written, back, strict=True)}}


def _touch(tvm: TinyVm, gfn: int, others: list[int]) -> None:  # pragma: no cover - runs in a child
    from host_stack.kvm import MemoryFaultExit, RunFailedExit
    from host_stack.vmm import PayloadError

    _emit({"event": "touch_start", "gfn": gfn})
    try:
        reads = tvm.read_gfns([gfn])
        _emit({"event": "run", "run_errno": None, "exit_reason": None, "value": reads[0].value})
    except PayloadError as exc:
        ex = exc.exit
        if isinstance(ex, MemoryFaultExit):
            _emit({"event": "run", "run_errno": ex.errno, "exit_reason": u.KVM_EXIT_MEMORY_FAULT,
                   "memory_fault": {"gpa": ex.gpa, "size": ex.size, "flags": ex.flags}})
        elif isinstance(ex, RunFailedExit):
            _emit({"event": "run", "run_errno": ex.errno, "exit_reason": ex.exit_reason})
        else:
            _emit({"event": "run", "run_errno": None, "exit_reason": None, "error": str(exc)})
    try:
        after = tvm.read_gfns(others)
        _emit({"event": "after", "values": {f"{r.gfn:#x}": r.value for r in after}})
    except PayloadError as exc:
        _emit({"event": "after", "error": str(exc)})


def _serve(tvm: TinyVm, gfn: int, index: int, others: list[int]) -> None:  # pragma: no cover - runs in a child
    for line in sys.stdin:
        command = line.strip()
        if command == "touch":
            _touch(tvm, gfn, others)
        elif command == "punch":
            err = 0
            try:
                tvm.gmem.punch_hole(index * gl.PAGE_SIZE, gl.PAGE_SIZE)
            except OSError as exc:
                err = exc.errno or errno.EIO
            _emit({"event": "punched", "errno": err})
        elif command == "end":
            return


def _child(kill: str) -> int:  # pragma: no cover - runs in a child
    from host_stack.kvm import KvmSystem
    from host_stack.vmm import GmemUnsupported, TinyVm, private_gfns

    signal.signal(signal.SIGBUS, _ignore)
    tid = threading.get_native_id()
    with KvmSystem() as system:
        try:
            tvm = TinyVm(system, vm_type=u.KVM_X86_SW_PROTECTED_VM, backing="decoy", markers=False)
        except (GmemUnsupported, OSError) as exc:
            _emit({"event": "unsupported", "reason": f"a software-protected VM with a guest_memfd: {exc}"})
            return 0
        with tvm:
            kill_get = _set_kill_policy(kill)
            private = private_gfns(tvm.layout)
            gfn = gl.gfn_for_index(tvm.layout, SEED_INDEX)
            if gfn is None or gfn not in private:
                raise AssertionError(f"the seed's index {SEED_INDEX} is behind no private gfn of {tvm.layout}")
            tvm.set_private(private)
            rounds = _fault_rounds(tvm, private, tid)
            _emit({"event": "ready", "layout": [asdict(s) for s in tvm.layout], "slot_hva": tvm.slot_hva,
                   "index": SEED_INDEX, "gfn": gfn, "private": list(private), "pid": os.getpid(), "tid": tid,
                   "kill": kill, "kill_get": kill_get, **rounds})
            _serve(tvm, gfn, SEED_INDEX, [g for g in tvm.all_gfns() if g != gfn])
    return 0


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 2 or sys.argv[1] not in KILL_POLICIES:
        sys.stderr.write(f"usage: python -m host_stack.private_child {'|'.join(KILL_POLICIES)}\n")
        sys.exit(2)
    sys.exit(_child(sys.argv[1]))
