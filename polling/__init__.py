"""Waiting for a condition with a deadline: the one poll loop every package uses.

A package of its own at the bottom (beside ``outcome``), so that host_stack, qmp_helpers,
guests, images and gmemtest can all wait the same way without a sideways import.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["poll_until"]

T = TypeVar("T")


def poll_until(probe: Callable[[], T | None], *, timeout: float, interval: float) -> T | None:
    """Call ``probe`` until it returns something other than None or False (returned), or until
    ``timeout`` seconds have passed (None). The probe is always called at least once, and once
    more at the deadline, so a condition met during the last sleep is not missed."""
    if timeout < 0 or interval <= 0:
        raise ValueError(f"poll_until needs timeout >= 0 and interval > 0, got timeout={timeout}, interval={interval}")
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None and got is not False:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(interval, left))
