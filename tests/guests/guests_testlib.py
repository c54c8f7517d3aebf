"""Helpers shared by the guests tests: free ports, SSH keys, a real local dropbear server.

The SSH server is dropbear (the same server the guest image runs), started as root inside a
private mount namespace whose /root is a temporary directory holding only the test's
authorized_keys. So the login is the real one the guest uses (root, public key only), the
probe runs with root's view of PFNs, and neither /root nor /etc/passwd of this machine is
touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

CFLAGS = ["-static", "-O2", "-Wall", "-Wextra", "-Werror"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"expected a listener on 127.0.0.1:{port} within {timeout}s, found none")


# x86_64 syscall numbers the probe's 'wait' sleeps in (arch/x86/entry/syscalls/syscall_64.tbl).
SLEEP_SYSCALLS = frozenset({35, 230})  # nanosleep, clock_nanosleep


def wait_until_sleeping(read_syscall: Callable[[], str], timeout: float = 10.0) -> None:
    """Poll ``/proc/PID/syscall`` (through ``read_syscall``) until the probe sleeps in its wait.

    Replaces a fixed sleep: a signal or MCE sent before the probe is in its wait would land
    while it is idle, and the test would judge the wrong moment.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        last = read_syscall().strip()
        fields = last.split()
        if fields and fields[0].isdigit() and int(fields[0]) in SLEEP_SYSCALLS:
            return
        time.sleep(0.02)
    raise AssertionError(f"expected the probe in nanosleep/clock_nanosleep within {timeout}s; "
                         f"/proc/PID/syscall last read {last!r}")


@dataclass
class SshKeys:
    private: Path
    public_line: str


def make_key(path: Path) -> SshKeys:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return SshKeys(path, public.decode("ascii") + " gmemtest-test")


@dataclass
class Dropbear:
    """A root-login dropbear whose /root is a private temporary directory."""

    root_home: Path
    host_key: Path
    client: SshKeys
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def start(self) -> None:
        assert self.proc is None, "dropbear already started"
        self.log = self.root_home.parent / f"dropbear-{self.port}.log"
        script = 'mount --bind "$1" /root && exec dropbear -F -E -s -p "127.0.0.1:$2" -r "$3" -P "$4"'
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
                str(self.root_home), str(self.port), str(self.host_key),
                str(self.root_home.parent / f"dropbear-{self.port}.pid")]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        # Per-connection children live in the same session/process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def host_key_fingerprint(self) -> str:
        out = subprocess.run(["dropbearkey", "-y", "-f", str(self.host_key)],
                             capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Fingerprint:"):
                return line.split()[-1]
        raise AssertionError(f"no 'Fingerprint:' line in dropbearkey output: {out!r}")
