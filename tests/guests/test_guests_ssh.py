"""SshSession against a real SSH server (dropbear, as in the guest image)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest
from guests_testlib import Dropbear, free_port, make_key

from guests.ssh import (
    CommandFailedError,
    CommandTimeoutError,
    SshConnectError,
    SshSession,
    is_not_ready_error,
)


def test_run_collects_status_and_both_streams(dropbear: Dropbear) -> None:
    with SshSession.connect("127.0.0.1", dropbear.port, dropbear.client.private,
                            deadline_s=15) as ssh:
        result = ssh.run("echo out; echo err >&2; exit 7", timeout=10)
        assert (result.exit_status, result.stdout, result.stderr) == (7, "out\n", "err\n")
        assert ssh.run_checked("id -u", timeout=10).stdout == "0\n"
        assert ssh.attempts == 1
        assert ssh.host_key_fingerprint == dropbear.host_key_fingerprint()


def test_run_checked_names_command_status_and_stderr(dropbear: Dropbear) -> None:
    with SshSession.connect("127.0.0.1", dropbear.port, dropbear.client.private,
                            deadline_s=15) as ssh:
        with pytest.raises(CommandFailedError) as info:
            ssh.run_checked("echo broken-thing >&2; exit 3", timeout=10)
        text = str(info.value)
        assert "'echo broken-thing >&2; exit 3'" in text
        assert "status 3" in text and "broken-thing" in text
        assert info.value.result.exit_status == 3


def test_run_timeout_is_an_error_naming_the_command(dropbear: Dropbear) -> None:
    with SshSession.connect("127.0.0.1", dropbear.port, dropbear.client.private,
                            deadline_s=15) as ssh:
        t0 = time.monotonic()
        with pytest.raises(CommandTimeoutError, match=r"'echo partial; sleep 30'.*0.5s"):
            ssh.run("echo partial; sleep 30", timeout=0.5)
        assert time.monotonic() - t0 < 5
        # The session stays usable after an abandoned command.
        assert ssh.run_checked("echo again", timeout=10).stdout == "again\n"


def test_start_gives_a_live_channel(dropbear: Dropbear) -> None:
    with SshSession.connect("127.0.0.1", dropbear.port, dropbear.client.private,
                            deadline_s=15) as ssh:
        channel = ssh.start("cat")
        channel.sendall(b"ping\n")
        channel.settimeout(5)
        assert channel.recv(100) == b"ping\n"
        channel.shutdown_write()
        assert channel.recv_exit_status() == 0


def test_nothing_listening_fails_after_bounded_retries(tmp_path: Path) -> None:
    key = make_key(tmp_path / "k").private
    console = tmp_path / "console.log"
    console.write_text("".join(f"boot line {i}\n" for i in range(30)) + "Kernel panic - not syncing\n")
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(SshConnectError) as info:
        SshSession.connect("127.0.0.1", port, key, deadline_s=1.5, retry_interval_s=0.2,
                           console_log=console)
    elapsed = time.monotonic() - t0
    err = info.value
    text = str(err)
    assert err.attempts >= 3, f"expected >= 3 attempts in 1.5 s, got {err.attempts}"
    assert f"after {err.attempts} attempt(s)" in text
    assert "NoValidConnectionsError" in text or "refused" in text.lower()
    assert str(console) in text and "Kernel panic - not syncing" in text
    assert "boot line 29" in text and "boot line 5\n" not in text  # only the tail
    assert 1.4 < elapsed < 4.0, f"expected to give up near the 1.5 s deadline, took {elapsed:.2f}s"


def test_server_starting_late_is_retried(dropbear_factory: Callable[[], Dropbear]) -> None:
    server = dropbear_factory()
    timer = threading.Timer(1.5, server.start)
    timer.start()
    try:
        t0 = time.monotonic()
        with SshSession.connect("127.0.0.1", server.port, server.client.private,
                                deadline_s=20, retry_interval_s=0.2) as ssh:
            elapsed = time.monotonic() - t0
            assert ssh.attempts >= 2, f"expected retries before the server existed, got {ssh.attempts}"
            assert elapsed >= 1.4
            assert ssh.run_checked("echo up", timeout=10).stdout == "up\n"
    finally:
        timer.cancel()
        timer.join()


class _AcceptThenClose:
    """What QEMU's SLIRP hostfwd does before the guest's sshd exists: accept TCP, then drop it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        """Stop accepting and free the port; idempotent."""
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_accepting_port_without_ssh_server_is_not_ready(tmp_path: Path) -> None:
    port = free_port()
    trap = _AcceptThenClose(port)
    try:
        with pytest.raises(SshConnectError) as info:
            SshSession.connect("127.0.0.1", port, make_key(tmp_path / "k").private,
                               deadline_s=1.5, retry_interval_s=0.1)
    finally:
        trap.close()
    assert trap.accepted >= 2 and info.value.attempts == trap.accepted
    assert "Error reading SSH protocol banner" in str(info.value)


