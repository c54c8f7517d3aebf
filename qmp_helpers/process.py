"""The QEMU child process: started without a shell, bound to the life of its launcher.

Why a dedicated launcher thread: ``prctl(PR_SET_PDEATHSIG)`` fires when the *thread* that
forked the child exits, not the process. If a short-lived worker thread launched QEMU, QEMU
would be SIGKILLed as soon as that thread ended. So each QEMU is forked by its own thread,
which then blocks in ``waitpid`` and therefore lives exactly as long as QEMU. When the whole
launching process dies (even by SIGKILL) the kernel sends QEMU SIGKILL.

Belt and braces: every QEMU carries a tag ``gmemtest-<launcher pid>-<12 hex>`` in its
``-name`` argument; :func:`reap_orphans` kills tagged QEMUs whose parent is no longer the
launcher named in the tag.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import re
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

from polling import poll_until

from ._uapi import PR_SET_PDEATHSIG

_LOG = logging.getLogger(__name__)

TAG_PREFIX = "gmemtest-"
# The tag is the last thing in the ``-name guest=...`` value (anchored at the end so a
# caller's own guest name cannot be mistaken for it).
_TAG_RE = re.compile(re.escape(TAG_PREFIX) + r"(\d+)-([0-9a-f]{12})$")


def new_tag() -> str:
    """A unique per-machine tag naming this (the launching) process."""
    return f"{TAG_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _pdeathsig_setup(launcher_pid: int) -> Callable[[], None]:
    """preexec_fn for the child: SIGKILL on launcher-thread death, and no race with it."""
    libc = ctypes.CDLL(None, use_errno=True)  # resolved in the parent, before fork
    prctl = libc.prctl

    def setup() -> None:
        if prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != launcher_pid:  # launcher died between fork() and prctl()
            os._exit(126)

    return setup


class QemuProcess:
    """A child process forked and waited for by its own thread (see module docstring)."""

    def __init__(self, argv: Sequence[str], output: IO[bytes],
                 on_exit: Callable[[int], None] | None = None) -> None:
        self.argv = tuple(argv)
        self._on_exit = on_exit
        self._output = output
        self._popen: subprocess.Popen[bytes] | None = None
        self._spawn_error: BaseException | None = None
        self._started = threading.Event()
        self._exited = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qemu-launcher", daemon=True)

    def start(self) -> None:
        """Fork QEMU from the launcher thread; re-raises spawn errors (ENOENT, EACCES)."""
        self._thread.start()
        self._started.wait()
        if self._spawn_error is not None:
            self._thread.join()
            raise self._spawn_error

    def _run(self) -> None:
        try:
            self._popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._output,
                stderr=self._output, close_fds=True, start_new_session=True,
                preexec_fn=_pdeathsig_setup(os.getpid()),  # noqa: PLW1509
            )
        except BaseException as exc:
            self._spawn_error = exc
            self._started.set()
            return
        self._started.set()
        status = self._popen.wait()
        self._exited.set()
        if self._on_exit is not None:
            try:
                self._on_exit(status)
            except Exception:
                _LOG.exception("on_exit callback for QEMU pid %d failed", self._popen.pid)

    @property
    def pid(self) -> int:
        """The QEMU pid."""
        if self._popen is None:
            raise RuntimeError("QEMU process was never started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once reaped, else None."""
        return self._popen.returncode if self._exited.is_set() and self._popen else None

    def running(self) -> bool:
        """True until the launcher thread has reaped QEMU."""
        return self._popen is not None and not self._exited.is_set()

    def wait(self, timeout: float) -> bool:
        """Wait for QEMU to be reaped; True if it was."""
        return self._exited.wait(timeout)

    def signal(self, signum: int) -> None:
        """Send a signal unless already reaped (the pid could be reused after that)."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def stop(self, term_timeout: float = 3.0) -> int | None:
        """SIGTERM, then SIGKILL; always reaps. Returns the exit status."""
        if self._popen is None:
            return None
        for signum, wait_s in ((signal.SIGTERM, term_timeout), (signal.SIGKILL, 10.0)):
            if not self.running():
                break
            _LOG.debug("sending %s to QEMU pid %d", signal.Signals(signum).name, self.pid)
            self.signal(signum)
            self.wait(wait_s)
        self._thread.join(10.0)
        return self.returncode


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces or parentheses: fields after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _name_tag(cmdline: list[str]) -> re.Match[str] | None:
    for flag, value in itertools.pairwise(cmdline):
        if flag == "-name":
            return _TAG_RE.search(value.split(",", 1)[0])
    return None


def find_tagged_qemus() -> dict[int, str]:
    """pid -> tag for every running process whose ``-name`` carries a gmemtest tag."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        match = _name_tag(cmdline)
        if match is not None:
            found[int(entry.name)] = match.group(0)
    return found


def reap_orphans(timeout: float = 5.0, *, only: Iterable[int] | None = None) -> list[int]:
    """SIGKILL tagged QEMUs whose parent is not the launcher named in their tag.

    A QEMU is an orphan when its launcher died (it was reparented, so its ppid no longer
    equals the pid in the tag). ``only`` limits the sweep to those pids (a test judging its
    own QEMUs must not kill another job's). Returns the pids killed; waits up to ``timeout``
    for them to disappear.
    """
    killed: list[int] = []
    allowed = None if only is None else set(only)
    for pid, tag in find_tagged_qemus().items():
        if allowed is not None and pid not in allowed:
            continue
        match = _TAG_RE.fullmatch(tag)
        if match is None or _ppid(pid) == int(match.group(1)):
            continue
        _LOG.warning("killing orphaned QEMU pid %d (tag %s)", pid, tag)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    if killed:
        poll_until(lambda: not any(_alive(pid) for pid in killed), timeout=timeout, interval=0.05)
    return killed
