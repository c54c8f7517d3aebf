"""SSH into an ephemeral guest with honest readiness.

Behind QEMU's user networking (SLIRP ``hostfwd``) the host port accepts TCP long before the
guest's SSH server exists, so "the port is open" means nothing.  The caller gates on the
guest's console marker (``ready``), then :meth:`SshSession.connect` retries, within one
deadline, only on the errors that mean "not ready yet", and reports how many attempts it made,
the last error and the tail of the console log when it gives up.  Every other error (a bad
key, a refused login) fails at once: retrying would only hide it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import paramiko

from guests.errors import GuestError

__all__ = [
    "CommandFailedError",
    "CommandResult",
    "CommandTimeoutError",
    "SshConnectError",
    "SshError",
    "SshSession",
    "is_not_ready_error",
]

LOG = logging.getLogger(__name__)

CONSOLE_TAIL_LINES = 20

# SSHException texts that mean the server side is not (fully) up yet.
_NOT_READY_TEXTS = (
    "Error reading SSH protocol banner",
    "Negotiation failed",
    "No existing session",
    "Connection reset by peer",
)


class SshError(GuestError):
    """Base of every error raised by this module."""


class SshConnectError(SshError):
    """No SSH session could be established before the deadline (or a fatal error occurred)."""

    def __init__(self, message: str, *, attempts: int, last_error: BaseException | None,
                 console_tail: list[str]) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_error = last_error
        self.console_tail = console_tail


class CommandTimeoutError(SshError):
    """A remote command did not finish within its timeout (it has been abandoned)."""


class CommandFailedError(SshError):
    """A remote command run by :meth:`SshSession.run_checked` exited non-zero."""

    def __init__(self, message: str, result: CommandResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class CommandResult:
    """What a finished remote command left behind."""

    command: str
    exit_status: int
    stdout: str
    stderr: str


def is_not_ready_error(exc: BaseException) -> bool:
    """True when ``exc`` means "the SSH server is not there yet", so a retry may succeed."""
    if isinstance(exc, paramiko.AuthenticationException):
        return False
    if isinstance(exc, (paramiko.ssh_exception.NoValidConnectionsError, ConnectionRefusedError,
                        ConnectionResetError, ConnectionAbortedError, EOFError,
                        socket.timeout, TimeoutError)):
        return True
    if isinstance(exc, paramiko.SSHException):
        text = str(exc)
        return any(fragment in text for fragment in _NOT_READY_TEXTS)
    return False


def _console_tail(console_log: Path | None, lines: int = CONSOLE_TAIL_LINES) -> list[str]:
    if console_log is None:
        return []
    try:
        text = console_log.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return [f"<console log {console_log} unreadable: {exc}>"]
    return text.splitlines()[-lines:]


def _fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


class _LogEphemeralHostKey(paramiko.MissingHostKeyPolicy):
    """Accept the guest's host key (guests are created per test) but leave a trace of it."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        LOG.info("accepting ephemeral host key of %s: %s %s", hostname, key.get_name(),
                 _fingerprint(key))


def _load_key(key_path: Path) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(key_path)
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise SshConnectError(f"cannot load SSH private key {key_path}: {exc}",
                              attempts=0, last_error=exc, console_tail=[]) from exc


def _pass_readiness_gate(ready: Callable[[float], object], remaining: float, where: str,
                         console_log: Path | None) -> None:
    """``ready`` (e.g. the console-marker wait) must return before any SSH attempt is made."""
    try:
        ready(remaining)
    except Exception as exc:
        tail = _console_tail(console_log)
        raise SshConnectError(f"readiness gate for {where} failed before any SSH attempt: "
                              f"{exc!r}" + _format_tail(console_log, tail),
                              attempts=0, last_error=exc, console_tail=tail) from exc


