"""The poison matrix's child program: one row's VM, its page mapped and dirtied as the row says.

Runs as ``python -m host_stack.matrix_child ROW_ID`` (started by ``host_stack.poison_matrix``).
It builds a VM with one guest_memfd bound to a slot with pgoff > 0 (``vmm.TinyVm``, no markers,
decoy ``userspace_addr``), maps and dirties the page as the row says, sets the row's kill
policy and reports the frame (who maps it, where, its pfn) as a ``ready`` JSON line. For an
*unmapped* row it maps nothing of the guest_memfd; a forked helper (kill policy late) maps the
page, so the frame can still be proven and ``MADV_HWPOISON`` still has a caller that maps it.
Then it serves the parent's commands: ``inject`` (madvise rows: by whoever maps the page) and
``touch`` (the vCPU reads the gfn; a mapped row then loads from the page in userspace).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TextIO

from host_stack import gmem_layout as gl
from host_stack import kvm_uapi as u
from host_stack import mm_uapi as m
from host_stack.injectors import HwpoisonUnsupported, InjectionRefused, MadviseInjector
from host_stack.kvm import HostMapping, KvmSystem, MemoryFaultExit, RunFailedExit
from host_stack.matrix_oracle import KillPolicy, MatrixRow, row_by_id
from host_stack.pagemap import read_kpageflags, read_pagemap
from host_stack.seed_oracle import SEED_INDEX
from host_stack.vmm import GmemUnsupported, PayloadError, TinyVm

if TYPE_CHECKING:
    from types import FrameType

__all__: list[str] = []

_libc = ctypes.CDLL(None, use_errno=True)
_OFFSET = SEED_INDEX * gl.PAGE_SIZE  # the page's offset in the guest_memfd


def _ignore(_signo: int, _frame: FrameType | None) -> None:
    """A SIGBUS handler that lets the process live through AO/AR sent at injection."""


def _emit(obj: dict[str, Any]) -> None:
    obj["t_mono_ns"] = time.monotonic_ns()
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _set_kill_policy(kill: KillPolicy) -> int:
    """prctl(PR_MCE_KILL, SET, EARLY/LATE); returns PR_MCE_KILL_GET's answer as proof."""
    policy = m.PR_MCE_KILL_EARLY if kill == "early" else m.PR_MCE_KILL_LATE
    if _libc.prctl(m.PR_MCE_KILL, m.PR_MCE_KILL_SET, policy, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_MCE_KILL_SET, {kill}): {os.strerror(err)}")
    return int(_libc.prctl(m.PR_MCE_KILL_GET, 0, 0, 0, 0))


def _touch(mapping: HostMapping, offset: int, dirty: bool) -> None:
    if dirty:
        mapping.write_u32(offset, 0xD1 << 24 | SEED_INDEX)
    else:
        mapping.read_u32(offset)  # a read fault: INIT_SHARED allocates a zeroed, clean page


def _mapper(gmem_fd: int, row: MatrixRow, cmd_fd: int, evt_fd: int) -> None:  # pragma: no cover - forked
    """Forked helper of an unmapped row: maps the page (kill policy late), injects for madvise."""
    signal.signal(signal.SIGBUS, _ignore)
    out = os.fdopen(evt_fd, "w")
    _set_kill_policy("late")
    mapping = HostMapping.map(gl.PAGE_SIZE, fd=gmem_fd, offset=_OFFSET, description="mapper view")
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


@dataclass(frozen=True)
class _Frame:
    """Who maps the row's page and where; for an unmapped row, the forked mapper and its pipes."""

    target_pid: int
    va: int
    mapper_pid: int | None = None
    cmd_w: TextIO | None = None
    evt_r: TextIO | None = None


def _map_page(row: MatrixRow, tvm: TinyVm) -> _Frame:  # pragma: no cover - runs in a child
    """Map and dirty the page as the row says: here (mapped row) or in a forked mapper."""
    if row.mapped:
        _touch(tvm.gmem_map, _OFFSET, row.dirty)
        return _Frame(os.getpid(), tvm.gmem_map.addr + _OFFSET)
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
    return _Frame(int(hello["pid"]), int(hello["va"]), mapper_pid, cmd_w, evt_r)


def _report_ready(tvm: TinyVm, frame: _Frame, kill_get: int) -> int | None:  # pragma: no cover - runs in a child
    """Report the layout and the frame (pid, va, pfn, kpageflags) as 'ready'; returns the pfn."""
    entry = read_pagemap(frame.va, frame.target_pid)
    _emit({
        "event": "ready", "layout": [asdict(s) for s in tvm.layout], "slot_hva": tvm.slot_hva,
        "index": SEED_INDEX, "tid": threading.get_native_id(), "target_pid": frame.target_pid, "va": frame.va,
        "pfn": entry.pfn, "mapper_pid": frame.mapper_pid, "kill_get": kill_get,
        "flags_before": list(read_kpageflags(entry.pfn).names) if entry.pfn is not None else [],
    })  # fmt: skip
    return entry.pfn


