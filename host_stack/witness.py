"""A SIGBUS witness: records every SIGBUS delivered to a (multi-threaded) process via ptrace.

The observable that matters for hardware poison is the siginfo the kernel builds (si_code,
si_addr, si_addr_lsb) and the thread it picks. A target such as QEMU handles SIGBUS itself
and may not log all of it, so the witness reads it from outside: it seizes every thread
(``PTRACE_SEIZE`` with ``PTRACE_O_TRACECLONE`` so new threads are traced too), and at each
signal-delivery-stop reads ``PTRACE_GETSIGINFO`` and restarts the thread injecting the very
same signal, so the target's own handler (or the default action) runs as if nobody watched.

The tracer runs in its own small process (``python -m host_stack.witness PID``), not in a
thread of the caller, for two reasons. ptrace stops of a tracee are reported to every thread
of the tracer's thread group, so a caller that owns the target (``subprocess.Popen``, as for
QEMU) would otherwise have its ``Popen.wait()/poll()`` consume ptrace stops as if the target
had stopped, and would lose the exit status when the tracer reaps the leader. A tracer in a
separate process is "reparented" in the kernel's sense: its wait on the dead leader leaves
the zombie for the real parent. The tracer reports JSON lines on a pipe.

Cost: the tracer polls its tracees (``WNOHANG``, backing off to 10 ms when idle), so each
signal to the target (SIGBUS or any other, e.g. QEMU's vCPU kicks) is delivered up to ~10 ms
later than untraced; what is delivered, to which thread, and in what order is unchanged.
``t_mono_ns`` is when the tracer saw the delivery stop (CLOCK_MONOTONIC, comparable across
processes), an upper bound on the kernel's send time.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

from host_stack import mm_uapi as m
from host_stack.errors import HostStackError

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

__all__ = ["SigbusRecord", "SigbusWitness", "WitnessError", "decode_siginfo", "main"]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

_IDLE_SLEEP_MIN: Final = 0.0005
_IDLE_SLEEP_MAX: Final = 0.01
_GROUP_STOP_SIGNALS: Final = frozenset({m.SIGSTOP, m.SIGTSTP, m.SIGTTIN, m.SIGTTOU})


class WitnessError(HostStackError, OSError):
    """A ptrace operation of the witness failed; names the request, the tid and the errno."""


@dataclass(frozen=True)
class SigbusRecord:
    """One SIGBUS as the kernel delivered it to thread ``tid`` of process ``pid``."""

    pid: int
    tid: int
    si_signo: int
    si_code: int
    si_errno: int
    si_addr: int
    si_addr_lsb: int
    t_mono_ns: int  # time.monotonic_ns() when the witness saw the delivery stop
    t_wall_ns: int  # time.time_ns() at the same moment

    @property
    def code_name(self) -> str:
        return m.BUS_CODE_NAMES.get(self.si_code, str(self.si_code))


class _Ptrace:
    """ctypes ``ptrace(2)``; lazily bound so importing this module has no side effects."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fn = libc.ptrace
        self._fn.restype = ctypes.c_long
        self._fn.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)

    def __call__(self, request: int, tid: int, addr: int = 0, data: int = 0) -> int:
        ctypes.set_errno(0)
        result = int(self._fn(request, tid, addr or None, data or None))
        if result == -1:
            err = ctypes.get_errno()
            if err:
                raise WitnessError(err, f"ptrace({request:#x}, tid={tid}): {os.strerror(err)}")
        return result


def decode_siginfo(raw: bytes, pid: int, tid: int) -> SigbusRecord:
    """Decode an x86_64 ``siginfo_t`` (128 bytes) into a record."""
    if len(raw) < m.SIGINFO_SIZE:
        raise ValueError(f"siginfo must be {m.SIGINFO_SIZE} bytes, got {len(raw)}")

    def i32(off: int) -> int:
        return int.from_bytes(raw[off : off + 4], "little", signed=True)

    return SigbusRecord(
        pid=pid,
        tid=tid,
        si_signo=i32(m.SIGINFO_SIGNO_OFFSET),
        si_errno=i32(m.SIGINFO_ERRNO_OFFSET),
        si_code=i32(m.SIGINFO_CODE_OFFSET),
        si_addr=int.from_bytes(raw[m.SIGINFO_ADDR_OFFSET : m.SIGINFO_ADDR_OFFSET + 8], "little"),
        si_addr_lsb=int.from_bytes(
            raw[m.SIGINFO_ADDR_LSB_OFFSET : m.SIGINFO_ADDR_LSB_OFFSET + 2], "little", signed=True
        ),
        t_mono_ns=time.monotonic_ns(),
        t_wall_ns=time.time_ns(),
    )


