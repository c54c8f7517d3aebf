"""The evidence module: whole files, abandoned attempts set aside, one retry."""

from __future__ import annotations

from pathlib import Path

import pytest

from gmemtest.evidence import Evidence, retry_once


class Flaky(Exception):
    pass


def test_retry_once_sets_the_failed_attempt_aside_and_runs_again(tmp_path: Path) -> None:
    calls: list[int] = []
    seen: list[str] = []

    def attempt() -> str:
        calls.append(1)
        Evidence(tmp_path).text("console.log", f"attempt {len(calls)}\n")
        if len(calls) == 1:
            raise Flaky("L1 froze\nstack...")
        return "verdict"

    got = retry_once(attempt, retry_on=(Flaky,), workdir=tmp_path, set_aside_as=lambda exc: "frozen-attempt-1",
                     on_retry=lambda exc: seen.append(str(exc).splitlines()[0]))
    assert got == "verdict" and len(calls) == 2 and seen == ["L1 froze"]
    assert (tmp_path / "frozen-attempt-1" / "console.log").read_text() == "attempt 1\n"
    assert (tmp_path / "frozen-attempt-1" / "why.txt").read_text().startswith("L1 froze")
    assert (tmp_path / "console.log").read_text() == "attempt 2\n"


def test_retry_once_retries_only_once_and_only_what_it_is_told(tmp_path: Path) -> None:
    def always() -> None:
        raise Flaky("again")

    with pytest.raises(Flaky, match="again"):
        retry_once(always, retry_on=(Flaky,), workdir=tmp_path, set_aside_as=lambda exc: "x-attempt-1")
    assert (tmp_path / "x-attempt-1" / "why.txt").is_file()

    def broken() -> None:
        raise ValueError("a verdict, not the machinery")

    with pytest.raises(ValueError, match="a verdict"):
        retry_once(broken, retry_on=(Flaky,), workdir=tmp_path / "b", set_aside_as=lambda exc: "never")
    assert not (tmp_path / "b").exists()
