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

import re
from dataclasses import dataclass
from typing import Final

from host_stack.kprobe_group import KprobeGroup
from host_stack.kvm_uapi import errno_name

__all__ = ["GmemFault", "GmemFaultTrace", "KvmRunReturn", "parse_gmem_faults", "parse_run_returns"]

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


class GmemFaultTrace(KprobeGroup):
    """guest_memfd's answers and KVM_RUN's returns for thread ``tid`` while the context is open."""

    def __init__(self, tid: int) -> None:
        only = f"common_pid == {tid}"
        super().__init__({"gmem_get": f"p {_FUNC} gfn=%dx:x64", "gmem_ret": f"r {_FUNC} ret=$retval:s32"},
                         probe_filter=only, tracepoints={"kvm/kvm_userspace_exit": only},
                         why="is kvm loaded with guest_memfd?")
        self.tid = tid

    def faults(self) -> list[GmemFault]:
        return parse_gmem_faults(self.text())

    def run_returns(self) -> list[KvmRunReturn]:
        return parse_run_returns(self.text())
