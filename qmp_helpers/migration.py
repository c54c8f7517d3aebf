"""A machine's state saved to a file and loaded into a fresh QEMU (migration to ``file:``).

Save: ``stop``, ``migrate`` to ``file:<path>``, wait until ``query-migrate`` says completed;
the source stays paused (post-migrate) and may be resumed with ``cont``. Load: a QEMU started
with ``-incoming defer`` (``QemuMachine(incoming=True)``) and the *same* stable argv gets
``migrate-incoming`` with ``exit-on-error=false``, so a bad file leaves a QEMU that answers
QMP with the reason instead of a QEMU that is gone; then ``cont``.

Nothing here knows about caches or guests: the caller decides what a state file is for.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MachineStateError, MigrationError, QemuError, QmpCommandError
from .machine import QemuMachine

__all__ = ["LoadRecord", "SaveRecord", "load_state", "save_state"]

_LOG = logging.getLogger(__name__)
_POLL_S = 0.01


@dataclass(frozen=True)
class SaveRecord:
    path: Path
    size_bytes: int
    seconds: float
    ram_transferred_bytes: int | None


@dataclass(frozen=True)
class LoadRecord:
    path: Path
    seconds: float


def _file_uri(path: Path) -> str:
    text = str(path)
    if not path.is_absolute() or "," in text:
        raise ValueError(f"state file path must be absolute and free of commas (QEMU's file: URI "
                         f"takes options after one), got {text!r}")
    return f"file:{text}"


def _wait_completed(machine: QemuMachine, what: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status = "none"
    while True:
        try:
            info = machine.qmp("query-migrate")
        except (QemuError, MachineStateError) as exc:
            raise MigrationError(f"{what}: QEMU stopped answering QMP ({exc}); see {machine.stderr_log}",
                                 status="exited", detail=str(exc)) from exc
        status = str(info.get("status", "none"))
        if status == "completed":
            return dict(info)
        if status in ("failed", "cancelled"):
            detail = str(info.get("error-desc", ""))
            raise MigrationError(f"{what}: expected status completed, got {status}: {detail}",
                                 status=status, detail=detail)
        if time.monotonic() > deadline:
            raise MigrationError(f"{what}: expected status completed within {timeout:.1f} s, still {status}",
                                 status=status)
        time.sleep(_POLL_S)


def save_state(machine: QemuMachine, path: Path, *, timeout: float = 60.0) -> SaveRecord:
    """Pause the guest and write its whole state to ``path``; the guest stays paused.

    A QEMU that refuses (a migration blocker such as a mounted virtio-9p share) raises
    :class:`MigrationError` with status ``refused`` and QEMU's reason; the guest is paused then
    too, and the caller decides whether to resume it.
    """
    uri = _file_uri(path)
    t0 = time.monotonic()
    machine.qmp("stop")
    try:
        machine.qmp("migrate", uri=uri)
    except QmpCommandError as exc:  # a migration blocker (a mounted 9p share, SEV/TDX, ...)
        raise MigrationError(f"saving {machine.name}: QEMU refused to migrate: {exc.desc}",
                             status="refused", detail=exc.desc) from exc
    info = _wait_completed(machine, f"saving {machine.name} to {path}", timeout)
    seconds = time.monotonic() - t0
    ram = info.get("ram", {})
    record = SaveRecord(path, path.stat().st_size, round(seconds, 4),
                        int(ram["transferred"]) if "transferred" in ram else None)
    _LOG.info("%s: state saved to %s (%d bytes) in %.2f s", machine.name, path, record.size_bytes, seconds)
    return record


def load_state(machine: QemuMachine, path: Path, *, timeout: float = 60.0) -> LoadRecord:
    """Load ``path`` into ``machine`` (launched with ``incoming=True``) and resume the guest."""
    if not machine.incoming:
        raise MachineStateError(f"machine {machine.name} was not launched with incoming=True "
                                "(-incoming defer); it cannot load a saved state")
    uri = _file_uri(path)
    if not path.is_file():
        raise MigrationError(f"state file {path} does not exist", status="none")
    t0 = time.monotonic()
    machine.qmp("migrate-incoming", uri=uri, **{"exit-on-error": False})
    _wait_completed(machine, f"loading {path} into {machine.name}", timeout)
    machine.qmp("cont")
    seconds = time.monotonic() - t0
    _LOG.info("%s: state loaded from %s and resumed in %.2f s", machine.name, path, seconds)
    return LoadRecord(path, round(seconds, 4))
