"""debugfs and tracefs: find them, mount them for a while, unmount only what we mounted.

The hwpoison-inject and APEI EINJ files live in debugfs, kprobe/uprobe events in tracefs;
neither is mounted by default on every host. Probing or injecting must not leave a mount
behind, so mounting is a context manager that records whether it mounted anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["DEBUGFS", "TRACEFS", "find_mount", "mounted"]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

DEBUGFS: Final = ("debugfs", Path("/sys/kernel/debug"))
TRACEFS: Final = ("tracefs", Path("/sys/kernel/tracing"))
_MOUNTS: Final = Path("/proc/self/mounts")


def find_mount(fstype: str) -> Path | None:
    """Where a file system of ``fstype`` is mounted in this mount namespace, if anywhere."""
    for line in _MOUNTS.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == fstype:
            return Path(fields[1])
    return None


def _mount(fstype: str, target: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", os.fsencode(target), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t {fstype} nodev {target}: {os.strerror(err)}")


def _umount(target: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(target), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


@contextlib.contextmanager
def mounted(fs: tuple[str, Path]) -> Iterator[Path | None]:
    """Yield the mount point of ``fs`` (mounting it if needed and allowed), else None.

    None means it could not be mounted (no such file system, not root, ...): callers turn
    that into a "missing" sentence. Whatever this context mounted, it unmounts on exit.
    """
    fstype, default = fs
    existing = find_mount(fstype)
    if existing is not None:
        yield existing
        return
    try:
        _mount(fstype, default)
    except OSError as exc:
        _log.debug("cannot mount %s: %s", fstype, exc)
        yield None
        return
    _log.debug("mounted %s at %s", fstype, default)
    try:
        yield default
    finally:
        _umount(default)
        _log.debug("unmounted %s at %s", fstype, default)
