"""A cache of booted guests saved at the snapshot point, keyed by what makes two guests identical.

The key hashes the snapshot point's definition, the machine's stable argv (QEMU's argv with the
per-run parts replaced: tag, QMP socket, console path, ``-incoming``), the sha256 of every file
that argv names (kernel, initrd, firmware), the sha256 of the image manifest, and the QEMU
binary's resolved path, sha256 and ``--version`` line. Any changed input is another key, so a
change is a miss, never a stale hit.

Layout under ``<cache root>/snapshots``: one directory per key (``state`` is QEMU's migration
stream, ``meta.json`` the key's inputs, size and creation time). A snapshot is written to a
private temporary directory and renamed into place under the key's flock, so concurrent jobs
see no entry or a complete one; a second saver of the same key finds it there and keeps its own
guest running without saving. At most ``MAX_ENTRIES`` snapshots are kept, least recently used
first out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from images.build import build_lock, default_cache_root

__all__ = ["MAX_ENTRIES", "SNAPSHOT_POINT", "Snapshot", "SnapshotCache", "SnapshotKey", "snapshot_key"]

LOG = logging.getLogger(__name__)

# The guest contract at the moment of saving. Changing what happens before the save (or
# what the restore expects) must change this text, which changes every key.
SNAPSHOT_POINT: Final[str] = ("v1: console GMEMTEST-READY seen; SSH 'true' passed; SSH session "
                              "closed and no guest TCP connection open (info usernet); nothing "
                              "of a test mapped or run")
MAX_ENTRIES: Final[int] = 6
STATE_FILE: Final[str] = "state"
META_FILE: Final[str] = "meta.json"
STALE_TMP_S: Final[float] = 3600.0

_file_digests: dict[tuple[str, int, int, int], str] = {}
_qemu_versions: dict[tuple[str, int, int, int], str] = {}


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, inode, size, mtime) for this process."""
    key = _stat_key(path)
    if key not in _file_digests:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _file_digests[key] = digest.hexdigest()
    return _file_digests[key]


def qemu_version_line(binary: Path) -> str:
    """First line of ``<binary> --version`` (it names the Debian package revision too)."""
    key = _stat_key(binary)
    if key not in _qemu_versions:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{binary} --version exited {done.returncode}: {done.stderr.strip()}")
        _qemu_versions[key] = done.stdout.splitlines()[0].strip() if done.stdout else ""
    return _qemu_versions[key]


@dataclass(frozen=True)
class SnapshotKey:
    digest: str
    inputs: dict[str, Any]

    @property
    def short(self) -> str:
        return self.digest[:24]


def _named_files(argv: Iterable[str]) -> dict[str, str]:
    """sha256 of every argv word that is an existing regular file (kernel, initrd, -bios)."""
    return {word: file_sha256(Path(word)) for word in argv
            if word.startswith("/") and os.path.isfile(word)}