def test_banner_trap_then_real_server(dropbear_factory: Callable[[], Dropbear]) -> None:
    server = dropbear_factory()
    trap = _AcceptThenClose(server.port)

    def swap() -> None:
        trap.close()
        server.start()

    timer = threading.Timer(1.0, swap)
    timer.start()
    try:
        with SshSession.connect("127.0.0.1", server.port, server.client.private,
                                deadline_s=20, retry_interval_s=0.1) as ssh:
            assert trap.accepted >= 1
            assert ssh.attempts > trap.accepted - 1
            assert ssh.run_checked("true", timeout=10).exit_status == 0
    finally:
        timer.cancel()
        timer.join()
        trap.close()


def test_wrong_key_fails_at_once(dropbear: Dropbear, tmp_path: Path) -> None:
    stranger = make_key(tmp_path / "stranger").private
    t0 = time.monotonic()
    with pytest.raises(SshConnectError) as info:
        SshSession.connect("127.0.0.1", dropbear.port, stranger, deadline_s=30)
    assert info.value.attempts == 1, "an authentication failure must not be retried"
    assert isinstance(info.value.last_error, paramiko.AuthenticationException)
    assert "non-retryable" in str(info.value)
    assert time.monotonic() - t0 < 10


def test_unreadable_key_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-key"
    bad.write_text("hello\n")
    with pytest.raises(SshConnectError, match="not-a-key"):
        SshSession.connect("127.0.0.1", free_port(), bad, deadline_s=1)


def test_ready_gate_runs_first_with_remaining_time(dropbear: Dropbear) -> None:
    seen: list[float] = []
    with SshSession.connect("127.0.0.1", dropbear.port, dropbear.client.private, deadline_s=12,
                            ready=seen.append):
        pass
    assert len(seen) == 1 and 11.0 < seen[0] <= 12.0


def test_failing_ready_gate_reports_console(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("EDK2 stuck\n")

    def gate(timeout: float) -> None:
        raise TimeoutError(f"no GMEMTEST-READY within {timeout:.0f}s")

    with pytest.raises(SshConnectError) as info:
        SshSession.connect("127.0.0.1", free_port(), make_key(tmp_path / "k").private,
                           deadline_s=5, ready=gate, console_log=console)
    assert info.value.attempts == 0
    assert "GMEMTEST-READY" in str(info.value) and "EDK2 stuck" in str(info.value)


@pytest.mark.parametrize(("exc", "retry"), [
    (ConnectionRefusedError(111, "refused"), True),
    (ConnectionResetError(104, "reset"), True),
    (EOFError(), True),
    (paramiko.SSHException("Error reading SSH protocol banner"), True),
    (paramiko.AuthenticationException("Authentication failed."), False),
    (paramiko.SSHException("Incompatible ssh peer (no acceptable host key)"), False),
    (PermissionError(13, "denied"), False),
])
def test_not_ready_classification(exc: BaseException, retry: bool) -> None:
    assert is_not_ready_error(exc) is retry


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_a_server_that_stops_answering_gives_ssh_errors_within_the_deadline(dropbear: Dropbear) -> None:
    """A guest that dies mid-session (its TCP stays open behind SLIRP) must not hang run() or start().

    The dropbear child serving this session is SIGSTOPped: it holds the connection and answers nothing,
    which is what a panicked guest looks like from here. paramiko's own exec wait has no deadline.
    """
    import os
    import signal

    from guests.ssh import SshError

    with SshSession.connect("127.0.0.1", dropbear.port, dropbear.client.private, deadline_s=15) as ssh:
        assert ssh.run_checked("true", timeout=10).exit_status == 0
        assert dropbear.proc is not None
        before = set()
        todo = [dropbear.proc.pid]
        while todo:
            pid = todo.pop()
            kids = _children(pid)
            before.update(kids)
            todo.extend(kids)
        servers = [p for p in before if Path(f"/proc/{p}/comm").read_text().strip() == "dropbear"]
        assert servers, "no per-connection dropbear child found"
        for pid in servers:
            os.kill(pid, signal.SIGSTOP)
        try:
            for call in (lambda: ssh.run("true", timeout=1.0), lambda: ssh.start("true", timeout=1.0)):
                t0 = time.monotonic()
                with pytest.raises(SshError):
                    call()
                assert time.monotonic() - t0 < 5, "the deadline was not kept"
        finally:
            for pid in servers:
                os.kill(pid, signal.SIGCONT)
