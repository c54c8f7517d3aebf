"""Where a run's evidence goes: one directory per run, whole files, abandoned attempts set aside.

Every file a scenario, a lab-host run or a qualification keeps is written through here, so a
reader (a person, the HTML report, a later ``gmemtest compare``) never sees half a file, and an
attempt that was retried keeps its evidence beside the final one with a ``why.txt``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["Evidence", "atomic_write", "retry_once", "set_aside", "to_json_text"]

LOG = logging.getLogger(__name__)
T = TypeVar("T")


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


def retry_once(attempt: Callable[[], T], *, retry_on: tuple[type[BaseException], ...], workdir: Path,
               set_aside_as: Callable[[BaseException], str], only: Sequence[str] | None = None,
               on_retry: Callable[[BaseException], None] | None = None) -> T:
    """``attempt()``; if it raises one of ``retry_on`` (a failure of the machinery, not a verdict),
    its evidence in ``workdir`` is set aside as ``set_aside_as(exc)`` with a why.txt and the attempt
    runs once more, whose exception, if any, is the caller's."""
    try:
        return attempt()
    except retry_on as exc:
        name = set_aside_as(exc)
        LOG.warning("%s (%s); retrying once, the failed attempt's evidence in %s", type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "", workdir / name)
        set_aside(workdir, name, str(exc), only=only)
        if on_retry is not None:
            on_retry(exc)
        return attempt()
