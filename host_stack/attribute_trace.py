"""KVM's own record of memory-attribute changes: the host kernel's view of every conversion.

``kvm:kvm_vm_set_mem_attributes`` (virt/kvm/kvm_main.c, Linux >= 6.8) fires for each
``KVM_SET_MEMORY_ATTRIBUTES`` KVM carries out, with the gfn range and the new attributes. It says
what KVM did, independently of what QEMU reports it asked for; the thread that asked is the
event's pid. Read in a private tracefs instance (``trace_instance``) while a conversion runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from host_stack.kvm_uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE
from host_stack.trace_instance import TraceInstance

__all__ = ["ATTRIBUTE_EVENT", "AttributeChange", "AttributeTrace", "parse_attribute_changes"]

ATTRIBUTE_EVENT: Final = "kvm/kvm_vm_set_mem_attributes"
_PAGE_SHIFT: Final = 12
# print fmt: "%#016llx -- %#016llx [0x%lx]", REC->start, REC->end, REC->attr; the line starts
# with the task's comm-pid.
_LINE: Final = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+\[\d+\].*?kvm_vm_set_mem_attributes: "
    r"(?P<start>0x[0-9a-f]+) -- (?P<end>0x[0-9a-f]+) \[(?P<attr>0x[0-9a-f]+)\]", re.MULTILINE)


@dataclass(frozen=True)
class AttributeChange:
    """KVM set ``attributes`` on gfns ``[start_gfn, end_gfn)`` for thread ``pid``."""

    pid: int
    comm: str
    start_gfn: int
    end_gfn: int
    attributes: int

    @property
    def gpa(self) -> int:
        return self.start_gfn << _PAGE_SHIFT

    @property
    def size(self) -> int:
        return (self.end_gfn - self.start_gfn) << _PAGE_SHIFT

    @property
    def private(self) -> bool:
        return bool(self.attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def describe(self) -> str:
        return f"{self.gpa:#x}+{self.size:#x} attributes {self.attributes:#x} ({self.comm}-{self.pid})"


def parse_attribute_changes(text: str) -> list[AttributeChange]:
    """Pure: every ``kvm_vm_set_mem_attributes`` line of a trace buffer, in order."""
    return [AttributeChange(int(m["pid"]), m["comm"].strip(), int(m["start"], 16), int(m["end"], 16),
                            int(m["attr"], 16)) for m in _LINE.finditer(text)]


class AttributeTrace(TraceInstance):
    """The attribute changes KVM makes while open (every VM of this kernel: run one at a time)."""

    def __init__(self) -> None:
        super().__init__({ATTRIBUTE_EVENT: ""})
        self._seen = 0

    def changes(self) -> list[AttributeChange]:
        """Every change since the trace was opened."""
        return parse_attribute_changes(self.text())

    def new_changes(self) -> list[AttributeChange]:
        """The changes since the last call (or since opened)."""
        changes = self.changes()
        fresh, self._seen = changes[self._seen:], len(changes)
        return fresh
