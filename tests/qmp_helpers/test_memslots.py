"""QEMU's memslot registrations (kvm_set_user_memory trace lines) read back into KVM's slot table.

The line format is the one printed by QEMU 10.0.2 and 11.1.3 (the format string in both binaries);
the sequence imitates a q35 boot: low RAM split around the VGA window and re-registered when the
firmware moves PAM, a failed call, an SMM address-space alias, and a slot deleted for good.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qmp_helpers.memslots import (
    MEMSLOT_TRACE_ARGS,
    MemslotRegistration,
    live_memslots,
    memslot_for_gpa,
    parse_memslot_registrations,
)

UA = 0x7F2E40000000


def line(as_id: int, slot: int, gpa: int, size: int, ua: int, *, fd: int = -1, off: int = 0, ret: int = 0,
         flags: int = 0, prefix: str = "") -> str:
    return (f"{prefix}kvm_set_user_memory AddrSpace#{as_id} Slot#{slot} flags={flags:#x} gpa={gpa:#x} size={size:#x} "
            f"ua={ua:#x} guest_memfd={fd} guest_memfd_offset={off:#x} ret={ret}\n")


BOOT = "".join([
    line(0, 0, 0x0, 0xA0000, UA),
    line(0, 1, 0xC0000, 0x1FF40000, UA + 0xC0000),
    "qemu-system-x86_64: warning: something unrelated\n",
    line(1, 0, 0x0, 0xA0000, UA),  # the SMM address space maps the same RAM
    line(0, 1, 0xC0000, 0x0, UA + 0xC0000),  # PAM change: slot 1 deleted ...
    line(0, 1, 0x100000, 0x1FF00000, UA + 0x100000, prefix="1234@1733222333.000123:"),  # ... and re-registered
    line(0, 2, 0xC0000, 0x40000, UA + 0xC0000, flags=0x2),  # read-only shadow
    line(0, 4, 0xFEE00000, 0x1000, 0x7F0000000000, ret=-17),  # a failed call changes nothing
    line(0, 5, 0xFD000000, 0x1000000, 0x7F1000000000),
    line(0, 5, 0xFD000000, 0x0, 0x7F1000000000),  # a BAR unmapped for good
])


def test_the_trace_is_switched_on_from_the_command_line() -> None:
    assert MEMSLOT_TRACE_ARGS == ("-trace", "enable=kvm_set_user_memory")


def test_every_line_is_parsed_with_its_fields_and_other_lines_are_ignored() -> None:
    regs = parse_memslot_registrations(BOOT)
    assert len(regs) == 9
    assert regs[4] == MemslotRegistration(0, 1, 0, 0x100000, 0x1FF00000, UA + 0x100000, -1, 0, 0)
    assert regs[5].flags == 0x2 and regs[6].ret == -17 and regs[3].deletes


def test_the_live_table_applies_deletes_replacements_and_ignores_failures() -> None:
    live = live_memslots(parse_memslot_registrations(BOOT))
    assert [(s.address_space, s.slot, s.gpa, s.size) for s in live] == [
        (0, 0, 0x0, 0xA0000), (0, 2, 0xC0000, 0x40000), (0, 1, 0x100000, 0x1FF00000), (1, 0, 0x0, 0xA0000)]


def test_a_gpa_finds_its_slot_in_the_ordinary_address_space() -> None:
    live = live_memslots(parse_memslot_registrations(BOOT))
    slot = memslot_for_gpa(live, 0x2961040)
    assert slot is not None and (slot.slot, slot.hva) == (1, UA + 0x100000)
    assert memslot_for_gpa(live, 0x1FFFFFFF) is slot and memslot_for_gpa(live, 0x20000000) is None
    assert memslot_for_gpa(live, 0x1000, address_space=1) == live[-1]
    assert memslot_for_gpa(live, 0xFEE00000) is None  # its registration failed
    assert memslot_for_gpa(live, 0xFD000000) is None  # deleted


def test_guest_memfd_slots_say_so_and_describe_their_backing() -> None:
    (gmem,) = parse_memslot_registrations(line(0, 1, 0x100000, 0x1FF00000, UA, fd=27, off=0x100000, flags=0x4))
    plain = memslot_for_gpa(live_memslots(parse_memslot_registrations(BOOT)), 0x100000)
    assert gmem.uses_guest_memfd and plain is not None and not plain.uses_guest_memfd
    assert gmem.describe() == (f"AS#0 slot 1: gpa [0x100000, 0x20000000) ua {UA:#x} flags 0x4, "
                               "guest_memfd fd 27 at offset 0x100000")
    assert plain.describe().endswith("no guest_memfd")


def test_overlapping_slots_are_a_misread_trace() -> None:
    regs = parse_memslot_registrations(line(0, 1, 0x0, 0x2000, UA) + line(0, 2, 0x1000, 0x2000, UA))
    with pytest.raises(ValueError, match=r"gpa 0x1000 is covered by 2 slots of AS#0"):
        memslot_for_gpa(live_memslots(regs), 0x1000)
    with pytest.raises(ValueError, match="gpa must be >= 0, got -1"):
        memslot_for_gpa((), -1)


def test_a_machine_reads_its_slots_from_stderr_and_keeps_trace_lines_out_of_what_qemu_says(tmp_path: Path) -> None:
    """A stuck KVM guest is reported with the head of QEMU's stderr: the memslot lines come first
    there and must not push QEMU's own words ("KVM internal error ...") out of it."""
    from qmp_helpers import QemuMachine

    machine = QemuMachine([], tmp_path)
    said = "KVM internal error. Suberror: 3\nextra data[0]: 0x0000000100003000\n"
    machine.stderr_log.write_text(BOOT.replace("qemu-system-x86_64: warning: something unrelated\n", "") + said
                                  + "kvm_run_exit cpu_index 0, reason 17\n")
    assert [s.slot for s in machine.memslots()] == [0, 2, 1, 0]
    assert machine._stderr_head() == said.strip()
    assert machine._stderr_tail() == said.strip()
