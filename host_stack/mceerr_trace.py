"""Every machine-check SIGBUS the kernel sends, with its address and order: kprobes on the mceerr senders.

``signal:signal_generate`` names the receiving thread and si_code but not si_addr or
si_addr_lsb, and a ptrace witness sees only signals *delivered* to a handler: QEMU's main
thread takes SIGBUS through a signalfd, so the AO that memory failure sends it is never
delivered and its address and order were never judged. The kernel builds every such siginfo in
two functions (kernel/signal.c), whose arguments are the whole answer:

- ``force_sig_mceerr(code, addr, lsb)``: to the current task (a faulting access: the fault
  handler's AR, memory_failure's AR to the process that hit it);
- ``send_sig_mceerr(code, addr, lsb, task)``: to another task (memory_failure's AO kill of a
  mapper, KVM's AR to the vCPU thread for a poisoned hva).

A kprobe event on each (``kprobe_group``: a private group and instance) records code, addr and lsb
from the x86_64 argument registers (di, si, dx). The receiver of ``force_sig_mceerr`` is the
current task. For ``send_sig_mceerr`` it is the task argument, which a kprobe cannot name on
Debian's 7.3.4 (no BTF field access: ``$arg4->pid`` is "Invalid $-variable"); the sender itself
then generates the signal (``send_sig_info``), so the ``signal:signal_generate`` line that
follows from the same sender with the same si_code names it; it is read in the same instance.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Final

from host_stack import mm_uapi as m
from host_stack.kprobe_group import KprobeGroup

__all__ = ["UNKNOWN_TID", "MceerrTrace", "SentMceerr", "parse_mceerr"]


# Each sender and the name of its event.
_SENDERS: Final = (("force_sig_mceerr", "force"), ("send_sig_mceerr", "send"))
_ARGS: Final = "code=%di:s32 addr=%si:x64 lsb=%dx:s16"
# "<comm>-<pid> [cpu] flags ts: <event>: (<func>+0x0/0x..) code=5 addr=0x7f.. lsb=12"
_KPROBE: Final = re.compile(r"-(\d+)\s+\[\d+\][^\n]*?: (force|send): \([^)]*\) code=(-?\d+) addr=(0x[0-9a-f]+) "
                            r"lsb=(-?\d+)")
# include/trace/events/signal.h: "sig=%d errno=%d code=%d comm=%s pid=%d grp=%d res=%d"
_GENERATE: Final = re.compile(r"-(\d+)\s+\[\d+\][^\n]*?signal_generate: sig=(\d+) errno=-?\d+ code=(-?\d+) "
                              r"comm=.*? pid=(\d+) grp")
UNKNOWN_TID: Final = -1


@dataclass(frozen=True)
class SentMceerr:
    """One SIGBUS the kernel built: which sender, the receiving thread, si_code, si_addr, si_addr_lsb."""

    sender: str  # "force" (to the current task) or "send" (to another task)
    tid: int
    si_code: int
    si_addr: int
    si_addr_lsb: int
    from_tid: int  # the task that sent it (for "force", the receiver itself)

    def describe(self) -> str:
        return (f"{m.BUS_CODE_NAMES.get(self.si_code, self.si_code)} at {self.si_addr:#x} lsb {self.si_addr_lsb} "
                f"to thread {self.tid} ({self.sender}_sig_mceerr)")


def parse_mceerr(text: str) -> list[SentMceerr]:
    """Pure: every mceerr SIGBUS of a trace buffer holding the two kprobes and signal_generate, in
    order; a ``send`` whose signal_generate line is missing has ``tid`` ``UNKNOWN_TID``."""
    found: list[SentMceerr] = []
    pending: dict[int, list[int]] = {}  # sender -> indexes in ``found`` still without a receiver
    for line in text.splitlines():
        if (mt := _KPROBE.search(line)) is not None:
            current, sender = int(mt.group(1)), mt.group(2)
            found.append(SentMceerr(sender, current if sender == "force" else UNKNOWN_TID, int(mt.group(3)),
                                    int(mt.group(4), 16), int(mt.group(5)), current))
            if sender == "send":
                pending.setdefault(current, []).append(len(found) - 1)
        elif (gen := _GENERATE.search(line)) is not None and int(gen.group(2)) == m.SIGBUS:
            waiting = pending.get(int(gen.group(1)), [])
            at = next((i for i in waiting if found[i].si_code == int(gen.group(3))), None)
            if at is not None:
                waiting.remove(at)
                found[at] = dataclasses.replace(found[at], tid=int(gen.group(4)))
    return found


class MceerrTrace(KprobeGroup):
    """Record every mceerr SIGBUS the host kernel sends while the context is open."""

    def __init__(self) -> None:
        super().__init__({name: f"p {func} {_ARGS}" for func, name in _SENDERS},
                         tracepoints={"signal/signal_generate": f"sig == {m.SIGBUS}"})

    def records(self) -> list[SentMceerr]:
        return parse_mceerr(self.text())
