"""Where each vCPU is, from QEMU's own dump of its registers (HMP ``info registers -a``).

An injected SRAR says "the instruction at RIP consumed poison": it must be injected while the
vCPU is where the scenario says (a user-mode program's loop, or the kernel). Read from a stopped
VM, the dump is exactly the state the #MC will interrupt once the VM continues.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CPU_HEADER = re.compile(r"^CPU#(\d+)\s*$", re.MULTILINE)
_RIP = re.compile(r"\b[RE]IP=([0-9a-f]+)")  # EIP= outside long mode
_CPL = re.compile(r"\bCPL=(\d)")
_HLT = re.compile(r"\bHLT=(\d)")
_CS = re.compile(r"^CS =([0-9a-f]{4})\b", re.MULTILINE)


@dataclass(frozen=True)
class VcpuState:
    """One vCPU's position: instruction pointer, code segment selector, privilege level, halted."""

    cpu: int
    rip: int
    cs: int
    cpl: int
    halted: bool

    def where(self) -> str:
        mode = "user" if self.cpl == 3 else f"CPL {self.cpl}"
        return f"cpu {self.cpu} {mode} RIP {self.cs:02x}:{self.rip:#x}{' (halted)' if self.halted else ''}"


def _one(pattern: re.Pattern[str], text: str, what: str, cpu: int) -> str:
    match = pattern.search(text)
    if match is None:
        raise ValueError(f"no {what} in QEMU's register dump of cpu {cpu}: {text[:200]!r}")
    return match.group(1)


def parse_info_registers(text: str) -> list[VcpuState]:
    """Every ``CPU#N`` block of ``info registers -a`` (x86), in order."""
    headers = list(_CPU_HEADER.finditer(text))
    if not headers:
        raise ValueError(f"no 'CPU#N' block in QEMU's register dump: {text[:200]!r}")
    states: list[VcpuState] = []
    for n, header in enumerate(headers):
        cpu = int(header.group(1))
        block = text[header.end():headers[n + 1].start() if n + 1 < len(headers) else len(text)]
        states.append(VcpuState(cpu=cpu, rip=int(_one(_RIP, block, "RIP=/EIP=", cpu), 16),
                                cs=int(_one(_CS, block, "'CS =' line", cpu), 16),
                                cpl=int(_one(_CPL, block, "CPL=", cpu)),
                                halted=_one(_HLT, block, "HLT=", cpu) == "1"))
    return states
