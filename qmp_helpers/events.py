"""Typed, timestamped record of QMP events, safe to read from any thread.

The recorder keeps every event for the machine's life and hands out *marks* (indices).
A test takes a mark before it acts (e.g. before an injection) and waits for events after
that mark, so an event that arrives between the action and the wait can never be missed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import EventTimeout


@dataclass(frozen=True)
class QmpEvent:
    """One QMP event as received.

    ``timestamp`` is QEMU's own wall-clock stamp (seconds since the epoch); ``t_mono`` is
    this process's ``time.monotonic()`` when the event was received, comparable with the
    ``t_mono`` stamps of injections.
    """

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0
    t_mono: float = 0.0

    @classmethod
    def from_message(cls, msg: Mapping[str, Any], t_mono: float) -> QmpEvent:
        """Build from a raw QMP event message."""
        stamp = msg.get("timestamp") or {}
        seconds = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
        return cls(name=str(msg["event"]), data=dict(msg.get("data") or {}),
                   timestamp=seconds, t_mono=t_mono)


EventPredicate = Callable[[QmpEvent], bool]


class EventRecorder:
    """Append-only event list with a condition variable for waiters."""

    # After QEMU exits, events already read from the socket may still be on their way
    # through the pump: waiters keep looking this long before giving up.
    EXIT_GRACE_S = 0.5

    def __init__(self) -> None:
        self._events: list[QmpEvent] = []
        self._cond = threading.Condition()
        self._closed_at: float | None = None
        self._closed_why = ""

    def close(self, why: str) -> None:
        """No further events will come (QEMU exited): waiters stop after a short grace."""
        with self._cond:
            if self._closed_at is None:
                self._closed_at = time.monotonic()
                self._closed_why = why
            self._cond.notify_all()

    def record(self, event: QmpEvent) -> None:
        """Append an event and wake every waiter."""
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def snapshot(self) -> list[QmpEvent]:
        """A copy of every event so far, oldest first."""
        with self._cond:
            return list(self._events)

    def mark(self) -> int:
        """Position to pass as ``since`` to only consider events recorded after now."""
        with self._cond:
            return len(self._events)

    def wait(self, name: str, predicate: EventPredicate | None, timeout: float,
             since: int) -> QmpEvent:
        """First event named ``name`` at index >= ``since`` that satisfies ``predicate``."""
        if since < 0:
            raise ValueError(f"since must be a mark >= 0, got {since}")
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                while index < len(self._events):
                    event = self._events[index]
                    index += 1
                    if event.name == name and (predicate is None or predicate(event)):
                        return event
                now = time.monotonic()
                limit = deadline
                if self._closed_at is not None:
                    limit = min(deadline, self._closed_at + self.EXIT_GRACE_S)
                if now >= limit:
                    seen = [e.name for e in self._events[since:]]
                    what = f"QMP event {name}" + (" matching the predicate" if predicate else "")
                    if self._closed_at is not None and limit < deadline:
                        what += f" ({self._closed_why})"
                    raise EventTimeout(what, timeout, seen)
                self._cond.wait(limit - now)
