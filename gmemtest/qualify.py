"""`gmemtest qualify`: one report for a host stack (kernel + KVM + QEMU + guest path).

It gathers what a release qualification needs in one run: the probed host and QEMU report, the
host-side checks that run on real KVM (guest_memfd uAPI table, tiny-VMM oracle and punch hole,
which memory serves gmem slots), the seed regression, and the guest scenarios, each as PASS,
FAIL or CANNOT RUN with its reason. Findings (understood divergences from upstream behaviour)
are listed apart: they do not fail a qualification, and they are never hidden.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gmemtest.preflight import preflight_report
from gmemtest.requirements import host_report, unmet_requirements
from gmemtest.runner import ScenarioError, run_in_fresh_guest
from gmemtest.scenarios import ScenarioSpec
from guests.profiles import get_profile
from host_stack import vmm
from host_stack.gmem_uapi_cases import CASES, run_case
from host_stack.kvm import KvmSystem, probe_vm_creation
from host_stack.seed_regression import SeedCancelled, run_seed_regression
from images.build import GuestImage
from qmp_helpers import QemuError

Status = Literal["PASS", "FAIL", "CANNOT RUN", "ERROR"]


@dataclass
class Item:
    """One line of the qualification: a check, its status and why."""

    section: str
    name: str
    status: Status
    summary: str
    details: list[str] = field(default_factory=list)
    evidence: str | None = None


@dataclass
class Qualification:
    started: str
    duration_s: float = 0.0
    preflight: dict[str, Any] = field(default_factory=dict)
    items: list[Item] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(i.status in ("FAIL", "ERROR") for i in self.items)

    @property
    def incomplete(self) -> bool:
        return any(i.status == "CANNOT RUN" for i in self.items)

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
                "items": [i.__dict__ for i in self.items]}


def _host_checks(q: Qualification) -> None:
    reason = probe_vm_creation()
    if reason is not None:
        for name in ("guest_memfd uAPI cases", "tiny VMM: slots map the oracle's indexes",
                     "tiny VMM: punch hole seen at the oracle's gfn", "tiny VMM: memory serving gmem slots"):
            q.items.append(Item("host", name, "CANNOT RUN", reason))
        return
    with KvmSystem() as system:
        results = [run_case(case, system) for case in CASES]
        failed = [r for r in results if r.status == "fail"]
        n_na = sum(r.status == "not_applicable" for r in results)
        q.items.append(Item("host", "guest_memfd uAPI cases", "FAIL" if failed else "PASS",
                            f"{len(results) - len(failed) - n_na} passed, {len(failed)} failed, {n_na} not applicable",
                            [r.message for r in failed]))
        mapping = vmm.run_oracle_mapping(system)
        q.items.append(Item("host", "tiny VMM: slots map the oracle's indexes", "PASS" if mapping.ok else "FAIL",
                            f"{len(mapping.reads)} gfns read over {len(mapping.layout)} slots",
                            list(mapping.mismatches)))
        index = mapping.layout[1].gmem_pgoff + 1
        hole = vmm.run_punch_hole(system, index)
        q.items.append(Item("host", "tiny VMM: punch hole seen at the oracle's gfn", "PASS" if hole.ok else "FAIL",
                            f"file index {index} -> gfn {hole.expected_gfn:#x}", list(hole.mismatches)))
        backing = vmm.run_backing_source(system)
        q.items.append(Item("host", "tiny VMM: memory serving gmem slots", "FAIL" if backing.mismatches else "PASS",
                            f"served from {backing.behaviour}", list(backing.mismatches)))
        if backing.finding is not None:
            q.findings.append(backing.finding.to_json())


def _seed(q: Qualification) -> None:
    try:
        result = run_seed_regression()
    except SeedCancelled as exc:
        q.items.append(Item("host", "seed regression: poison behind a slot with pgoff > 0", "CANNOT RUN", exc.reason))
        return
    messages = result.guest_verdict.messages + result.user_verdict.messages
    q.items.append(Item("host", "seed regression: poison behind a slot with pgoff > 0",
                        "PASS" if result.ok else "FAIL", "both the guest access and the userspace touch judged",
                        list(messages)))


def _guest(q: Qualification, specs: Sequence[ScenarioSpec], image: GuestImage, out: Path, binary: str) -> None:
    for spec in specs:
        profile = get_profile(spec.profile)
        unmet = unmet_requirements(profile.requirements, accel=profile.accel, binary=binary)
        if unmet:
            q.items.append(Item("guest", spec.name, "CANNOT RUN", "; ".join(unmet)))
            continue
        outdir = out / "scenarios" / spec.name
        try:
            result = run_in_fresh_guest(spec, image, outdir, binary=binary)
        except (ScenarioError, QemuError, OSError) as exc:
            q.items.append(Item("guest", spec.name, "ERROR", f"{type(exc).__name__}: {exc}",
                                evidence=str(outdir)))
            continue
        verdict = result.verdict
        q.items.append(Item("guest", spec.name, "PASS" if verdict.passed else "FAIL",
                            f"{spec.summary} ({len(verdict.checks)} checks)",
                            [c.line() for c in verdict.checks], evidence=str(outdir)))


def qualify(out: Path, *, specs: Sequence[ScenarioSpec], image: GuestImage | None,
            binary: str = "qemu-system-x86_64") -> Qualification:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    q = Qualification(started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    q.preflight = preflight_report(binary)
    host_report()  # probed once, shared with the checks below
    _host_checks(q)
    _seed(q)
    if specs:
        assert image is not None, "guest scenarios need an image"
        _guest(q, specs, image, out, binary)
    q.duration_s = time.monotonic() - t0
    (out / "qualification.json").write_text(json.dumps(q.to_json(), indent=2) + "\n")
    return q