def _inject_here(va: int, pfn: int | None) -> bool:  # pragma: no cover - runs in a child
    """MADV_HWPOISON by this process, which maps the page; False: it could not (reported)."""
    try:
        rec = MadviseInjector().inject(va, gl.PAGE_SIZE, [int(pfn or -1)])
    except HwpoisonUnsupported as exc:
        _emit({"event": "unsupported", "reason": str(exc)})
        return False
    except InjectionRefused as exc:
        _emit({"event": "refused", "reason": str(exc)})
        return False
    _emit({"event": "injected", "record": asdict(rec)})
    return True


def _inject_by_mapper(frame: _Frame) -> bool:  # pragma: no cover - runs in a child
    """MADV_HWPOISON by the forked mapper of an unmapped row; False: it could not (reported)."""
    assert frame.cmd_w is not None and frame.evt_r is not None
    frame.cmd_w.write("inject\n")
    frame.cmd_w.flush()
    answer = json.loads(frame.evt_r.readline())
    if "unsupported" in answer:
        _emit({"event": "unsupported", "reason": answer["unsupported"]})
        return False
    if "error" in answer:
        _emit({"event": "refused", "reason": f"mapper: {answer['error']}"})
        return False
    _emit({"event": "injected", "record": answer["record"]})
    return True


def _serve_until_touch(row: MatrixRow, frame: _Frame, pfn: int | None) -> bool:  # pragma: no cover - child
    """The command loop: 'inject' (madvise, by whoever maps the page) until 'touch' or the end of
    stdin (True); False when an injection could not be made (reported)."""
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "inject":
            if not (_inject_here(frame.va, pfn) if row.mapped else _inject_by_mapper(frame)):
                return False
        elif cmd == "touch":
            break
    return True


def _vcpu_touch(tvm: TinyVm) -> None:  # pragma: no cover - runs in a child
    """The vCPU reads the page's gfn; reports how KVM_RUN ended."""
    gfn = gl.gfn_for_index(tvm.layout, SEED_INDEX)
    assert gfn is not None
    _emit({"event": "touch_start"})
    try:
        tvm.read_gfns([gfn])
        _emit({"event": "run", "run_errno": None, "exit_reason": None, "note": "the read succeeded"})
    except PayloadError as exc:
        ex = exc.exit
        if isinstance(ex, MemoryFaultExit):
            _emit({"event": "run", "run_errno": ex.errno, "exit_reason": u.KVM_EXIT_MEMORY_FAULT,
                   "memory_fault": {"gpa": ex.gpa, "size": ex.size, "flags": ex.flags}})  # fmt: skip
        elif isinstance(ex, RunFailedExit):
            _emit({"event": "run", "run_errno": ex.errno, "exit_reason": ex.exit_reason})
        else:
            _emit({"event": "run", "run_errno": None, "exit_reason": None, "error": str(exc)})


def _release_mapper(frame: _Frame) -> None:  # pragma: no cover - runs in a child
    """EOF on its command pipe: the forked mapper exits; reap it."""
    if frame.mapper_pid is None:
        return
    assert frame.cmd_w is not None
    frame.cmd_w.close()
    os.waitpid(frame.mapper_pid, 0)
    _emit({"event": "mapper_gone", "pid": frame.mapper_pid})


def _user_touch(tvm: TinyVm) -> None:  # pragma: no cover - runs in a child
    """A userspace load from the page through this process's mapping."""
    _emit({"event": "user_touch_start"})
    signal.signal(signal.SIGBUS, signal.SIG_DFL)  # a faulting load must not retry forever
    tvm.gmem_map.read(_OFFSET, 8)
    _emit({"event": "user_touched"})


def _child_run(row: MatrixRow, tvm: TinyVm) -> int:  # pragma: no cover - runs in a child
    """With the VM built: map per row, set the kill policy, report the frame, inject, touch."""
    frame = _map_page(row, tvm)
    kill_get = _set_kill_policy(row.kill)  # after the fork: the mapper keeps "late"
    pfn = _report_ready(tvm, frame, kill_get)
    if not _serve_until_touch(row, frame, pfn):
        return 0
    _vcpu_touch(tvm)
    _release_mapper(frame)
    if row.mapped:
        _user_touch(tvm)
    return 0


def _child(row: MatrixRow) -> int:  # pragma: no cover - runs in a child
    """Row child: build the VM, map/dirty per row, report the frame, then inject/touch on command."""
    signal.signal(signal.SIGBUS, _ignore)  # survive AO/AR sent at injection
    with KvmSystem() as system:
        try:
            tvm = TinyVm(system, backing="decoy", markers=False)
        except GmemUnsupported as exc:
            _emit({"event": "unsupported", "reason": str(exc)})
            return 0
        with tvm:
            return _child_run(row, tvm)


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m host_stack.matrix_child ROW_ID\n")
        sys.exit(2)
    sys.exit(_child(row_by_id(sys.argv[1])))
