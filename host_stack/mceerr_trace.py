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

A kprobe event on each, in a private group (``gmemtest_<pid>_<n>``), records code, addr and lsb
from the x86_64 argument registers (di, si, dx). The receiver of ``force_sig_mceerr`` is the
current task. For ``send_sig_mceerr`` it is the task argument, which a kprobe cannot name on
Debian's 7.3.4 (no BTF field access: ``$arg4->pid`` is "Invalid $-variable"); the sender itself
then generates the signal (``send_sig_info``), so the ``signal:signal_generate`` line that
follows from the same sender with the same si_code names it. All three events share one private
tracefs instance (``trace_instance``), so their lines come in time order; the kprobes are
removed on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from host_stack import mm_uapi as m
from host_stack.kernelfs import TRACEFS, mounted
from host_stack.trace_instance import TraceError, TraceInstance

__all__ = ["UNKNOWN_TID", "MceerrTrace", "SentMceerr", "parse_mceerr"]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

_SERIAL: Final = itertools.count()
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


class MceerrTrace:
    """Record every mceerr SIGBUS the host kernel sends while the context is open."""

    def __init__(self) -> None:
        self.group = f"gmemtest_{os.getpid()}_{next(_SERIAL)}"
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
                raise TraceError(0, "tracefs is not available: cannot probe the mceerr senders")
            self._events = tracefs / m.TRACEFS_KPROBE_EVENTS
            self._stack.callback(self._remove)
            for func, name in _SENDERS:
                try:
                    self._write(f"p:{self.group}/{name} {func} {_ARGS}\n")
                except OSError as exc:
                    raise TraceError(exc.errno, f"the kernel refused a kprobe on {func} ({exc.strerror})") from exc
            events = {f"{self.group}/{name}": "" for _func, name in _SENDERS}
            self._instance = self._stack.enter_context(
                TraceInstance({**events, "signal/signal_generate": f"sig == {m.SIGBUS}"}))
        except BaseException:
            self._stack.close()
            raise
        return self

    def records(self) -> list[SentMceerr]:
        return [] if self._instance is None else parse_mceerr(self._instance.text())

    def _remove(self) -> None:
        for _func, name in _SENDERS:
            with contextlib.suppress(OSError):
                self._write(f"-:{self.group}/{name}\n")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._instance = None
        self._stack.close()
