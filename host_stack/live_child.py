"""The child process of a live poison check: start it, read its JSON lines under a deadline, clean up.

The seed regression and the poison matrix each run their VM in a child program (a poisoned
touch kills the toucher); this is what both parents share: ``JsonLineChild``, the errors a child
raises in the parent (``ChildError``: it misbehaved; ``ChildCancelled``: the host cannot run the
check, which gmemtest reports as CANNOT RUN), and ``unpoison_injected`` for the page it poisoned.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from host_stack.errors import HostStackError
from host_stack.kernelfs import DEBUGFS, mounted

if TYPE_CHECKING:
    from host_stack.injectors import InjectionRecord

__all__ = [
    "CHILD_TIMEOUT",
    "ChildCancelled",
    "ChildError",
    "JsonLineChild",
    "child_argv",
    "unpoison_injected",
]

CHILD_TIMEOUT: Final = 60.0


class ChildCancelled(HostStackError, RuntimeError):
    """The host cannot run the check (a capability it needs is missing); ``reason`` is a sentence
    a lab engineer can act on. gmemtest turns it into CANNOT RUN."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChildError(HostStackError, RuntimeError):
    """A check's child misbehaved (silent past its deadline, garbled, died early).

    The message names what was awaited and ends with the child's stderr, which is where a
    Python traceback of the child lands.
    """


def child_argv(module: str, *args: str) -> list[str]:
    """The argv of a child program run as ``python -m module args...`` by this interpreter."""
    return [sys.executable, "-m", module, *args]


def _child_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class JsonLineChild:
    """One child process of a live poison check: JSON lines on stdout, every read bounded by a deadline.

    Used by the seed regression and the poison matrix (``argv``/``label`` name the child).

    stderr goes to an unlinked temporary file (a pipe nobody drains could fill and stall the
    child), so any error about the child can quote it.
    """

    def __init__(self, mode: str, argv: list[str], label: str) -> None:
        self.mode = mode
        self.label = label
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - owned by JsonLineChild, closed in stop()
        self._buf = b""
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env=_child_env(),
            )
        except BaseException:
            self._stderr.close()
            raise

    def error(self, what: str) -> ChildError:
        status = self.proc.poll()
        state = "still running" if status is None else f"exit status {status}"
        stderr = self.stderr_tail()
        return ChildError(
            f"{self.label} ({self.mode}, pid {self.proc.pid}, {state}): {what}; "
            + (f"its stderr: {stderr}" if stderr else "its stderr is empty")
        )

    def stderr_tail(self, limit: int = 2000) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()[-limit:]

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            raise self.error(f"could not send {line!r}: it closed its stdin") from exc

    def read_event(self, deadline: float, awaiting: str) -> dict[str, Any] | None:
        """The next event, None at end of output; ChildError when ``deadline`` passes."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.error(f"expected {awaiting} within {CHILD_TIMEOUT}s, got nothing more")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                if not self._buf:
                    return None
                self._buf += b"\n"  # a last line without newline
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise self.error(f"expected {awaiting} as a JSON line, got {line[:200]!r} ({exc})") from exc
        if not isinstance(event, dict) or "event" not in event:
            raise self.error(f"expected {awaiting} as a JSON object with 'event', got {line[:200]!r}")
        return event

    def read_ready(self, deadline: float) -> dict[str, Any]:
        """The child's first event, 'ready'; ChildCancelled when it reports 'unsupported' instead."""
        ready = self.read_event(deadline, "a 'ready' event")
        if ready is None or ready.get("event") != "ready":
            if ready is not None and ready.get("event") == "unsupported":
                raise ChildCancelled(str(ready["reason"]))
            raise self.error(f"expected a 'ready' event, got {ready}")
        return ready

    def stop(self) -> None:
        """Kill the child if it still runs and reap it (never waits unboundedly)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        try:
            self.proc.wait(timeout=CHILD_TIMEOUT)
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(BrokenPipeError):
                        stream.close()
            self._stderr.close()


def unpoison_injected(events: Sequence[Mapping[str, Any]], debugfs: Path | None = None) -> list[InjectionRecord]:
    """Unpoison the child's page once it is gone, where the kernel allows; records say what happened.

    ``debugfs`` None mounts the real one for the duration (shared with parallel jobs).
    """
    from host_stack.injectors import InjectionRecord, MadviseInjector

    records = []
    for ev in events:
        if ev.get("event") == "injected":
            fields = dict(ev["record"])
            for key in ("flags_before", "pfns", "hardware_corrupted_kib"):
                if key in fields:
                    fields[key] = tuple(fields[key])
            records.append(InjectionRecord(**fields))
    if not records:
        return []
    with contextlib.ExitStack() as stack:
        where = debugfs if debugfs is not None else stack.enter_context(mounted(DEBUGFS))
        injector = MadviseInjector(where)
        injector.records.extend(records)
        return injector.cleanup()