class _Tracer:
    """The ptrace side; runs in its own process (``python -m host_stack.witness PID``).

    ``emit`` receives one dict per event: attached, sigbus, signal, exit.
    """

    def __init__(self, pid: int, emit: Callable[[dict[str, object]], None]) -> None:
        self.pid = pid
        self.emit = emit
        self.ptrace = _Ptrace()
        self.tids: set[int] = set()
        self.stop_requested = False
        # The caller, taken before "attached" is emitted: a caller that dies right after
        # reading it must still be noticed (read later, the subreaper would be taken for it).
        self.parent = os.getppid()

    def _list_tids(self) -> set[int]:
        try:
            return {int(t) for t in os.listdir(f"/proc/{self.pid}/task")}
        except FileNotFoundError as exc:
            raise ProcessLookupError(f"no process {self.pid} to witness") from exc

    def attach_all(self) -> None:
        """Seize every thread, re-listing until no new thread appeared (clone races)."""
        while True:
            new = self._list_tids() - self.tids
            if not new:
                break
            for tid in sorted(new):
                try:
                    self.ptrace(m.PTRACE_SEIZE, tid, 0, m.PTRACE_O_TRACECLONE)
                except WitnessError as exc:
                    if exc.errno == errno.ESRCH:
                        continue  # thread exited meanwhile
                    raise
                self.tids.add(tid)
        if self.pid not in self.tids:
            raise ProcessLookupError(f"process {self.pid} exited before it could be witnessed")
        self.emit({"event": "attached", "tids": sorted(self.tids)})

    def loop(self) -> None:
        """Poll every tracee until the target is gone or a stop was requested."""
        sleep = _IDLE_SLEEP_MIN
        parent = self.parent
        while self.tids:
            if os.getppid() != parent:  # the caller died: do not keep its target traced
                self.stop_requested = True
            if self.stop_requested:
                self.detach_all()
                return
            try:
                tid, status = os.waitpid(-1, os.WNOHANG | m.WALL)
            except ChildProcessError:
                return  # nothing traced any more
            if tid == 0:
                time.sleep(sleep)
                sleep = min(sleep * 2, _IDLE_SLEEP_MAX)
                continue
            sleep = _IDLE_SLEEP_MIN
            if os.WIFSTOPPED(status):
                self._on_stop(tid, status >> 8)
            else:
                self._on_exit(tid, status)

    def _on_exit(self, tid: int, status: int) -> None:
        self.tids.discard(tid)
        if tid == self.pid:
            self.emit({"event": "exit", "tid": tid, "status": status})
            self.tids.clear()  # the leader is reported last: the whole group is gone

    def _on_stop(self, tid: int, stop: int) -> None:
        sig = stop & 0xFF
        event = stop >> 8
        if event == m.PTRACE_EVENT_CLONE:
            self.tids.add(self._event_msg(tid))
            self._restart(tid, 0)
        elif event == m.PTRACE_EVENT_STOP:
            # group-stop: keep the target stopped as it would be untraced; otherwise it is a
            # new thread's first stop or an interrupt: resume.
            request = m.PTRACE_LISTEN if sig in _GROUP_STOP_SIGNALS else m.PTRACE_CONT
            self._restart(tid, 0, request)
        elif event != 0:
            self._restart(tid, 0)
        else:
            if sig == m.SIGBUS:
                self._record(tid)
            else:
                self.emit({"event": "signal", "tid": tid, "signo": sig})
            self._restart(tid, sig)  # deliver exactly the signal the kernel chose

    def _event_msg(self, tid: int) -> int:
        msg = ctypes.c_ulong(0)
        self.ptrace(m.PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(msg))
        return int(msg.value)

    def _record(self, tid: int) -> None:
        buf = ctypes.create_string_buffer(m.SIGINFO_SIZE)
        self.ptrace(m.PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf))
        record = decode_siginfo(buf.raw, self.pid, tid)
        self.emit({"event": "sigbus", **dataclasses.asdict(record)})

    def _restart(self, tid: int, sig: int, request: int = m.PTRACE_CONT) -> None:
        try:
            self.ptrace(request, tid, 0, sig)
        except WitnessError as exc:
            if exc.errno != errno.ESRCH:  # killed while stopped (group exit)
                raise

    def detach_all(self) -> None:
        """Interrupt each live thread, wait for its stop, detach keeping a pending signal."""
        while self.tids:
            tid = min(self.tids)
            self.tids.discard(tid)
            try:
                self.ptrace(m.PTRACE_INTERRUPT, tid)
            except WitnessError:
                continue
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                try:
                    got, status = os.waitpid(tid, os.WNOHANG | m.WALL)
                except ChildProcessError:
                    break
                if got == 0:
                    time.sleep(_IDLE_SLEEP_MIN)
                    continue
                if not os.WIFSTOPPED(status):
                    self._on_exit(tid, status)
                    break
                stop = status >> 8
                sig = stop & 0xFF if stop >> 8 == 0 else 0
                if sig == m.SIGBUS:
                    self._record(tid)
                if stop >> 8 == m.PTRACE_EVENT_CLONE:
                    self.tids.add(self._event_msg(tid))  # auto-attached: detach it as well
                try:
                    self.ptrace(m.PTRACE_DETACH, tid, 0, sig)
                except WitnessError as exc:
                    if exc.errno != errno.ESRCH:
                        raise
                break
        self.emit({"event": "detached"})


