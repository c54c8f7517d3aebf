"""What a test leaves for the end of the pytest run (printed by the root conftest's summary hook):
lines of its own, and the seconds of a phase (the lab-host batch) for the run's phase line."""

from __future__ import annotations

import pytest

SUMMARY_LINES = pytest.StashKey[list[str]]()
PHASE_SECONDS = pytest.StashKey[dict[str, float]]()


def add_summary_line(config: pytest.Config, line: str) -> None:
    config.stash.setdefault(SUMMARY_LINES, []).append(line)


def add_phase(config: pytest.Config, name: str, seconds: float) -> None:
    config.stash.setdefault(PHASE_SECONDS, {})[name] = seconds