def _login_once(host: str, port: int, user: str, pkey: paramiko.PKey, per_try: float, *,
                banner_timeout: float, auth_timeout: float) -> paramiko.SSHClient:
    """One key-only login attempt; the client is closed again when it fails."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(_LogEphemeralHostKey())
    try:
        client.connect(host, port=port, username=user, pkey=pkey, timeout=per_try,
                       banner_timeout=min(banner_timeout, per_try), auth_timeout=min(auth_timeout, per_try),
                       allow_agent=False, look_for_keys=False)
    except BaseException:
        client.close()
        raise
    return client


class SshSession:
    """One logged-in SSH connection; use :meth:`connect` to make one."""

    def __init__(self, client: paramiko.SSHClient, *, host: str, port: int, user: str,
                 attempts: int) -> None:
        self._client = client
        self.host = host
        self.port = port
        self.user = user
        self.attempts = attempts
        self._channels: list[paramiko.Channel] = []
        transport = client.get_transport()
        key = transport.get_remote_server_key() if transport is not None else None
        self.host_key_fingerprint = _fingerprint(key) if key is not None else ""

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        key_path: Path,
        *,
        user: str = "root",
        deadline_s: float = 60.0,
        attempt_timeout_s: float = 10.0,
        banner_timeout: float = 10.0,
        auth_timeout: float = 10.0,
        retry_interval_s: float = 0.25,
        console_log: Path | None = None,
        ready: Callable[[float], object] | None = None,
    ) -> SshSession:
        """Log in with the private key at ``key_path``, retrying until ``deadline_s`` elapses.

        ``ready`` (for example the machine's console-marker wait) is called first with the
        seconds left before the deadline; it should raise when the guest cannot become ready.
        Only errors that :func:`is_not_ready_error` accepts are retried.  Password, agent and
        ``~/.ssh`` keys are never used.
        """
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        if not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        start = time.monotonic()
        deadline = start + deadline_s
        pkey = _load_key(key_path)
        if ready is not None:
            _pass_readiness_gate(ready, deadline - time.monotonic(), f"{user}@{host}:{port}", console_log)

        attempts = 0
        last_error: BaseException | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and attempts > 0:
                break
            attempts += 1
            per_try = max(0.5, min(attempt_timeout_s, remaining))
            try:
                client = _login_once(host, port, user, pkey, per_try, banner_timeout=banner_timeout,
                                     auth_timeout=auth_timeout)
            except Exception as exc:
                last_error = exc
                if not is_not_ready_error(exc):
                    tail = _console_tail(console_log)
                    raise SshConnectError(
                        f"SSH to {user}@{host}:{port} failed with a non-retryable error on "
                        f"attempt {attempts}: {exc!r}" + _format_tail(console_log, tail),
                        attempts=attempts, last_error=exc, console_tail=tail,
                    ) from exc
                LOG.debug("SSH attempt %d to %s:%d not ready: %r", attempts, host, port, exc)
                sleep = min(retry_interval_s, deadline - time.monotonic())
                if sleep > 0:
                    time.sleep(sleep)
                continue
            elapsed = time.monotonic() - start
            LOG.info("SSH %s@%s:%d up after %d attempt(s), %.2fs", user, host, port, attempts,
                     elapsed)
            return cls(client, host=host, port=port, user=user, attempts=attempts)

        tail = _console_tail(console_log)
        raise SshConnectError(
            f"SSH to {user}@{host}:{port} not ready after {attempts} attempt(s) in "
            f"{deadline_s:.1f}s; last error: {last_error!r}" + _format_tail(console_log, tail),
            attempts=attempts, last_error=last_error, console_tail=tail,
        )

    # -- commands ------------------------------------------------------------------------

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SshError(f"SSH session to {self.host}:{self.port} is closed")
        return transport

    def run(self, command: str, timeout: float) -> CommandResult:
        """Run ``command`` and collect its exit status and output (both streams, fully).

        paramiko's and the socket's errors (a guest that panicked or went away) come out as
        :class:`SshError` naming the command; the original is its ``__cause__``.
        """
        try:
            return self._run(command, timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"SSH command {command!r} to {self.host}:{self.port} failed: "
                           f"{type(exc).__name__}: {exc}") from exc

    def _run(self, command: str, timeout: float) -> CommandResult:
        deadline = time.monotonic() + timeout
        channel = self._transport().open_session(timeout=timeout)
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            _exec_with_deadline(channel, command, timeout)
            channel.settimeout(0.0)
            while True:
                progressed = False
                while channel.recv_ready():
                    out.append(channel.recv(65536))
                    progressed = True
                while channel.recv_stderr_ready():
                    err.append(channel.recv_stderr(65536))
                    progressed = True
                if (channel.exit_status_ready() and not channel.recv_ready()
                        and not channel.recv_stderr_ready()):
                    break
                if time.monotonic() >= deadline:
                    raise CommandTimeoutError(
                        f"command {command!r} did not finish within {timeout}s; "
                        f"stdout so far: {b''.join(out)[-500:]!r}, "
                        f"stderr so far: {b''.join(err)[-500:]!r}"
                    )
                if not progressed:
                    time.sleep(0.005)
            status = channel.recv_exit_status()
            _await_server_close(channel, deadline)
        finally:
            channel.close()
        result = CommandResult(
            command=command, exit_status=status,
            stdout=b"".join(out).decode("utf-8", errors="replace"),
            stderr=b"".join(err).decode("utf-8", errors="replace"),
        )
        LOG.debug("ran %r -> %d", command, status)
        return result

    def run_checked(self, command: str, timeout: float) -> CommandResult:
        """Like :meth:`run`, but an exit status other than 0 raises :class:`CommandFailedError`."""
        result = self.run(command, timeout)
        if result.exit_status != 0:
            raise CommandFailedError(
                f"command {command!r} exited with status {result.exit_status} (expected 0); "
                f"stderr: {result.stderr.strip()[-1000:]!r}",
                result,
            )
        return result

    def start(self, command: str, timeout: float = 10.0) -> paramiko.Channel:
        """Start a long-running ``command`` and hand its channel to the caller.

        The session closes the channel on :meth:`close` if the caller has not.
        """
        try:
            channel = self._transport().open_session(timeout=timeout)
            _exec_with_deadline(channel, command, timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"starting {command!r} over SSH to {self.host}:{self.port} failed: "
                           f"{type(exc).__name__}: {exc}") from exc
        self._channels.append(channel)
        return channel

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _await_server_close(channel: paramiko.Channel, deadline: float) -> None:
    """Let the server close a finished channel first (paramiko answers its CLOSE by itself).

    Closing from our side while dropbear (the guest's server, 2022.83) closes the same channel
    after its child exited makes it fail ``assert(!channel->sent_close)`` in common-channel.c and
    drop the whole connection: seen as "Channel closed" for every later command of the session.
    """
    limit = min(deadline, time.monotonic() + 2.0)
    while not channel.closed and time.monotonic() < limit:
        time.sleep(0.002)


def _exec_with_deadline(channel: paramiko.Channel, command: str, timeout: float) -> None:
    """``exec_command`` with a deadline: paramiko waits for the server's reply without one.

    A guest that dies between the channel opening and the exec reply (a panic) keeps its TCP
    connection open behind SLIRP, and ``exec_command`` would wait for ever. Closing the channel
    wakes it; that is reported as a :class:`CommandTimeoutError`.
    """
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        channel.close()

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        channel.exec_command(command)
    except paramiko.SSHException as exc:
        if fired.is_set():
            raise CommandTimeoutError(f"the server did not accept command {command!r} within "
                                      f"{timeout}s (the guest may have died)") from exc
        raise
    finally:
        timer.cancel()


def _format_tail(console_log: Path | None, tail: list[str]) -> str:
    if console_log is None:
        return ""
    if not tail:
        return f"\nconsole log {console_log}: empty"
    body = "\n  ".join(tail)
    return f"\nlast {len(tail)} line(s) of console log {console_log}:\n  {body}"
