"""What KVM did with a vCPU's access to a private page: the host kernel's view of a memory-fault exit.

For a private gfn KVM asks guest_memfd for the page (``kvm_gmem_get_pfn``, virt/kvm/guest_memfd.c);
a poisoned page makes it fail with -EHWPOISON, and KVM_RUN returns that error to userspace with a
``KVM_EXIT_MEMORY_FAULT`` exit instead of sending a SIGBUS. Three records, in one private tracefs
instance and in time order, filtered to the vCPU thread:

- a kprobe on ``kvm_gmem_get_pfn``'s entry with its gfn (third argument, %dx on x86_64);
- a kretprobe on it with the return value;
- ``kvm:kvm_userspace_exit``: KVM_RUN's return, "reason error (133)" for -EHWPOISON (the exit
  reason itself is not printed when errno is negative).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from host_stack import mm_uapi as m
from host_stack.kernelfs import TRACEFS, mounted
from host_stack.kvm_uapi import errno_name
from host_stack.trace_instance import TraceError, TraceInstance

__all__ = ["GmemFault", "GmemFaultTrace", "KvmRunReturn", "parse_gmem_faults", "parse_run_returns"]

_SERIAL: Final = itertools.count()
_FUNC: Final = "kvm:kvm_gmem_get_pfn"
_ENTRY: Final = re.compile(r"-(\d+)\s+\[\d+\][^\n]*?: gmem_get: \([^)]*\) gfn=(0x[0-9a-f]+)")
_RETURN: Final = re.compile(r"-(\d+)\s+\[\d+\][^\n]*?: gmem_ret: \([^)]*\) ret=(-?\d+)")
# include/trace/events/kvm.h: TP_printk("reason %s (%d)", errno < 0 ? ("restart"|"error") : name, |errno| or reason)
_EXIT: Final = re.compile(r"-(\d+)\s+\[\d+\][^\n]*?kvm_userspace_exit: reason (\S+) \((\d+)\)")


@dataclass(frozen=True)
class GmemFault:
    """guest_memfd's answer to KVM for one private gfn the vCPU thread ``tid`` touched."""

    tid: int
    gfn: int
    ret: int  # 0, or -errno (-EHWPOISON for a poisoned page)

    def describe(self) -> str:
        what = "ok" if self.ret >= 0 else f"-{errno_name(-self.ret)}"
        return f"kvm_gmem_get_pfn(gfn {self.gfn:#x}) = {what} (thread {self.tid})"


@dataclass(frozen=True)
class KvmRunReturn:
    """One return of KVM_RUN to userspace: "error" with the errno, or the exit reason's name and number."""

    tid: int
    what: str  # "error", "restart" or the exit reason's name
    number: int  # the errno for "error"/"restart", else the exit reason

    def describe(self) -> str:
        if self.what == "error":
            return f"KVM_RUN failed with {errno_name(self.number)} (thread {self.tid})"
        return f"KVM_RUN returned, exit reason {self.what} ({self.number}) (thread {self.tid})"


def parse_gmem_faults(text: str) -> list[GmemFault]:
    """Pure: each kvm_gmem_get_pfn entry paired with the next return of the same thread."""
    found: list[GmemFault] = []
    open_calls: dict[int, int] = {}
    for line in text.splitlines():
        if (entry := _ENTRY.search(line)) is not None:
            open_calls[int(entry[1])] = int(entry[2], 16)
        elif (ret := _RETURN.search(line)) is not None and int(ret[1]) in open_calls:
            found.append(GmemFault(int(ret[1]), open_calls.pop(int(ret[1])), int(ret[2])))
    return found


def parse_run_returns(text: str) -> list[KvmRunReturn]:
    """Pure: every kvm_userspace_exit line."""
    return [KvmRunReturn(int(mt[1]), mt[2], int(mt[3])) for mt in _EXIT.finditer(text)]


class GmemFaultTrace:
    """guest_memfd's answers and KVM_RUN's returns for thread ``tid`` while the context is open."""

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self.group = f"gmemtest_{os.getpid()}_{next(_SERIAL)}_gmem"
        self._stack = contextlib.ExitStack()
        self._events: Path | None = None
        self._instance: TraceInstance | None = None

    def _write(self, line: str) -> None:
        assert self._events is not None
        fd = os.open(self._events, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def __enter__(self) -> Self:
        try:
            tracefs = self._stack.enter_context(mounted(TRACEFS))
            if tracefs is None:
                raise TraceError(0, "tracefs is not available: cannot probe kvm_gmem_get_pfn")
            self._events = tracefs / m.TRACEFS_KPROBE_EVENTS
            self._stack.callback(self._remove)
            probes = (f"p:{self.group}/gmem_get {_FUNC} gfn=%dx:x64",
                      f"r:{self.group}/gmem_ret {_FUNC} ret=$retval:s32")
            for probe in probes:
                try:
                    self._write(probe + "\n")
                except OSError as exc:
                    raise TraceError(exc.errno, f"the kernel refused the kprobe {probe!r} ({exc.strerror}); is "
                                                "kvm loaded with guest_memfd?") from exc
            only = f"common_pid == {self.tid}"
            self._instance = self._stack.enter_context(TraceInstance(
                {f"{self.group}/gmem_get": only, f"{self.group}/gmem_ret": only, "kvm/kvm_userspace_exit": only}))
        except BaseException:
            self._stack.close()
            raise
        return self

    def text(self) -> str:
        return "" if self._instance is None else self._instance.text()

    def faults(self) -> list[GmemFault]:
        return parse_gmem_faults(self.text())

    def run_returns(self) -> list[KvmRunReturn]:
        return parse_run_returns(self.text())

    def _remove(self) -> None:
        for name in ("gmem_get", "gmem_ret"):
            with contextlib.suppress(OSError):
                self._write(f"-:{self.group}/{name}\n")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stack.close()