def snapshot_key(stable_argv: list[str], manifest: Path) -> SnapshotKey:
    """The key of a guest started with ``stable_argv`` (argv[0] is QEMU's resolved path)."""
    binary = Path(stable_argv[0])
    inputs: dict[str, Any] = {
        "snapshot_point": SNAPSHOT_POINT,
        "argv": stable_argv[1:],
        "files": _named_files(stable_argv[1:]),
        "image_manifest": {"path": str(manifest), "sha256": file_sha256(manifest)},
        "qemu": {"path": str(binary), "sha256": file_sha256(binary), "version": qemu_version_line(binary)},
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return SnapshotKey(digest, inputs)


@dataclass(frozen=True)
class Snapshot:
    key: str
    directory: Path
    created: float
    size_bytes: int
    save_s: float | None

    @property
    def state(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def age_s(self) -> float:
        return round(time.time() - self.created, 1)

    def record(self) -> dict[str, Any]:
        return {"key": self.key, "path": str(self.state), "age_s": self.age_s,
                "size_bytes": self.size_bytes, "save_s": self.save_s}


class SnapshotCache:
    """Saved guests on disk; see the module docstring for the protocol."""

    def __init__(self, root: Path | None = None, *, max_entries: int = MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.root = (root if root is not None else default_cache_root()) / "snapshots"
        self.max_entries = max_entries

    def _dir(self, key: SnapshotKey | str) -> Path:
        return self.root / (key.short if isinstance(key, SnapshotKey) else key[:24])

    def _lock(self, key: SnapshotKey | str) -> Path:
        return self.root.parent / "locks" / f"snapshot-{self._dir(key).name}.lock"

    def _read(self, directory: Path) -> Snapshot | None:
        try:
            meta = json.loads((directory / META_FILE).read_text())
            size = (directory / STATE_FILE).stat().st_size
        except (OSError, ValueError):
            return None
        if size != meta.get("size_bytes") or not str(meta.get("key", "")).startswith(directory.name):
            return None
        return Snapshot(str(meta["key"]), directory, float(meta["created"]), size, meta.get("save_s"))

    def lookup(self, key: SnapshotKey) -> Snapshot | None:
        """The complete snapshot for ``key``, or None; an entry that does not check out is dropped."""
        directory = self._dir(key)
        if not directory.exists():
            return None
        snap = self._read(directory)
        if snap is None or snap.key != key.digest:
            self.drop(key, "entry incomplete or not for this key (meta.json/state size mismatch)")
            return None
        try:
            os.utime(directory)  # least recently used goes first when pruning
        except OSError as exc:  # a read-only cache (shared into a lab host) is still usable
            LOG.debug("cannot mark snapshot %s used: %s", directory.name, exc)
        return snap

    def save(self, key: SnapshotKey, write: Callable[[Path], float]) -> Snapshot | None:
        """Save under the key's lock: ``write(state_path)`` writes the state and returns seconds.

        Returns the new snapshot, or None when another job saved this key first (``write`` is
        not called then). On any failure nothing is left in the cache.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with build_lock(self._lock(key)):
            if self._read(self._dir(key)) is not None:
                return None
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key.short}-", dir=self.root))
            try:
                seconds = write(tmp / STATE_FILE)
                size = (tmp / STATE_FILE).stat().st_size
                meta = {"key": key.digest, "created": time.time(), "size_bytes": size,
                        "save_s": round(seconds, 4), "inputs": key.inputs}
                (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
                os.rename(tmp, self._dir(key))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.prune()
        return self._read(self._dir(key))

    def drop(self, key: SnapshotKey | str, reason: str) -> None:
        """Remove one entry (a restore from it failed, or it is incomplete); logs why."""
        directory = self._dir(key)
        with build_lock(self._lock(key)):
            if not directory.exists():
                return
            LOG.warning("dropping snapshot %s: %s", directory.name, reason)
            doomed = directory.with_name(f".drop-{directory.name}-{os.getpid()}")
            os.rename(directory, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def entries(self) -> list[Snapshot]:
        """Complete entries, most recently used first."""
        if not self.root.is_dir():
            return []
        found = [s for d in self.root.iterdir() if not d.name.startswith(".") and (s := self._read(d))]
        return sorted(found, key=lambda s: s.directory.stat().st_mtime, reverse=True)

    def prune(self) -> list[str]:
        """Drop least recently used entries beyond ``max_entries``; returns the dropped keys.

        Also removes what a killed saver left: private ``.tmp-``/``.drop-`` directories older
        than an hour (a live save takes about a second).
        """
        for leftover in self.root.glob(".*-*"):
            if leftover.is_dir() and time.time() - leftover.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(leftover, ignore_errors=True)
        dropped = []
        for snap in self.entries()[self.max_entries:]:
            self.drop(snap.key, f"more than {self.max_entries} snapshots kept (least recently used)")
            dropped.append(snap.key)
        return dropped

    def clear(self) -> int:
        """Drop every entry; returns how many there were."""
        entries = self.entries()
        for snap in entries:
            self.drop(snap.key, "cleared on request")
        return len(entries)
