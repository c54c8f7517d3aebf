"""A writer for the "newc" cpio format that the Linux initramfs unpacker reads.

Written in Python so that an image can be assembled without root: device nodes,
owners and modes are plain header fields here, not filesystem operations.
Every header carries mtime 0 and inode numbers in insertion order, so the same
entries always give the same bytes (the format is described in the kernel's
``Documentation/driver-api/early-userspace/buffer-format.rst``).
"""

from __future__ import annotations

import stat
from typing import BinaryIO

from images.errors import ImageError

__all__ = ["CpioError", "NewcWriter"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
_MAX_FIELD = 0xFFFFFFFF


class CpioError(ImageError, ValueError):
    """An entry that cannot be represented in a newc archive."""


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


class NewcWriter:
    """Appends entries to a binary stream; call :meth:`close` to write the trailer.

    Parent directories are not created implicitly: the kernel's unpacker needs them
    before their children, so the caller states them, in order.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._next_ino = 1
        self._names: set[str] = set()
        self._closed = False

    def _header(self, name: str, mode: int, size: int, *, nlink: int,
                rdev: tuple[int, int] = (0, 0), uid: int = 0, gid: int = 0) -> None:
        if self._closed:
            raise CpioError(f"archive already closed, cannot add {name!r}")
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise CpioError(f"entry name must be relative without '..', got {name!r}")
        if name in self._names:
            raise CpioError(f"duplicate entry {name!r}")
        if size > _MAX_FIELD:
            raise CpioError(f"entry {name!r} is {size} bytes, newc allows at most {_MAX_FIELD}")
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (self._next_ino, mode, uid, gid, nlink, 0, size, 0, 0,
                  rdev[0], rdev[1], len(encoded), 0)
        self._next_ino += 1
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._stream.write(header + encoded + _pad4(len(header) + len(encoded)))

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._header(name, stat.S_IFDIR | perm, 0, nlink=2)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._header(name, stat.S_IFREG | perm, len(data), nlink=1)
        self._stream.write(data + _pad4(len(data)))

    def add_symlink(self, name: str, target: str) -> None:
        data = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(data), nlink=1)
        self._stream.write(data + _pad4(len(data)))

    def add_chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._header(name, stat.S_IFCHR | perm, 0, nlink=1, rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer entry; the writer accepts nothing afterwards."""
        self._header(_TRAILER, 0, 0, nlink=1)
        self._closed = True

