"""QMP conversions: QEMU's trace lines read back, and a refusal kept as data."""

from __future__ import annotations

from typing import Any

from qmp_helpers.conversions import Conversion, TracedConversion, convert, parse_convert_trace
from qmp_helpers.errors import QmpCommandError


def test_parse_convert_trace_reads_both_directions_and_stamped_lines() -> None:
    text = ("kvm_set_user_memory AddrSpace#0 Slot#2 flags=0x4 gpa=0xc0000 size=0x1ff40000 ua=0x7f ret=0\n"
            "kvm_convert_memory start 0x1f8ff000 size 0x1000 shared_to_private\n"
            "1234@1796559949.087348:kvm_convert_memory start 0x1f8ff000 size 0x1000 private_to_shared\n"
            "qemu-system-x86_64: kvm_convert_memory start 0x1 size 0x1 shared_to_private\n")
    assert parse_convert_trace(text) == [TracedConversion(0x1F8FF000, 0x1000, True),
                                         TracedConversion(0x1F8FF000, 0x1000, False)]


class _Machine:
    """What convert() asks of a QemuMachine: QMP, and QEMU's stderr from a mark on."""

    def __init__(self, error: str | None, trace: str) -> None:
        self.error, self.trace, self.sent = error, trace, []
        self.stderr = ""

    def stderr_mark(self) -> int:
        return len(self.stderr)

    def stderr_since(self, mark: int) -> str:
        return self.stderr[mark:]

    def qmp(self, cmd: str, **arguments: Any) -> Any:
        self.sent.append((cmd, arguments))
        if self.error is not None:
            raise QmpCommandError(cmd, arguments, "GenericError", self.error)
        self.stderr += self.trace
        return {}


def test_convert_keeps_the_trace_line_and_the_times() -> None:
    machine = _Machine(None, "kvm_convert_memory start 0x2000 size 0x1000 shared_to_private\n")
    done = convert(machine, 0x2000, 0x1000, True)  # type: ignore[arg-type]
    assert machine.sent == [("x-kvm-convert-memory", {"gpa": 0x2000, "size": 0x1000, "private": True})]
    assert done.ok and done.traced == (TracedConversion(0x2000, 0x1000, True),) and done.traced_ms is not None


def test_a_refusal_is_data_with_qemus_words_and_no_wait_for_a_trace() -> None:
    machine = _Machine("gpa 0x2800 is not aligned to the page size 0x1000", "")
    done = convert(machine, 0x2800, 0x1000, True, trace_wait_s=30.0)  # type: ignore[arg-type]
    assert done == Conversion(0x2800, 0x1000, True, "gpa 0x2800 is not aligned to the page size 0x1000",
                              done.reply_ms, (), None)
    assert done.reply_ms < 1000 and "refused (gpa 0x2800 is not aligned" in done.describe()


def test_parse_memory_fault_trace_reads_gpa_size_and_flags() -> None:
    from qmp_helpers.conversions import MemoryFaultExit, parse_memory_fault_trace

    text = ("kvm_run_exit cpu_index 0, reason 39\n"
            "kvm_memory_fault start 0x1f8ff000 size 0x1000 flags 0x8\n")
    assert parse_memory_fault_trace(text) == [MemoryFaultExit(0x1F8FF000, 0x1000, 0x8)]
    assert parse_memory_fault_trace(text)[0].describe() == "gpa 0x1f8ff000 size 0x1000 flags 0x8"
