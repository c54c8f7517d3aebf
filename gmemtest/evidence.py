"""Where a run's evidence goes: one directory per run, whole files, abandoned attempts set aside.

Every file a scenario, a lab-host run or a qualification keeps is written through here, so a
reader (a person, the HTML report, a later ``gmemtest compare``) never sees half a file, and an
attempt that was retried keeps its evidence beside the final one with a ``why.txt``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Evidence", "atomic_write", "set_aside", "to_json_text"]


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` whole: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plain(value: object) -> object:
    """Enums by their value, anything else json does not know by its str()."""
    return getattr(value, "value", None) if hasattr(value, "value") else str(value)


def to_json_text(payload: Any) -> str:
    return json.dumps(payload, indent=2, default=_plain) + "\n"


class Evidence:
    """One run's evidence directory (created on first use)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def text(self, name: str, content: str) -> Path:
        path = self.dir / name
        atomic_write(path, content)
        return path

    def json(self, name: str, payload: Any) -> Path:
        return self.text(name, to_json_text(payload))


def set_aside(workdir: Path, name: str, why: str, *, only: Sequence[str] | None = None,
              skip_prefixes: tuple[str, ...] = ()) -> None:
    """Move the evidence of an abandoned attempt into ``workdir/name`` with a why.txt.

    ``only`` names the entries to move (default: all); entries starting with ``skip_prefixes``
    (earlier attempts set aside) stay where they are.
    """
    kept = workdir / name
    kept.mkdir(parents=True, exist_ok=True)
    for item in list(workdir.iterdir()):
        if item == kept or item.name.startswith(skip_prefixes) or (only is not None and item.name not in only):
            continue
        shutil.move(str(item), kept / item.name)
    atomic_write(kept / "why.txt", why + "\n")
