"""Child program that really receives a SIGBUS with known fields (driven by test_witness.py).

Usage: sigbus_child.py KIND THREADING HANDLER
  KIND       gmem (touch a guest_memfd MMAP mapping made without INIT_SHARED) or
             truncated (touch the page past the end of a one-page file mapping)
  THREADING  main (main thread faults), thread (a thread that exists before the witness
             attaches faults), clone (a thread created after "go" faults)
  HANDLER    handler (SA_SIGINFO handler prints the siginfo and exits 42) or none

Protocol: prints one JSON line {"event": "ready", "addr": <va that will fault>}, waits for a
line on stdin, then faults; a thread that faults first prints {"event": "worker", "tid": N}.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import tempfile
import threading

from host_stack import kvm_uapi as u
from host_stack import mm_uapi as m
from host_stack.kvm import PAGE_SIZE, HostMapping, KvmSystem


class Sigaction(ctypes.Structure):
    """glibc's struct sigaction on x86_64."""

    _fields_ = (
        ("sa_sigaction", ctypes.c_void_p),
        ("sa_mask", ctypes.c_ulong * 16),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    )


HANDLER_T = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def emit(obj: dict[str, object]) -> None:
    os.write(1, (json.dumps(obj) + "\n").encode())


def on_sigbus(signo: int, info: int, _ctx: int) -> None:
    raw = ctypes.string_at(info, m.SIGINFO_SIZE)
    emit(
        {
            "event": "sigbus",
            "si_signo": int.from_bytes(raw[0:4], "little", signed=True),
            "si_code": int.from_bytes(raw[8:12], "little", signed=True),
            "si_addr": int.from_bytes(raw[16:24], "little"),
            "si_addr_lsb": int.from_bytes(raw[24:26], "little", signed=True),
            "tid": threading.get_native_id(),
        }
    )
    os._exit(42)


_HANDLER = HANDLER_T(on_sigbus)


def install_handler() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    act = Sigaction()
    act.sa_sigaction = ctypes.cast(_HANDLER, ctypes.c_void_p).value
    act.sa_flags = m.SA_SIGINFO
    if libc.sigaction(m.SIGBUS, ctypes.byref(act), None) != 0:
        raise OSError(ctypes.get_errno(), "sigaction(SIGBUS)")


def main() -> None:
    kind, threading_mode, handler = sys.argv[1:4]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a deliberate crash leaves no core file
    if handler == "handler":
        install_handler()
    keep: list[object] = []
    if kind == "gmem":
        kvm = KvmSystem()
        vm = kvm.create_vm()
        gmem = vm.create_guest_memfd(4 * PAGE_SIZE, u.GUEST_MEMFD_FLAG_MMAP)
        mapping = gmem.mmap()
        keep += [kvm, vm, gmem]
        addr = mapping.addr + PAGE_SIZE
    elif kind == "truncated":
        with tempfile.TemporaryFile() as f:
            f.write(b"x" * PAGE_SIZE)
            f.flush()
            mapping = HostMapping.map(2 * PAGE_SIZE, fd=f.fileno(), description="truncated")
        addr = mapping.addr + PAGE_SIZE
    else:
        raise SystemExit(f"unknown kind {kind!r}")

    def touch() -> None:
        emit({"event": "worker", "tid": threading.get_native_id()})
        ctypes.c_char.from_address(addr).value  # noqa: B018  the faulting load

    go = threading.Event()

    def worker() -> None:
        go.wait()
        touch()

    if threading_mode == "thread":
        t = threading.Thread(target=worker)
        t.start()
    emit({"event": "ready", "addr": addr, "pid": os.getpid()})
    sys.stdin.readline()
    if threading_mode == "main":
        touch()
    elif threading_mode == "thread":
        go.set()
        t.join()
    elif threading_mode == "clone":
        go.set()
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    emit({"event": "survived"})


if __name__ == "__main__":
    main()
