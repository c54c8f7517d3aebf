"""The qualification report's model: its items, their one status vocabulary, and how it is saved.

``gmemtest.qualify`` fills it, ``gmemtest.report_html`` renders it and ``gmemtest.lab.qualify``
reads it back from L1; none of them imports another for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from outcome import Status, Verdict

__all__ = ["Item", "Qualification", "Status"]

@dataclass
class Item:
    """One line of the qualification: a check, its status and why."""

    section: str
    name: str
    status: Status
    summary: str
    details: list[str] = field(default_factory=list)
    # Relative to the report's directory, so the HTML links open wherever the report is copied.
    evidence: str | None = None
    duration_s: float | None = None

    @classmethod
    def from_verdict(cls, section: str, name: str, verdict: Verdict, summary: str,
                     evidence: str | None = None, *, all_checks: bool = False) -> Item:
        """The report's line for a verdict: its status; as details its failed checks (every
        check with ``all_checks``), its findings and its warnings. A verdict that did not run
        says why instead of ``summary``."""
        details = [c.line() for c in (verdict.checks if all_checks else verdict.failures)]
        details += [f"FINDING {f.id}: {f.text}" for f in verdict.findings]
        details += [f"WARNING: {w}" for w in verdict.warnings]
        return cls(section, name, verdict.status, verdict.reason or summary, details, evidence)


@dataclass
class Qualification:
    started: str
    duration_s: float = 0.0
    preflight: dict[str, Any] = field(default_factory=dict)
    items: list[Item] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    # What the lab chose, and per scenario what was really launched (Verdict.setup).
    under_test: dict[str, Any] = field(default_factory=dict)
    setups: dict[str, dict[str, Any]] = field(default_factory=dict)
    # gmemtest.compare.Comparison.to_json() against an older report (qualify --compare).
    comparison: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Qualification:
        return cls(started=str(doc.get("started", "")), duration_s=float(doc.get("duration_s", 0.0)),
                   preflight=doc.get("preflight", {}), items=[Item(**i) for i in doc.get("items", [])],
                   findings=doc.get("findings", []), under_test=doc.get("under_test", {}),
                   setups=doc.get("setups", {}), comparison=doc.get("comparison"))

    def add_findings(self, findings: Iterable[dict[str, Any]]) -> None:
        """Add findings (``Finding.to_json()``), each said once: two checks that found the same thing
        (same id and text: the private seed and a matrix row on one kernel) list it once."""
        seen = {(f.get("id"), f.get("text")) for f in self.findings}
        for finding in findings:
            key = (finding.get("id"), finding.get("text"))
            if key not in seen:
                seen.add(key)
                self.findings.append(finding)

    @property
    def failed(self) -> bool:
        return any(i.status in ("FAIL", "ERROR") for i in self.items)

    @property
    def incomplete(self) -> bool:
        return any(i.status in ("CANNOT RUN", "NOT MEANINGFUL") for i in self.items)

    @property
    def outcome(self) -> str:
        """FAILED beats INCOMPLETE beats PASSED: a check that could not run is not a pass."""
        return "FAILED" if self.failed else "INCOMPLETE" if self.incomplete else "PASSED"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.items:
            out[item.status] = out.get(item.status, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"started": self.started, "duration_s": round(self.duration_s, 1), "outcome": self.outcome,
                "counts": self.counts(), "findings": self.findings, "preflight": self.preflight,
                "under_test": self.under_test, "setups": self.setups, "comparison": self.comparison,
                "items": [i.__dict__ for i in self.items]}


