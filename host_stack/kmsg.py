"""The host kernel's log from a point on: ``/dev/kmsg`` read from the end, record by record.

An injection on the host is judged partly by what the host kernel says about it ("Memory
failure: 0x...: recovery action for dirty LRU page: Recovered"). ``dmesg`` gives the whole
ring; a cursor opened before the injection gives exactly the records written after it, with
their sequence numbers, however busy the log is.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Self

__all__ = ["KmsgCursor", "KmsgRecord", "parse_kmsg_record"]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

KMSG_PATH = "/dev/kmsg"


@dataclass(frozen=True)
class KmsgRecord:
    """One record (Documentation/ABI/testing/dev-kmsg): ``prio,seq,usec,flags;text``."""

    seq: int
    usec: int
    level: int
    text: str


def parse_kmsg_record(raw: bytes) -> KmsgRecord:
    """Pure: one record as read(2) returns it; continuation lines (" KEY=value") are dropped."""
    line = raw.decode("utf-8", errors="replace")
    head, sep, text = line.partition(";")
    fields = head.split(",")
    if not sep or len(fields) < 3:
        raise ValueError(f"not a /dev/kmsg record: {line[:120]!r}")
    return KmsgRecord(seq=int(fields[1]), usec=int(fields[2]), level=int(fields[0]) & 7,
                      text=text.split("\n", 1)[0])


class KmsgCursor:
    """Records written after :meth:`open` (the cursor starts at the end of the ring)."""

    def __init__(self, path: str = KMSG_PATH) -> None:
        self.path = path
        self._fd: int | None = None

    def open(self) -> Self:
        self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.lseek(self._fd, 0, os.SEEK_END)
        return self

    def read_new(self) -> list[KmsgRecord]:
        """Every record since the last call; a ring overrun (EPIPE) is logged and skipped."""
        if self._fd is None:
            raise RuntimeError(f"{self.path} cursor is not open")
        records: list[KmsgRecord] = []
        while True:
            try:
                raw = os.read(self._fd, 8192)
            except BlockingIOError:
                return records
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records were overwritten before we read them
                    _log.warning("%s: records lost to a ring overrun", self.path)
                    continue
                raise
            if not raw:
                return records
            records.append(parse_kmsg_record(raw))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
