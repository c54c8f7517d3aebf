"""debugfs and tracefs: find them, mount them for a while, unmount only what we mounted.

The hwpoison-inject and APEI EINJ files live in debugfs, kprobe/uprobe events in tracefs;
neither is mounted by default on every host. Probing or injecting must not leave a mount
behind, and parallel jobs (separate processes) share one mount: the job that happened to
mount it must not unmount it under another job that still uses it.

So each file system type has three files under ``/run/gmemtest`` (``LOCK_DIR``):

- ``<fstype>.lock``, the guard: held exclusively (flock) for the short mount/unmount decisions;
- ``<fstype>.users``: every user holds a shared flock on it for as long as it uses the mount;
- ``<fstype>.mounted``, the marker: exists while a mount made by gmemtest is in place (its
  content is the mount point), so a mount made by somebody else is never unmounted.

On exit a user drops its shared lock, takes the guard, and unmounts only if an exclusive,
non-blocking flock on a fresh descriptor of the users file succeeds (nobody else uses it) and
the marker says gmemtest mounted it. The kernel drops a killed job's flocks, so a mount (or a
marker without a mount) left by a killed run is cleaned up by the next user's exit (entry).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["DEBUGFS", "LOCK_DIR", "TRACEFS", "find_mount", "mounted"]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

DEBUGFS: Final = ("debugfs", Path("/sys/kernel/debug"))
TRACEFS: Final = ("tracefs", Path("/sys/kernel/tracing"))
LOCK_DIR: Final = Path("/run/gmemtest")
_MOUNTS: Final = Path("/proc/self/mounts")


def _unescape(field: str) -> str:
    """/proc/self/mounts writes space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def find_mount(fstype: str, target: Path | None = None) -> Path | None:
    """Where a file system of ``fstype`` is mounted in this mount namespace, if anywhere.

    With ``target``, only a mount of ``fstype`` exactly at ``target`` counts (a scratch tmpfs
    must not be confused with ``/run``).
    """
    for line in _MOUNTS.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == fstype:
            where = Path(_unescape(fields[1]))
            if target is None or where == target:
                return where
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


def _open_locked(path: Path, operation: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, operation)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _guard(lock_dir: Path, fstype: str) -> Iterator[None]:
    fd = _open_locked(lock_dir / f"{fstype}.lock", fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _marker_target(marker: Path) -> Path | None:
    try:
        return Path(marker.read_text().strip())
    except FileNotFoundError:
        return None


def _enter(fstype: str, default: Path, lock_dir: Path, anywhere: bool) -> tuple[Path | None, int | None]:
    """Under the guard: find or mount, then take the shared users lock. Returns (mount, fd).

    The users file is opened before anything is mounted, so a caller that may not open it
    (not root) fails before it changed anything.
    """
    marker = lock_dir / f"{fstype}.mounted"
    users = os.open(lock_dir / f"{fstype}.users", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    keep = False
    try:
        with _guard(lock_dir, fstype):
            existing = find_mount(fstype, None if anywhere else default)
            recorded = _marker_target(marker)
            if recorded is not None and recorded != existing:
                _log.info("removing stale marker %s (names %s, mounted: %s)", marker, recorded, existing)
                marker.unlink(missing_ok=True)
            if existing is None:
                try:
                    _mount(fstype, default)
                except OSError as exc:
                    _log.debug("cannot mount %s: %s", fstype, exc)
                    return None, None
                marker.write_text(f"{default}\n")
                existing = default
                _log.debug("mounted %s at %s", fstype, default)
            fcntl.flock(users, fcntl.LOCK_SH)
            keep = True
            return existing, users
    finally:
        if not keep:
            os.close(users)


def _leave(fstype: str, lock_dir: Path, users_fd: int) -> None:
    """Drop our use; the last user unmounts what gmemtest mounted."""
    os.close(users_fd)
    marker = lock_dir / f"{fstype}.mounted"
    with _guard(lock_dir, fstype):
        recorded = _marker_target(marker)
        if recorded is None:
            return  # not mounted by gmemtest: never ours to unmount
        try:
            probe = _open_locked(lock_dir / f"{fstype}.users", fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log.debug("%s at %s still has users: left mounted", fstype, recorded)
            return
        try:
            if find_mount(fstype, recorded) is not None:
                _umount(recorded)
                _log.debug("unmounted %s at %s", fstype, recorded)
            marker.unlink(missing_ok=True)
        finally:
            os.close(probe)


@contextlib.contextmanager
def mounted(fs: tuple[str, Path], *, lock_dir: Path = LOCK_DIR, anywhere: bool = True) -> Iterator[Path | None]:
    """Yield the mount point of ``fs`` (mounting it if needed and allowed), else None.

    None means it could not be mounted (no such file system, not root, ...): callers turn
    that into a "missing" sentence. ``anywhere`` accepts a mount of the type elsewhere than
    ``fs``'s default mount point (debugfs mounted at another path still serves). The mount is
    shared with every concurrent user and unmounted by the last one, if gmemtest made it.
    """
    fstype, default = fs
    try:
        lock_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        where, users_fd = _enter(fstype, default, lock_dir, anywhere)
    except OSError as exc:
        # Whoever cannot use the lock files (not root) cannot mount either: use what is there.
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        _log.debug("no lock files in %s (%s): not mounting %s", lock_dir, exc.strerror, fstype)
        yield find_mount(fstype, None if anywhere else default)
        return
    if users_fd is None:
        yield None
        return
    try:
        yield where
    finally:
        _leave(fstype, lock_dir, users_fd)
