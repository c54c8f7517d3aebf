"""JSONL transcript of a QMP session: every command, reply and event, with two clocks.

One line per record: ``{"t_mono": ..., "t_wall": ..., "dir": "cmd"|"reply"|"error"|"event",
...}``. The monotonic stamp orders records against injections; the wall stamp lets a lab
engineer line the transcript up with guest and host logs.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import IO, Any


class Transcript:
    """Thread-safe append-only JSONL writer; line-buffered so a killed run keeps its log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[str] | None = path.open("a", encoding="utf-8", buffering=1)

    def write(self, direction: str, **fields: Any) -> None:
        """Append one record; silently dropped once closed (late events during teardown)."""
        record = {"t_mono": time.monotonic(), "t_wall": time.time(), "dir": direction, **fields}
        line = json.dumps(record, default=repr, sort_keys=False)
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")

    def close(self) -> None:
        """Close the file; idempotent."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
