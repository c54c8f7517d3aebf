"""Which thread the kernel sends a signal to, with which si_code: the ``signal:signal_generate`` tracepoint.

A ptrace witness (host_stack.witness) sees a signal only when it is *delivered* to a handler or
a default action. A process that takes a signal through a signalfd (QEMU's main thread blocks
SIGBUS and reads it from its main loop's signalfd) never has it delivered, so ptrace is blind
to it; the tracepoint fires when the kernel generates the signal, whoever consumes it. It gives
the signal, si_code, the receiving thread and whether it was process-wide, not si_addr.

A private tracefs instance (``instances/gmemtest-<pid>``) keeps this off the global buffer and
away from other users of tracing; it is removed on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from host_stack.errors import HostStackError
from host_stack.kernelfs import TRACEFS, mounted

__all__ = ["GeneratedSignal", "SignalTrace", "SignalTraceError", "parse_signal_generate"]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

# include/trace/events/signal.h: "sig=%d errno=%d code=%d comm=%s pid=%d grp=%d res=%d"
_LINE = re.compile(r"signal_generate: sig=(\d+) errno=(-?\d+) code=(-?\d+) comm=(.*?) pid=(\d+) grp=(\d) res=(\d)")
# res (TRACE_SIGNAL_*): 0 delivered, 1 ignored, 2 already pending, 3 overflow fail, 4 lose info.
RESULTS = ("delivered", "ignored", "already_pending", "overflow_fail", "lose_info")


class SignalTraceError(HostStackError, OSError):
    """tracefs or its signal_generate event is not available."""


@dataclass(frozen=True)
class GeneratedSignal:
    sig: int
    code: int
    tid: int  # the receiving task: a thread id, or the process for a process-wide signal
    comm: str
    group: bool
    result: str


def parse_signal_generate(text: str) -> list[GeneratedSignal]:
    """Pure: every signal_generate line of a trace buffer."""
    return [GeneratedSignal(sig=int(m.group(1)), code=int(m.group(3)), tid=int(m.group(5)), comm=m.group(4),
                            group=m.group(6) == "1", result=RESULTS[int(m.group(7))] if int(m.group(7)) < len(RESULTS)
                            else m.group(7))
            for m in _LINE.finditer(text)]


class SignalTrace:
    """Record every generation of signal ``sig`` on the host while the context is open."""

    def __init__(self, sig: int) -> None:
        self.sig = sig
        self._stack = contextlib.ExitStack()
        self._instance: Path | None = None

    def __enter__(self) -> Self:
        try:
            tracefs = self._stack.enter_context(mounted(TRACEFS))
            if tracefs is None:
                raise SignalTraceError(0, "tracefs is not available: cannot trace signal_generate")
            instance = tracefs / "instances" / f"gmemtest-{os.getpid()}"
            try:
                instance.mkdir()
            except OSError as exc:
                raise SignalTraceError(exc.errno, f"cannot create tracefs instance {instance}: {exc.strerror}") from exc
            self._instance = instance
            event = instance / "events" / "signal" / "signal_generate"
            if not event.is_dir():
                raise SignalTraceError(0, f"the kernel has no signal:signal_generate tracepoint ({event})")
            (event / "filter").write_text(f"sig == {self.sig}\n")
            (event / "enable").write_text("1\n")
        except BaseException:
            self._remove()
            self._stack.close()
            raise
        return self

    def records(self) -> list[GeneratedSignal]:
        if self._instance is None:
            return []
        return parse_signal_generate((self._instance / "trace").read_text(errors="replace"))

    def _remove(self) -> None:
        if self._instance is None:
            return
        with contextlib.suppress(OSError):
            (self._instance / "events" / "signal" / "signal_generate" / "enable").write_text("0\n")
        try:
            self._instance.rmdir()
        except OSError as exc:
            _log.warning("tracefs instance %s not removed: %s", self._instance, exc)
        self._instance = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self._remove()
        finally:
            self._stack.close()
