"""Which thread the kernel sends a signal to, with which si_code: the ``signal:signal_generate`` tracepoint.

A ptrace witness (host_stack.witness) sees a signal only when it is *delivered* to a handler or
a default action. A process that takes a signal through a signalfd (QEMU's main thread blocks
SIGBUS and reads it from its main loop's signalfd) never has it delivered, so ptrace is blind
to it; the tracepoint fires when the kernel generates the signal, whoever consumes it. It gives
the signal, si_code, the receiving thread and whether it was process-wide, not si_addr.

It records in a private tracefs instance (``trace_instance``), removed on exit.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from host_stack.trace_instance import TraceInstance

__all__ = ["GeneratedSignal", "SignalTrace", "parse_signal_generate", "threads_of"]

# include/trace/events/signal.h: "sig=%d errno=%d code=%d comm=%s pid=%d grp=%d res=%d"
_LINE = re.compile(r"signal_generate: sig=(\d+) errno=(-?\d+) code=(-?\d+) comm=(.*?) pid=(\d+) grp=(\d) res=(\d)")
# res (TRACE_SIGNAL_*): 0 delivered, 1 ignored, 2 already pending, 3 overflow fail, 4 lose info.
RESULTS = ("delivered", "ignored", "already_pending", "overflow_fail", "lose_info")


@dataclass(frozen=True)
class GeneratedSignal:
    sig: int
    code: int
    tid: int  # the receiving task: a thread id, or the process for a process-wide signal
    comm: str
    group: bool
    result: str


def threads_of(pid: int) -> set[int]:
    """Every thread of process ``pid`` (``pid`` among them), to tell its signals from others'; just
    ``{pid}`` once the process is gone."""
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")} | {pid}
    except OSError:
        return {pid}


def parse_signal_generate(text: str) -> list[GeneratedSignal]:
    """Pure: every signal_generate line of a trace buffer."""
    return [GeneratedSignal(sig=int(m.group(1)), code=int(m.group(3)), tid=int(m.group(5)), comm=m.group(4),
                            group=m.group(6) == "1", result=RESULTS[int(m.group(7))] if int(m.group(7)) < len(RESULTS)
                            else m.group(7))
            for m in _LINE.finditer(text)]


class SignalTrace(TraceInstance):
    """Record every generation of signal ``sig`` on the host while the context is open."""

    def __init__(self, sig: int) -> None:
        super().__init__({"signal/signal_generate": f"sig == {sig}"})
        self.sig = sig

    def records(self) -> list[GeneratedSignal]:
        return parse_signal_generate(self.text())
