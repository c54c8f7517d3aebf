"""A private tracefs instance with a few events enabled: what the kernel traced while it was open.

``instances/gmemtest-<pid>-<n>`` keeps the events off the global buffer and away from other
users of tracing (two instances of one process do not collide); it is removed on exit. Used by
``signal_trace`` (which thread a signal is sent to) and ``private_frames`` (which frame KVM maps
for a private gfn).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from host_stack.errors import HostStackError
from host_stack.kernelfs import TRACEFS, mounted

__all__ = ["TraceError", "TraceInstance"]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

_SERIAL: Final = itertools.count()


class TraceError(HostStackError, OSError):
    """tracefs, an instance, or one of the events asked for is not available."""


class TraceInstance:
    """Enable ``events`` ("system/event" -> filter, "" for none) in a fresh instance while open."""

    def __init__(self, events: Mapping[str, str]) -> None:
        self.events = dict(events)
        self._stack = contextlib.ExitStack()
        self._instance: Path | None = None

    def __enter__(self) -> Self:
        try:
            tracefs = self._stack.enter_context(mounted(TRACEFS))
            if tracefs is None:
                raise TraceError(0, f"tracefs is not available: cannot trace {', '.join(self.events)}")
            instance = tracefs / "instances" / f"gmemtest-{os.getpid()}-{next(_SERIAL)}"
            try:
                instance.mkdir()
            except OSError as exc:
                raise TraceError(exc.errno, f"cannot create tracefs instance {instance}: {exc.strerror}") from exc
            self._instance = instance
            for name, event_filter in self.events.items():
                event = instance / "events" / name
                if not event.is_dir():
                    raise TraceError(0, f"the kernel has no {name.replace('/', ':')} tracepoint ({event})")
                if event_filter:
                    (event / "filter").write_text(event_filter + "\n")
                (event / "enable").write_text("1\n")
        except BaseException:
            self._remove()
            self._stack.close()
            raise
        return self

    def text(self) -> str:
        """The instance's trace buffer so far ("" once closed)."""
        if self._instance is None:
            return ""
        return (self._instance / "trace").read_text(errors="replace")

    def _remove(self) -> None:
        if self._instance is None:
            return
        for name in self.events:
            with contextlib.suppress(OSError):
                (self._instance / "events" / name / "enable").write_text("0\n")
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
