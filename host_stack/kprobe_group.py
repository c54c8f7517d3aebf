"""Kprobe events of our own, traced beside tracepoints in one private tracefs instance.

A kprobe event is global (``kprobe_events``), so each user gets a private group,
``gmemtest_<pid>_<n>``, whose events are enabled only in a private instance (``trace_instance``)
together with the tracepoints read beside them: their lines come in time order. The kprobes are
removed on exit, also when the instance could not be made. Used by ``mceerr_trace`` (the mceerr
senders) and ``gmem_fault_trace`` (guest_memfd's answer to KVM).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from host_stack import mm_uapi as m
from host_stack.kernelfs import TRACEFS, mounted
from host_stack.trace_instance import TraceError, TraceInstance

__all__ = ["KprobeGroup"]

_SERIAL: Final = itertools.count()


class KprobeGroup:
    """``probes``: event name -> "p SYMBOL FETCHARGS" (entry) or "r SYMBOL FETCHARGS" (return), each
    enabled with ``probe_filter``; ``tracepoints``: "system/event" -> filter, read in the same instance.
    ``why`` completes the error when the kernel refuses a probe."""

    def __init__(self, probes: Mapping[str, str], *, probe_filter: str = "",
                 tracepoints: Mapping[str, str] | None = None, why: str = "") -> None:
        self.group = f"gmemtest_{os.getpid()}_{next(_SERIAL)}"
        self.probes = dict(probes)
        self.probe_filter = probe_filter
        self.tracepoints = dict(tracepoints or {})
        self.why = why
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
                raise TraceError(0, f"tracefs is not available: cannot probe {', '.join(self.probes.values())}")
            self._events = tracefs / m.TRACEFS_KPROBE_EVENTS
            self._stack.callback(self._remove)
            for name, spec in self.probes.items():
                kind, definition = spec.split(" ", 1)
                try:
                    self._write(f"{kind}:{self.group}/{name} {definition}\n")
                except OSError as exc:
                    raise TraceError(exc.errno, f"the kernel refused the kprobe {definition!r} ({exc.strerror})"
                                                f"{'; ' + self.why if self.why else ''}") from exc
            events = {f"{self.group}/{name}": self.probe_filter for name in self.probes}
            self._instance = self._stack.enter_context(TraceInstance({**events, **self.tracepoints}))
        except BaseException:
            self._stack.close()
            raise
        return self

    def text(self) -> str:
        """The instance's lines so far ("" once closed)."""
        return "" if self._instance is None else self._instance.text()

    def _remove(self) -> None:
        for name in self.probes:
            with contextlib.suppress(OSError):
                self._write(f"-:{self.group}/{name}\n")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._instance = None
        self._stack.close()
