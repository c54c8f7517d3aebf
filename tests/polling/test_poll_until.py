"""poll_until: the one poll loop."""

from __future__ import annotations

import time

import pytest

from polling import poll_until


def test_returns_the_first_answer_that_is_not_none_or_false() -> None:
    answers = iter([None, False, 0, "never asked"])
    assert poll_until(lambda: next(answers), timeout=5, interval=0.001) == 0  # 0 is an answer


def test_stops_polling_at_the_answer() -> None:
    calls: list[int] = []

    def probe() -> str | None:
        calls.append(1)
        return "ready" if len(calls) == 3 else None

    assert poll_until(probe, timeout=5, interval=0.001) == "ready"
    assert len(calls) == 3


def test_times_out_with_none_after_asking_at_the_deadline() -> None:
    calls: list[float] = []
    t0 = time.monotonic()
    assert poll_until(lambda: calls.append(time.monotonic()), timeout=0.05, interval=0.02) is None
    assert calls[0] - t0 < 0.01 and calls[-1] - t0 >= 0.05 - 0.005, calls
    assert poll_until(lambda: None, timeout=0, interval=1) is None  # asked once, no sleep


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"timeout >= 0 and interval > 0, got timeout=-1, interval=0.1"):
        poll_until(lambda: True, timeout=-1, interval=0.1)
