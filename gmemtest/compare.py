"""What changed between two qualifications (`gmemtest qualify --compare OLD.json`).

A lab qualifying a new host stack (kernel, QEMU, firmware) wants the difference to the last one it
trusted, not two reports to read side by side: which checks newly FAIL, which were fixed, which
changed status otherwise, which findings appeared or vanished, and which checks got markedly
slower or faster. Both sides are the reports' JSON, so an old report from another machine works.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

_BAD = ("FAIL", "ERROR")
# A timing moved when it changed by at least this much, both absolutely and relatively: TCG boot
# times here vary by about 10-20 % between runs (README, Results), so smaller moves are noise.
MOVED_ABS_S = 1.0
MOVED_REL = 0.25


@dataclass(frozen=True)
class StatusChange:
    name: str
    old: str | None  # None: the check is new
    new: str | None  # None: the check is gone
    summary: str = ""


@dataclass(frozen=True)
class TimingMove:
    name: str
    old_s: float
    new_s: float

    @property
    def change(self) -> str:
        return f"{self.old_s:.1f} s -> {self.new_s:.1f} s ({(self.new_s - self.old_s) / self.old_s:+.0%})"


@dataclass
class Comparison:
    old_started: str
    old_outcome: str
    new_outcome: str
    new_failures: list[StatusChange] = field(default_factory=list)
    fixed: list[StatusChange] = field(default_factory=list)
    other_changes: list[StatusChange] = field(default_factory=list)
    findings_appeared: list[str] = field(default_factory=list)
    findings_vanished: list[str] = field(default_factory=list)
    timings_moved: list[TimingMove] = field(default_factory=list)

    @property
    def unchanged(self) -> bool:
        return not (self.new_failures or self.fixed or self.other_changes or self.findings_appeared
                    or self.findings_vanished or self.timings_moved)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["timings_moved"] = [{**asdict(t), "change": t.change} for t in self.timings_moved]
        return doc

    def lines(self) -> list[str]:
        """The comparison as a terminal reads it, most important first."""
        out = [f"compared with the qualification of {self.old_started}: {self.old_outcome} -> {self.new_outcome}"]
        out += [f"  NEW FAIL  {c.name}: {c.old or 'absent'} -> {c.new}: {c.summary}" for c in self.new_failures]
        out += [f"  fixed     {c.name}: {c.old} -> {c.new}" for c in self.fixed]
        out += [f"  changed   {c.name}: {c.old or 'absent'} -> {c.new or 'absent'}" for c in self.other_changes]
        out += [f"  finding appeared  {f}" for f in self.findings_appeared]
        out += [f"  finding vanished  {f}" for f in self.findings_vanished]
        out += [f"  timing    {t.name}: {t.change}" for t in self.timings_moved]
        if self.unchanged:
            out.append("  nothing changed")
        return out


def _moved(old: float, new: float) -> bool:
    return old > 0 and abs(new - old) >= MOVED_ABS_S and abs(new - old) / old >= MOVED_REL


def compare(old: dict[str, Any], new: dict[str, Any]) -> Comparison:
    """Compare two qualification.json documents (Qualification.to_json)."""
    if "items" not in old or "outcome" not in old:
        raise ValueError("the old report is not a gmemtest qualification.json (no 'items' or 'outcome')")
    olds = {i["name"]: i for i in old["items"]}
    news = {i["name"]: i for i in new["items"]}
    result = Comparison(str(old.get("started", "?")), str(old["outcome"]), str(new["outcome"]))
    for name in [*news, *(n for n in olds if n not in news)]:
        was, now = olds.get(name, {}).get("status"), news.get(name, {}).get("status")
        if was == now:
            continue
        change = StatusChange(name, was, now, str(news.get(name, {}).get("summary", "")))
        if now in _BAD:
            result.new_failures.append(change)
        elif was in _BAD and now == "PASS":
            result.fixed.append(change)
        else:
            result.other_changes.append(change)
    old_ids = {f["id"] for f in old.get("findings", [])}
    new_ids = {f["id"] for f in new.get("findings", [])}
    result.findings_appeared = sorted(new_ids - old_ids)
    result.findings_vanished = sorted(old_ids - new_ids)
    for name, item in news.items():
        was_s, now_s = olds.get(name, {}).get("duration_s"), item.get("duration_s")
        if isinstance(was_s, (int, float)) and isinstance(now_s, (int, float)) and _moved(was_s, now_s):
            result.timings_moved.append(TimingMove(name, float(was_s), float(now_s)))
    was_total, now_total = old.get("duration_s"), new.get("duration_s")
    if isinstance(was_total, (int, float)) and isinstance(now_total, (int, float)) and _moved(was_total, now_total):
        result.timings_moved.append(TimingMove("whole qualification", float(was_total), float(now_total)))
    return result
