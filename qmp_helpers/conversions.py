"""Shared <-> private conversions of guest memory, driven through QMP, and QEMU's trace of them.

The project's QEMU series (images/patches/qemu) adds ``x-kvm-convert-memory`` (one page-aligned
range, converted by QEMU's own ``kvm_convert_memory()`` as a guest's request would be) and
``x-query-kvm-private-memory`` (the private ranges QEMU records). No released QEMU has either.
One :func:`convert` is one request: QEMU's reply or error text, the time from command to
reply, and the ``kvm_convert_memory`` trace line QEMU wrote for it (the trace event must be on:
:func:`trace_conversions`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Final

from .errors import QmpCommandError
from .machine import QemuMachine
from .trace_log import TRACE_PREFIX

__all__ = ["CONVERT_COMMAND", "CONVERT_TRACE_EVENT", "MEMORY_FAULT_TRACE_EVENT", "QUERY_COMMAND", "Conversion",
           "MemoryFaultExit", "TracedConversion", "convert", "parse_convert_trace", "parse_memory_fault_trace",
           "private_ranges", "trace_conversions"]

CONVERT_COMMAND: Final = "x-kvm-convert-memory"
QUERY_COMMAND: Final = "x-query-kvm-private-memory"
CONVERT_TRACE_EVENT: Final = "kvm_convert_memory"
# accel/kvm/trace-events: kvm_convert_memory(uint64_t start, uint64_t size, const char *msg)
_CONVERT_LINE: Final = re.compile(
    rf"^{TRACE_PREFIX}kvm_convert_memory start (0x[0-9a-f]+) size (0x[0-9a-f]+) "
    r"(shared_to_private|private_to_shared)\s*$", re.MULTILINE)
# accel/kvm/trace-events: kvm_memory_fault(uint64_t start, uint64_t size, uint64_t flags): a
# KVM_EXIT_MEMORY_FAULT as QEMU read it (a conversion request; with the series also an EHWPOISON one).
MEMORY_FAULT_TRACE_EVENT: Final = "kvm_memory_fault"
_FAULT_LINE: Final = re.compile(
    rf"^{TRACE_PREFIX}kvm_memory_fault start (0x[0-9a-f]+) size (0x[0-9a-f]+) flags (0x[0-9a-f]+)\s*$", re.MULTILINE)
# How long QEMU may take to write its trace line after the reply (it writes it before replying).
TRACE_WAIT_S: Final = 2.0


@dataclass(frozen=True)
class TracedConversion:
    """One ``kvm_convert_memory`` line: the range QEMU converted and in which direction."""

    gpa: int
    size: int
    to_private: bool

    def describe(self) -> str:
        return f"{self.gpa:#x}+{self.size:#x} to {'private' if self.to_private else 'shared'}"


@dataclass(frozen=True)
class MemoryFaultExit:
    """A KVM_EXIT_MEMORY_FAULT: the gpa range KVM names and its flags (0x8: KVM_MEMORY_EXIT_FLAG_PRIVATE)."""

    gpa: int
    size: int
    flags: int

    def describe(self) -> str:
        return f"gpa {self.gpa:#x} size {self.size:#x} flags {self.flags:#x}"


def parse_memory_fault_trace(text: str) -> list[MemoryFaultExit]:
    """Pure: every ``kvm_memory_fault`` line of QEMU's trace output, in order."""
    return [MemoryFaultExit(int(m[1], 16), int(m[2], 16), int(m[3], 16)) for m in _FAULT_LINE.finditer(text)]


def parse_convert_trace(text: str) -> list[TracedConversion]:
    """Pure: every ``kvm_convert_memory`` line of QEMU's trace output, in order."""
    return [TracedConversion(int(m[1], 16), int(m[2], 16), m[3] == "shared_to_private")
            for m in _CONVERT_LINE.finditer(text)]


@dataclass(frozen=True)
class Conversion:
    """One ``x-kvm-convert-memory`` request and what came of it."""

    gpa: int
    size: int
    to_private: bool
    error: str | None  # QEMU's error text; None when it converted
    reply_ms: float  # command sent -> reply read
    traced: tuple[TracedConversion, ...]  # QEMU's kvm_convert_memory lines written for it
    traced_ms: float | None  # command sent -> its trace line read (None: no line)

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        what = f"{self.gpa:#x}+{self.size:#x} to {'private' if self.to_private else 'shared'}"
        return f"{what}: {'converted' if self.ok else f'refused ({self.error})'} in {self.reply_ms:.1f} ms"


def trace_conversions(machine: QemuMachine, enable: bool = True) -> None:
    """Switch QEMU's ``kvm_convert_memory`` trace event on (or off)."""
    machine.trace_event_set_state(CONVERT_TRACE_EVENT, enable)


def convert(machine: QemuMachine, gpa: int, size: int, to_private: bool, *,
            trace_wait_s: float = TRACE_WAIT_S) -> Conversion:
    """Ask QEMU to convert ``[gpa, gpa + size)``; a refusal is returned (``error``), not raised.

    After a successful reply the trace line is awaited for up to ``trace_wait_s``; a request QEMU
    refused before converting anything writes none, and none is awaited.
    """
    mark = machine.stderr_mark()
    t0 = time.monotonic()
    error: str | None = None
    try:
        machine.qmp(CONVERT_COMMAND, gpa=gpa, size=size, private=to_private)
    except QmpCommandError as exc:
        error = exc.desc
    reply_ms = (time.monotonic() - t0) * 1000.0
    traced = parse_convert_trace(machine.stderr_since(mark))
    deadline = time.monotonic() + trace_wait_s
    while error is None and not traced and time.monotonic() < deadline:
        time.sleep(0.005)
        traced = parse_convert_trace(machine.stderr_since(mark))
    traced_ms = (time.monotonic() - t0) * 1000.0 if traced else None
    return Conversion(gpa, size, to_private, error, round(reply_ms, 2), tuple(traced),
                      None if traced_ms is None else round(traced_ms, 2))


def private_ranges(machine: QemuMachine) -> tuple[tuple[int, int], ...]:
    """(gpa, size) of every range QEMU records as private, ascending."""
    return tuple((int(r["gpa"]), int(r["size"])) for r in machine.qmp(QUERY_COMMAND))
