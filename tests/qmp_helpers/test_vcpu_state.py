"""Where the vCPUs are (``info registers -a``) and injection at a checked position.

The parser is fed QEMU's dump in both shapes it prints (long mode: RIP=, otherwise EIP=); the
machine tests use the real QEMU with the tiny firmware, which halts in real mode at CPL 0.
"""

from __future__ import annotations

import pytest
from qmp_test_support import MCE_MARKER

from qmp_helpers import LandingNotReached, QemuMachine, parse_info_registers

# Abridged from QEMU 10.0.2 (a Linux guest spinning in user mode on cpu 0, cpu 1 idle), with
# QEMU's own line ends (\r\n).
_LONG_MODE = (
    "\r\nCPU#0\r\n"
    "RAX=0000000000000000 RBX=00000000004b1c60 RCX=00000000000c4a1d RDX=0000000000000000\r\n"
    "RIP=00000000004031c8 RFL=00000206 [-----P-] CPL=3 II=0 A20=1 SMM=0 HLT=0\r\n"
    "ES =0000 0000000000000000 00000000 00000000\r\n"
    "CS =0033 0000000000000000 ffffffff 00a0fb00 DPL=3 CS64 [-RA]\r\n"
    "\r\nCPU#1\r\n"
    "RAX=0000000000000000 RBX=0000000000000001 RCX=0000000000000000 RDX=0000000000000000\r\n"
    "RIP=ffffffff81a3c36e RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n"
    "CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]\r\n"
)


def test_parse_long_mode_dump_of_two_cpus() -> None:
    user, idle = parse_info_registers(_LONG_MODE)
    assert (user.cpu, user.rip, user.cs, user.cpl, user.halted) == (0, 0x4031C8, 0x33, 3, False)
    assert (idle.cpu, idle.rip, idle.cs, idle.cpl, idle.halted) == (1, 0xFFFFFFFF81A3C36E, 0x10, 0, True)
    assert user.where() == "cpu 0 user RIP 33:0x4031c8"
    assert idle.where() == "cpu 1 CPL 0 RIP 10:0xffffffff81a3c36e (halted)"


def test_parse_refuses_a_dump_without_cpu_blocks_or_fields() -> None:
    with pytest.raises(ValueError, match="no 'CPU#N' block"):
        parse_info_registers("RIP=0000000000001000 CPL=0 HLT=0\r\n")
    with pytest.raises(ValueError, match="no CPL= in QEMU's register dump of cpu 0"):
        parse_info_registers("CPU#0\r\nRIP=0000000000001000 HLT=0\r\nCS =0010 0 0 0\r\n")


@pytest.mark.qemu
def test_real_mode_firmware_is_seen_halted_at_cpl0(machine: QemuMachine) -> None:
    (state,) = machine.vcpu_states()
    assert (state.cpu, state.cs, state.cpl, state.halted) == (0, 0xF000, 0, True), state


@pytest.mark.qemu
def test_inject_at_a_checked_position_lands_there(machine: QemuMachine) -> None:
    injection = machine.inject_mce_at("SRAO", 0x200000, lambda s: s.halted and s.cpl == 0,
                                      what="halted at CPL 0")
    assert injection.landing is not None and injection.landing_tries == 1, injection
    assert injection.landing_skipped == (), injection
    assert (injection.landing.cs, injection.landing.halted) == (0xF000, True), injection.landing
    assert machine.status() == "running", "inject_mce_at must leave the VM running"
    machine.wait_event("MEMORY_FAILURE", since=injection.event_mark, timeout=5)
    machine.wait_console(MCE_MARKER, timeout=5)  # the firmware's #MC handler ran


@pytest.mark.qemu
def test_a_position_never_reached_injects_nothing(machine: QemuMachine) -> None:
    mark = machine.event_mark()
    with pytest.raises(LandingNotReached) as err:
        machine.inject_mce_at("SRAR", 0x200000, lambda s: s.cpl == 3, what="in user mode", tries=3, gap_s=0.0)
    assert err.value.tries == 3 and len(err.value.seen) == 3, err.value
    assert "no vCPU was in user mode" in str(err.value) and "cpu 0 CPL 0 RIP f000:" in str(err.value), err.value
    assert machine.status() == "running", "a failed search must leave the VM running"
    assert [e.name for e in machine.events[mark:] if e.name == "MEMORY_FAILURE"] == []
    assert MCE_MARKER not in machine.console_text()
    with pytest.raises(ValueError, match="tries must be >= 1, got 0"):
        machine.inject_mce_at("SRAR", 0x200000, lambda s: True, what="anywhere", tries=0)
