"""KVM's attribute trace lines, parsed (the host kernel's view of a conversion)."""

from __future__ import annotations

from host_stack.attribute_trace import AttributeChange, parse_attribute_changes

# As tracefs prints them inside the lab host (Linux 7.3.4), with a comm that holds a dash.
TRACE = """# tracer: nop
#
 qemu-system-x86-170     [001] .....    75.123456: kvm_vm_set_mem_attributes: 0x0000000001f8ff -- 0x0000000001f900 [0x8]
 qemu-system-x86-168     [000] .....    80.000001: kvm_vm_set_mem_attributes: 0x00000000000000 -- 0x000000000000a0 [0x0]
"""


def test_changes_carry_range_attributes_and_thread() -> None:
    first, second = parse_attribute_changes(TRACE)
    assert first == AttributeChange(170, "qemu-system-x86", 0x1F8FF, 0x1F900, 0x8)
    assert (first.gpa, first.size, first.private) == (0x1F8FF000, 0x1000, True)
    assert (second.gpa, second.size, second.private) == (0, 0xA0000, False)
    assert first.describe() == "0x1f8ff000+0x1000 attributes 0x8 (qemu-system-x86-170)"


def test_other_lines_are_not_changes() -> None:
    assert parse_attribute_changes("kvm_userspace_exit: reason KVM_EXIT_MEMORY_FAULT (39)\n") == []
