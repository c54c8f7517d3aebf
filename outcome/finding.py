"""A typed finding: something a host stack does that a qualification report must show.

A finding is not a test failure: the behaviour is understood and named, but differs from the
upstream contract, so it is carried in results (and written out) instead of turning CI red.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Finding", "Severity"]

Severity = Literal["divergence", "info"]


@dataclass(frozen=True)
class Finding:
    """``id`` is stable (reports group by it); ``evidence`` is JSON-serialisable data."""

    id: str
    severity: Severity
    text: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
