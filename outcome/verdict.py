"""A verdict: what was judged, its named expected/actual checks, and its status.

Status, one vocabulary for every check:

- PASS: every check holds (a finding may ride along: an understood divergence, still a pass);
- FAIL: a check does not hold;
- CANNOT RUN: a capability is missing here (the reason says which, as probed);
- NOT MEANINGFUL: it ran, but cannot discriminate on this host (the reason says why);
- ERROR: the check itself broke (the reason holds the exception).

A failed clean-up is a warning: it does not change the status, and each caller makes it loud
(Avocado's WARN, a failure in the project's own tests).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final, Literal, get_args

from .finding import Finding

__all__ = ["NOT_RUN", "STATUSES", "Check", "Status", "Verdict"]

Status = Literal["PASS", "FAIL", "CANNOT RUN", "NOT MEANINGFUL", "ERROR"]
STATUSES: Final[tuple[Status, ...]] = get_args(Status)
NotRun = Literal["CANNOT RUN", "NOT MEANINGFUL", "ERROR"]
NOT_RUN: Final[tuple[NotRun, ...]] = get_args(NotRun)


@dataclass(frozen=True)
class Check:
    """One observable: its name, what should have been there and what was."""

    name: str
    expected: str
    actual: str
    ok: bool
    # Which layer saw it: "host" (the host kernel), "qemu", "guest"; "" where there is one layer.
    layer: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        where = f"[{self.layer}] " if self.layer else ""
        return f"{mark} {where}{self.name}: expected {self.expected}, actual {self.actual}"


@dataclass(frozen=True)
class Verdict:
    """``scenario`` names what was judged (a guest or chain row, a host check, a table)."""

    scenario: str
    checks: tuple[Check, ...] = ()
    # What was under test (qemu binary and version, profile, firmware, image: the launch
    # record), so a verdict read on its own says which host stack it judged.
    setup: dict[str, Any] = field(default_factory=dict, compare=False)
    findings: tuple[Finding, ...] = ()
    warnings: tuple[str, ...] = ()
    not_run: NotRun | None = None  # set with ``reason`` when the checks could not decide
    reason: str | None = None
    # What a reader needs to redo the judgement: raw answers, the layout, file names (JSON data).
    evidence: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if (self.not_run is None) != (self.reason is None):
            raise ValueError(f"{self.scenario}: a verdict that did not run needs a reason, and only it has one "
                             f"(not_run={self.not_run!r}, reason={self.reason!r})")
        if self.not_run is not None and self.not_run not in NOT_RUN:
            raise ValueError(f"{self.scenario}: not_run {self.not_run!r} is none of {', '.join(NOT_RUN)}")

    @classmethod
    def did_not_run(cls, scenario: str, status: NotRun, reason: str, **extra: Any) -> Verdict:
        """CANNOT RUN, NOT MEANINGFUL or ERROR, with the one sentence why."""
        return cls(scenario, not_run=status, reason=reason, **extra)

    @classmethod
    def combine(cls, scenario: str, parts: Sequence[Verdict], **extra: Any) -> Verdict:
        """One verdict of many (a table's cases, a matrix's rows): every part's checks, each named
        ``<part>: <check>``, and its findings and warnings (``findings``/``warnings`` add the
        whole's own). Parts that did not run are not checks:
        they are listed in ``evidence["did_not_run"]`` with their reasons; if no part ran, the
        whole did not run either (CANNOT RUN, or ERROR if one part broke)."""
        ran = [p for p in parts if p.not_run is None]
        idle = {p.scenario: f"{p.not_run}: {p.reason}" for p in parts if p.not_run is not None}
        evidence = {**extra.pop("evidence", {}), **({"did_not_run": idle} if idle else {})}
        findings = (*(f for p in parts for f in p.findings), *extra.pop("findings", ()))
        warnings = (*(w for p in parts for w in p.warnings), *extra.pop("warnings", ()))
        if not ran:
            broke = any(p.not_run == "ERROR" for p in parts)
            reason = "; ".join(f"{name}: {why}" for name, why in idle.items()) or "nothing to judge"
            return cls(scenario, findings=findings, warnings=warnings, not_run="ERROR" if broke else "CANNOT RUN",
                       reason=reason, evidence=evidence, **extra)
        checks = tuple(replace(c, name=f"{p.scenario}: {c.name}") for p in ran for c in p.checks)
        return cls(scenario, checks, findings=findings, warnings=warnings, evidence=evidence, **extra)

    @property
    def passed(self) -> bool:
        return self.not_run is None and bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def status(self) -> Status:
        if self.not_run is not None:
            return self.not_run
        return "PASS" if self.passed else "FAIL"

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.ok)

    def summary(self) -> str:
        if self.not_run is not None:
            return f"{self.scenario}: {self.not_run}: {self.reason}"
        head = f"{self.scenario}: {self.status} ({len(self.checks)} checks)"
        return "\n".join([head, *("  " + c.line() for c in self.checks), *(f"  WARNING {w}" for w in self.warnings)])

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"scenario": self.scenario, "status": self.status, "passed": self.passed,
                               "checks": [asdict(c) for c in self.checks]}
        for key, value in (("setup", self.setup), ("findings", [f.to_json() for f in self.findings]),
                           ("warnings", list(self.warnings)), ("reason", self.reason), ("evidence", self.evidence)):
            if value:
                doc[key] = value
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Verdict:
        status = doc.get("status")
        return cls(str(doc["scenario"]), tuple(Check(**c) for c in doc.get("checks", [])),
                   setup=dict(doc.get("setup", {})),
                   findings=tuple(Finding(**f) for f in doc.get("findings", [])),
                   warnings=tuple(doc.get("warnings", [])),
                   not_run=status if status in NOT_RUN else None, reason=doc.get("reason"),
                   evidence=dict(doc.get("evidence", {})))

    @classmethod
    def from_json(cls, text: str) -> Verdict:
        return cls.from_dict(json.loads(text))
