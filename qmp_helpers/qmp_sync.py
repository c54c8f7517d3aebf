"""Synchronous facade over the asyncio ``qemu.qmp.QMPClient``.

qemu.qmp is asyncio-only and its calls have no deadline of their own. Tests and Avocado
are synchronous, so the client lives on a private event loop in a daemon thread and every
call crosses over with ``run_coroutine_threadsafe(...).result(timeout)``; a call that
overruns is cancelled on the loop and raises :class:`QmpTimeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from .errors import MachineStateError, QmpCommandError, QmpConnectionError, QmpTimeout
from .events import EventRecorder, QmpEvent
from .transcript import Transcript

_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class SyncQmp:
    """One QMP connection with an event pump, a transcript and per-call timeouts."""

    def __init__(self, name: str, recorder: EventRecorder, transcript: Transcript,
                 timeout: float) -> None:
        self._name = name
        self._recorder = recorder
        self._transcript = transcript
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self._client: QMPClient | None = None
        self._pump: asyncio.Task[None] | None = None

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro: Coroutine[Any, Any, _T], what: str, timeout: float | None = None
              ) -> _T:
        limit = self.timeout if timeout is None else timeout
        if self._loop.is_closed() or not self._thread.is_alive():
            coro.close()
            raise MachineStateError(f"QMP connection of {self._name} is closed; cannot {what}")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(limit)
        except TimeoutError as exc:
            future.cancel()
            raise QmpTimeout(what, limit) from exc
        except ExecuteError:
            raise  # a QMP error reply: execute() turns it into QmpCommandError with its context
        except (QMPError, OSError, EOFError) as exc:
            raise QmpConnectionError(what, exc) from exc

    def connect(self, socket_path: str, timeout: float) -> None:
        """Connect once (the socket must exist); raises QmpConnectionError on failure."""
        client = QMPClient(self._name)

        async def _connect() -> None:
            await client.connect(socket_path)
            self._pump = asyncio.ensure_future(self._pump_events(client))

        self._call(_connect(), f"QMP connect to {socket_path}", timeout)
        self._client = client
        _LOG.debug("QMP connected to %s", socket_path)

    async def _pump_events(self, client: QMPClient) -> None:
        async for msg in client.events:
            event = QmpEvent.from_message(msg, time.monotonic())
            self._transcript.write("event", event=event.name, data=event.data,
                                   qemu_time=event.timestamp)
            _LOG.debug("QMP event %s %s", event.name, event.data)
            self._recorder.record(event)

    def execute(self, cmd: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Run one QMP command; QMP errors become :class:`QmpCommandError`."""
        client = self._client
        if client is None:
            raise MachineStateError(f"QMP of {self._name} is not connected; cannot run {cmd!r}")
        args = dict(arguments or {})
        self._transcript.write("cmd", cmd=cmd, arguments=args)
        _LOG.debug("QMP -> %s %s", cmd, args)
        try:
            reply = self._call(client.execute(cmd, args or None), f"QMP command {cmd!r}",
                               timeout)
        except ExecuteError as exc:
            self._transcript.write("error", cmd=cmd, error_class=exc.error_class,
                                   desc=exc.error.error.desc)
            raise QmpCommandError(cmd, args, exc.error_class, exc.error.error.desc) from exc
        self._transcript.write("reply", cmd=cmd, reply=reply)
        _LOG.debug("QMP <- %s %r", cmd, reply)
        return reply

    def close(self, timeout: float = 2.0) -> None:
        """Disconnect (bounded) and stop the loop thread; idempotent, never raises."""
        client, self._client = self._client, None
        if self._thread.is_alive():
            if client is not None:
                try:
                    self._call(client.disconnect(), "QMP disconnect", timeout)
                except Exception as exc:  # the peer may be gone: that is the point of closing
                    _LOG.debug("QMP disconnect of %s: %r", self._name, exc)
            pump, self._pump = self._pump, None
            if pump is not None:
                try:
                    self._call(_cancel(pump), "QMP event pump stop", timeout)
                except Exception as exc:
                    _LOG.debug("QMP event pump of %s: %r", self._name, exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()
