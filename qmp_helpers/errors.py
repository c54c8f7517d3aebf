"""Exceptions of qmp_helpers: each names the bad value and what would have been valid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class QemuError(Exception):
    """Base of every error raised by qmp_helpers."""


class QemuBinaryNotFound(QemuError):
    """The QEMU binary is not an executable file and is not found on PATH."""

    def __init__(self, binary: str, path: str) -> None:
        self.binary = binary
        self.path = path
        super().__init__(
            f"QEMU binary {binary!r} not found: not an executable path and not on PATH={path!r}"
        )


class QemuLaunchError(QemuError):
    """QEMU exited (or never answered QMP) while being launched; carries its stderr."""

    def __init__(self, message: str, *, argv: Sequence[str], stderr: str,
                 returncode: int | None) -> None:
        self.argv = tuple(argv)
        self.stderr = stderr
        self.returncode = returncode
        text = stderr.strip() or "(QEMU wrote nothing to stderr)"
        super().__init__(f"{message} (exit status {returncode}); QEMU stderr:\n{text}")


class QmpTimeout(QemuError):
    """A QMP exchange did not finish within its deadline."""

    def __init__(self, what: str, timeout: float) -> None:
        self.what = what
        self.timeout = timeout
        super().__init__(f"{what} did not complete within {timeout:.1f} s")


class QmpConnectionError(QemuError):
    """The QMP connection could not be made or broke during an exchange (qemu.qmp's error wrapped).

    Callers see one project error type whatever qemu.qmp raised (ConnectError, StateError,
    a protocol or disconnect error); the original stays available as ``__cause__``.
    """

    def __init__(self, what: str, cause: BaseException) -> None:
        self.what = what
        super().__init__(f"{what} failed: {type(cause).__name__}: {cause}")


class QmpCommandError(QemuError):
    """QEMU answered a QMP command with an error object."""

    def __init__(self, cmd: str, arguments: Mapping[str, Any], error_class: str,
                 desc: str) -> None:
        self.cmd = cmd
        self.arguments = dict(arguments)
        self.error_class = error_class
        self.desc = desc
        super().__init__(
            f"QMP command {cmd!r} with arguments {self.arguments!r} failed: "
            f"{error_class}: {desc}"
        )


class HmpError(QemuError):
    """An HMP command succeeded at the QMP level but its reply text is an error."""

    def __init__(self, command_line: str, reply: str, matched: str) -> None:
        self.command_line = command_line
        self.reply = reply
        self.matched = matched
        super().__init__(
            f"HMP command {command_line!r} failed (reply matched error shape {matched!r}): "
            f"{reply.strip()!r}"
        )


class GpaOutOfRange(QemuError, ValueError):
    """A guest-physical address is not backed by guest RAM."""

    def __init__(self, gpa: int, ram_ranges: Sequence[tuple[int, int, str]],
                 detail: str = "") -> None:
        self.gpa = gpa
        self.ram_ranges = tuple(ram_ranges)
        ranges = ", ".join(f"{start:#x}-{end:#x} ({name})" for start, end, name in ram_ranges)
        extra = f"; {detail}" if detail else ""
        super().__init__(
            f"gpa {gpa:#x} is not in guest RAM; RAM ranges are: {ranges or '(none)'}{extra}"
        )


class EventTimeout(QemuError):
    """The awaited QMP event (or console pattern) did not come in time."""

    def __init__(self, what: str, timeout: float, seen: Sequence[str]) -> None:
        self.what = what
        self.timeout = timeout
        self.seen = tuple(seen)
        super().__init__(
            f"expected {what} within {timeout:.1f} s; actually saw: "
            f"{', '.join(self.seen) if self.seen else 'nothing'}"
        )


class MachineStateError(QemuError):
    """The machine is not in a state that allows the call (not launched, already shut down)."""


class MachineStuck(MachineStateError):
    """The VM stopped in a run state it will not leave (``internal-error``): ``state`` names it."""

    def __init__(self, message: str, *, state: str) -> None:
        super().__init__(message)
        self.state = state


class QemuDied(MachineStateError):
    """QEMU exited while a QMP command ran (an abort, a crash): ``returncode`` and its stderr say why."""

    def __init__(self, message: str, *, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


class MigrationError(QemuError):
    """Saving the machine's state to a file, or loading it, did not complete.

    ``status`` is the last ``query-migrate`` status seen (``failed``, ``active`` at a
    deadline, or ``exited`` when QEMU went away), ``detail`` QEMU's own ``error-desc``.
    """

    def __init__(self, message: str, *, status: str, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class LandingNotReached(QemuError):
    """No stop of the VM found a vCPU where an injection must land (``QemuMachine.inject_mce_at``)."""

    def __init__(self, what: str, tries: int, seen: Sequence[str]) -> None:
        self.what = what
        self.tries = tries
        self.seen = tuple(seen)
        shown = "; ".join(self.seen[-5:]) or "nothing"
        super().__init__(f"in {tries} stops of the VM no vCPU was {what}; the last stops found: {shown}")