class SigbusWitness:
    """Watch process ``pid`` for SIGBUS without changing its behaviour.

    A context manager: on entry a tracer process seizes every thread of ``pid`` (entry fails
    with ``WitnessError`` if it cannot); on exit it detaches from every live thread.
    ``records`` grows as signals arrive; ``wait_for`` blocks until a count is reached;
    ``exit_status`` is the target's wait status once it died (the target's real parent
    still reaps it as usual).
    """

    def __init__(self, pid: int, attach_timeout: float = 10.0) -> None:
        if pid <= 0:
            raise ValueError(f"pid must be a positive process id, got {pid}")
        self.pid = pid
        self.attach_timeout = attach_timeout
        self.tids_at_attach: tuple[int, ...] = ()
        self.exit_status: int | None = None
        self.other_signals: list[tuple[int, int]] = []  # (tid, signo) passed through unchanged
        self._records: list[SigbusRecord] = []
        self._cond = threading.Condition()
        self._attached = False
        self._agent_done = False
        self._error: str | None = None
        self._agent: subprocess.Popen[bytes] | None = None
        self._agent_stderr: tempfile._TemporaryFileWrapper[bytes] | None = None
        self._reader: threading.Thread | None = None

    @property
    def records(self) -> list[SigbusRecord]:
        with self._cond:
            return list(self._records)

    @property
    def tracer_pid(self) -> int | None:
        """Pid of the tracer process while attached (it shows as TracerPid of the target)."""
        return None if self._agent is None else self._agent.pid

    def wait_for(self, count: int, timeout: float) -> list[SigbusRecord]:
        """Block until ``count`` SIGBUS were seen; raises TimeoutError naming expected/actual."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._records) >= count or self._agent_done, timeout)
            if len(self._records) < count:
                ended = "" if self.exit_status is None else f"; target exited ({self.exit_status:#x})"
                raise TimeoutError(
                    f"expected {count} SIGBUS in pid {self.pid} within {timeout}s, saw {len(self._records)}{ended}"
                )
            return list(self._records)

    def wait_exit(self, timeout: float) -> int:
        """Block until the target died; returns its wait status (as ``os.waitpid`` gives it)."""
        with self._cond:
            self._cond.wait_for(lambda: self._agent_done, timeout)
            if self.exit_status is None:
                raise TimeoutError(f"pid {self.pid} still running after {timeout}s")
            return self.exit_status

    def start(self) -> None:
        if self._agent is not None:
            raise RuntimeError(f"witness of pid {self.pid} already started")
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        # The tracer's stderr (a traceback if it crashes) goes to a file nobody has to drain,
        # and is quoted in the error that its failure raises.
        self._agent_stderr = tempfile.NamedTemporaryFile(prefix="gmemtest-witness-", suffix=".stderr")  # noqa: SIM115
        self._agent = subprocess.Popen(
            [sys.executable, "-m", "host_stack.witness", str(self.pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._agent_stderr,
            env=env,
        )
        self._reader = threading.Thread(target=self._read_agent, name=f"sigbus-witness-{self.pid}", daemon=True)
        self._reader.start()
        with self._cond:
            self._cond.wait_for(lambda: self._attached or self._agent_done, self.attach_timeout)
            attached, error, done = self._attached, self._error, self._agent_done
        if not attached:
            status = None
            if done:  # its output ended: it is exiting, give it a moment to be reaped
                with contextlib.suppress(subprocess.TimeoutExpired):
                    status = self._agent.wait(2.0)
            self.stop(keep_stderr=True)
            stderr = self.agent_stderr()
            self._close_stderr()
            why = error or (
                f"the tracer exited with status {status}" if status is not None
                else f"no answer within {self.attach_timeout}s"
            )  # fmt: skip
            raise WitnessError(
                errno.EPERM if error else errno.ETIMEDOUT,
                f"could not attach to pid {self.pid}: {why}"
                + (f"; tracer stderr: {stderr}" if stderr else "; tracer stderr is empty"),
            )

    def agent_stderr(self, limit: int = 2000) -> str:
        """The tracer process's stderr so far (its traceback, if it crashed)."""
        if self._agent_stderr is None:
            return ""
        with open(self._agent_stderr.name, "rb") as f:
            return f.read().decode(errors="replace").strip()[-limit:]

    def _close_stderr(self) -> None:
        stderr, self._agent_stderr = self._agent_stderr, None
        if stderr is not None:
            stderr.close()

    def stop(self, timeout: float = 10.0, *, keep_stderr: bool = False) -> None:
        """Detach from every live thread and reap the tracer process."""
        agent, self._agent = self._agent, None
        if agent is None:
            if not keep_stderr:
                self._close_stderr()
            return
        try:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
            agent.wait(timeout)
        except subprocess.TimeoutExpired:
            agent.kill()  # the kernel detaches a dead tracer's tracees
            agent.wait()
        finally:
            if self._reader is not None:
                self._reader.join(timeout)
            if agent.stdout is not None:
                agent.stdout.close()
            if agent.returncode not in (0, -signal.SIGTERM) and (stderr := self.agent_stderr()):
                _log.error("witness of pid %d: tracer exited %s: %s", self.pid, agent.returncode, stderr)
            if not keep_stderr:
                self._close_stderr()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _read_agent(self) -> None:
        agent = self._agent
        assert agent is not None and agent.stdout is not None
        try:
            for line in agent.stdout:
                try:
                    self._handle(json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:
                    # A garbled line is the tracer's fault: say so to the waiters, never hang them.
                    with self._cond:
                        self._error = f"tracer sent an unreadable line {line!r}: {exc}"
                    _log.error("witness of pid %d: %s", self.pid, self._error)
        finally:
            with self._cond:
                self._agent_done = True
                self._cond.notify_all()

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.pop("event")
        with self._cond:
            if kind == "attached":
                self.tids_at_attach = tuple(msg["tids"])
                self._attached = True
            elif kind == "sigbus":
                record = SigbusRecord(**msg)
                _log.info(
                    "SIGBUS pid %d tid %d %s addr %#x lsb %d",
                    record.pid, record.tid, record.code_name, record.si_addr, record.si_addr_lsb,
                )  # fmt: skip
                self._records.append(record)
            elif kind == "signal":
                self.other_signals.append((int(msg["tid"]), int(msg["signo"])))
            elif kind == "exit":
                self.exit_status = int(msg["status"])
            elif kind == "error":
                self._error = str(msg["message"])
                _log.error("witness of pid %d: %s", self.pid, self._error)
            self._cond.notify_all()


def main(argv: list[str] | None = None) -> int:
    """Tracer process entry point: ``python -m host_stack.witness PID`` (JSON lines out)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        sys.stderr.write("usage: python -m host_stack.witness PID\n")
        return 2

    def emit(obj: dict[str, object]) -> None:
        try:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # The caller died; detaching still matters. The unwritten line stays buffered and
            # the interpreter's final flush would fail again ("Exception ignored ...
            # BrokenPipeError", exit status 120, seen in the lab host's L1): send the rest of
            # the output to /dev/null, as the Python docs advise for SIGPIPE-less pipes.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)

    tracer = _Tracer(int(args[0]), emit)

    def on_term(_signo: int, _frame: object) -> None:
        tracer.stop_requested = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        tracer.attach_all()
        tracer.loop()
    except (OSError, ValueError) as exc:
        emit({"event": "error", "message": str(exc)})
        tracer.detach_all()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
