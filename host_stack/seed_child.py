"""The seed regression's child program: build the VM, poison the seed's page, touch it, report JSON lines.

Runs as ``python -m host_stack.seed_child guest|user`` (started by ``host_stack.seed_regression``
under the SIGBUS witness, because a poisoned touch kills the toucher). Every event is one JSON
line on stdout with ``t_mono_ns``; the parent's ``go`` on stdin starts the injection.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal

from host_stack import gmem_layout as gl
from host_stack import kvm_uapi as u
from host_stack.seed_oracle import SEED_INDEX

if TYPE_CHECKING:
    from collections.abc import Callable

    from host_stack.vmm import TinyVm

__all__: list[str] = []


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

    from host_stack.kvm import KvmSystem
    from host_stack.vmm import GmemUnsupported, TinyVm

    def emit(obj: dict[str, Any]) -> None:
        obj["t_mono_ns"] = time.monotonic_ns()
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    signal.signal(signal.SIGBUS, lambda _signo, _frame: None)
    with KvmSystem() as system:
        try:
            tvm = TinyVm(system)
        except GmemUnsupported as exc:
            emit({"event": "unsupported", "reason": str(exc)})
            return 0
        with tvm:
            return _child_run(mode, tvm, emit)


def _child_run(
    mode: Literal["guest", "user"], tvm: TinyVm, emit: Callable[[dict[str, Any]], None]
) -> int:  # pragma: no cover - runs in a child
    """Child side, with the VM built: report ready, wait for 'go', poison, touch."""
    import signal
    import threading

    from host_stack.kvm import InterruptedExit, MemoryFaultExit, RunFailedExit
    from host_stack.vmm import PayloadError

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


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 2 or sys.argv[1] not in ("guest", "user"):
        sys.stderr.write("usage: python -m host_stack.seed_child guest|user\n")
        sys.exit(2)
    sys.exit(_child("guest" if sys.argv[1] == "guest" else "user"))
