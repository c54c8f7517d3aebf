"""A guest kept up after its verdict (`gmemtest run NAME --keep`), and how to reach it.

The engineer chasing a hwpoison bug wants the very guest that just failed: its shell, its QMP,
its console. The keeping process writes a record (ssh port and key, a QMP socket of its own for
the engineer, the console log) under the cache root; `gmemtest ssh` and `gmemtest qmp` find the
newest record whose keeper is still alive, so they need no arguments in the common case. The
record goes when the keeper stops (Ctrl-C), and a record whose keeper died is ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from images.build import default_cache_root

KEPT_DIR = "kept"
# The engineer's own QMP monitor: the keeper's connection holds the main one, and a QEMU
# socket monitor serves one client at a time.
USER_QMP_ID = "gmuserqmp"


@dataclass(frozen=True)
class KeptGuest:
    pid: int  # the keeping gmemtest process
    scenario: str
    profile: str
    ssh_port: int
    ssh_key: str
    qmp_socket: str
    console_log: str
    evidence: str

    def ssh_argv(self, command: list[str] | None = None) -> list[str]:
        """OpenSSH's argv for this guest; the guest's host key is new each boot, hence not checked."""
        return ["ssh", "-i", self.ssh_key, "-p", str(self.ssh_port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "root@127.0.0.1",
                *(command or [])]

    def how_to_reach(self) -> str:
        return (f"guest kept up ({self.scenario} under {self.profile}); Ctrl-C stops it\n"
                f"  ssh:     {' '.join(self.ssh_argv())}   (or: gmemtest ssh)\n"
                f"  qmp:     {self.qmp_socket}   (or: gmemtest qmp query-status)\n"
                f"  console: {self.console_log}\n"
                f"  evidence {self.evidence}")


def user_qmp_args(socket_path: Path) -> list[str]:
    """QEMU arguments for the engineer's QMP monitor at `socket_path`."""
    return ["-chardev", f"socket,id={USER_QMP_ID},path={socket_path},server=on,wait=off",
            "-mon", f"chardev={USER_QMP_ID},mode=control"]


def _records_dir(root: Path | None = None) -> Path:
    return (root or default_cache_root()) / KEPT_DIR


def write_record(kept: KeptGuest, root: Path | None = None) -> Path:
    path = _records_dir(root) / f"{kept.pid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(asdict(kept), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_kept(pid: int | None = None, root: Path | None = None) -> KeptGuest:
    """The kept guest of keeper `pid`, or the newest one alive; LookupError saying what exists."""
    records: list[tuple[float, KeptGuest]] = []
    directory = _records_dir(root)
    for path in directory.glob("*.json") if directory.is_dir() else ():
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            kept = KeptGuest(**data)
        except (OSError, ValueError, TypeError):
            continue
        if _alive(kept.pid):
            records.append((path.stat().st_mtime, kept))
    if pid is not None:
        for _, kept in records:
            if kept.pid == pid:
                return kept
        raise LookupError(f"no kept guest of gmemtest process {pid}; kept now: "
                          + (", ".join(str(k.pid) for _, k in records) or "none"))
    if not records:
        raise LookupError("no kept guest: start one with 'gmemtest run NAME --keep'")
    return max(records, key=lambda r: r[0])[1]


def remove_record(pid: int, root: Path | None = None) -> None:
    (_records_dir(root) / f"{pid}.json").unlink(missing_ok=True)
