"""`gmemtest qualify`: one report for a host stack (kernel + KVM + QEMU + guest path).

It gathers what a release qualification needs in one run: the probed host and QEMU report, the
host-side checks that run on real KVM (guest_memfd uAPI table, tiny-VMM oracle and punch hole,
which memory serves gmem slots), the seed regression, and the guest scenarios, each as PASS,
FAIL or CANNOT RUN with its reason. Findings (understood divergences from upstream behaviour)
are listed apart: they do not fail a qualification, and they are never hidden.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gmemtest.preflight import preflight_report
from gmemtest.report_html import render
from gmemtest.report_model import Item, Qualification, atomic_write
from gmemtest.requirements import host_unmet, scenario_unmet
from gmemtest.runner import run_in_fresh_guest
from gmemtest.scenarios import ScenarioSpec
from gmemtest.under_test import UnderTest
from host_stack import gmem_uapi_cases, vmm
from host_stack.capabilities import HostReport
from host_stack.kvm import KvmSystem
from host_stack.poison_matrix import MatrixCancelled, run_poison_matrix
from host_stack.seed_regression import SeedCancelled, run_seed_regression
from images.build import GuestImage
from qmp_helpers import DEFAULT_QEMU

_LOG = logging.getLogger(__name__)



class _Report:
    """The qualification being written: every item is saved (JSON and HTML) as soon as it exists.

    A crash of the process between two checks therefore still leaves a report with everything
    judged so far, and an exception inside one check becomes that check's ERROR item.
    """

    def __init__(self, q: Qualification, out: Path, t0: float) -> None:
        self.q, self.out, self.t0 = q, out, t0

    def add(self, item: Item) -> None:
        self.q.items.append(item)
        self.save()

    def save(self) -> None:
        self.q.duration_s = time.monotonic() - self.t0
        atomic_write(self.out / "qualification.json", json.dumps(self.q.to_json(), indent=2) + "\n")
        atomic_write(self.out / "qualification.html", render(self.q))

    def guarded(self, section: str, name: str, check: Callable[[], Item | None],
                evidence: str | None = None) -> None:
        """Run one check; whatever it raises becomes an ERROR item with the message."""
        started = time.monotonic()
        try:
            item = check()
        except Exception as exc:  # one broken check must not take the report with it
            _LOG.exception("qualification check %r raised", name)
            item = Item(section, name, "ERROR", f"{type(exc).__name__}: {exc}",
                        traceback.format_exception_only(exc), evidence=evidence)
        if item is not None:
            if item.duration_s is None:
                item.duration_s = round(time.monotonic() - started, 2)
            self.add(item)


UAPI_ITEM = "guest_memfd uAPI cases"
MAPPING_ITEM = "tiny VMM: slots map the oracle's indexes"
PUNCH_ITEM = "tiny VMM: punch hole seen at the oracle's gfn"
BACKING_ITEM = "tiny VMM: memory serving gmem slots"
HOST_CHECKS = (UAPI_ITEM, MAPPING_ITEM, PUNCH_ITEM, BACKING_ITEM)


def _host_checks(r: _Report, report: HostReport | None) -> None:
    """The host checks on real KVM; each one that needs what the host lacks is CANNOT RUN with
    the probed requirement (``report``: default this host's), never an ERROR."""
    with contextlib.ExitStack() as stack:
        system: KvmSystem | None = None

        def uapi() -> Item:
            assert system is not None
            verdict = gmem_uapi_cases.run_table(system)
            # A documented errno of another kernel: listed as a finding, never folded into PASS.
            r.q.findings.extend(f.to_json() for f in verdict.findings)
            ran = {c.name.split(":", 1)[0] for c in verdict.checks}
            failed = {c.name.split(":", 1)[0] for c in verdict.failures}
            n_na = len(verdict.evidence.get("did_not_run", {}))
            n_found = len(verdict.findings)
            return Item.from_verdict("host", UAPI_ITEM, verdict,
                                     f"{len(ran) - len(failed) - n_found} passed, {n_found} documented "
                                     f"alternatives (findings), {len(failed)} failed, {n_na} not applicable")

        def mapping() -> Item:
            assert system is not None
            verdict = vmm.run_oracle_mapping(system)
            return Item.from_verdict("host", MAPPING_ITEM, verdict, f"{len(verdict.checks)} gfns read over "
                                     f"{len(verdict.evidence['layout'])} slots")

        def hole() -> Item:
            assert system is not None
            index = vmm.DEFAULT_LAYOUT[1].gmem_pgoff + 1
            verdict = vmm.run_punch_hole(system, index)
            return Item.from_verdict("host", PUNCH_ITEM, verdict,
                                     f"file index {index} -> gfn {verdict.evidence['expected_gfn']:#x}")

        def backing() -> Item:
            assert system is not None
            verdict = vmm.run_backing_source(system)
            r.q.findings.extend(f.to_json() for f in verdict.findings)
            return Item.from_verdict("host", BACKING_ITEM, verdict, f"served from {verdict.evidence['behaviour']}")

        needs = (gmem_uapi_cases.HOST_REQUIREMENTS, *[vmm.HOST_REQUIREMENTS] * 3)
        for name, requirements, check in zip(HOST_CHECKS, needs, (uapi, mapping, hole, backing), strict=True):
            reason = host_unmet(requirements, report)
            if reason is not None:
                r.add(Item("host", name, "CANNOT RUN", reason))
                continue
            if system is None:
                system = stack.enter_context(KvmSystem())
            r.guarded("host", name, check)


SEED_ITEM = "seed regression: poison behind a slot with pgoff > 0"


SEED_EVIDENCE = "seed_regression.json"


def _seed(r: _Report, report: HostReport | None) -> None:
    def check() -> Item:
        try:
            verdict = run_seed_regression(report=report)
        except SeedCancelled as exc:
            return Item("host", SEED_ITEM, "CANNOT RUN", exc.reason)
        # The whole record (memory-fault exit gpa/size/flags, the userspace SIGBUS, expectations).
        (r.out / SEED_EVIDENCE).write_text(json.dumps(verdict.to_dict(), indent=2, default=str) + "\n")
        contract = verdict.evidence.get("contract_of_guest_access", "none")
        return Item.from_verdict("host", SEED_ITEM, verdict,
                                 f"guest access ({contract}) and userspace touch judged, {len(verdict.checks)} checks"
                                 + (f"; {len(verdict.warnings)} clean-up warning(s)" if verdict.warnings else ""),
                                 evidence=SEED_EVIDENCE, all_checks=True)

    r.guarded("host", SEED_ITEM, check)


MATRIX_ITEM = "poison matrix: shared guest_memfd page (injector x kill policy x mapped x dirty)"
MATRIX_EVIDENCE = "poison_matrix.json"


def _poison_matrix(r: _Report, report: HostReport | None) -> None:
    def check() -> Item:
        try:
            result = run_poison_matrix(report=report)  # a Verdict: every row a part
        except MatrixCancelled as exc:
            return Item("host", MATRIX_ITEM, "CANNOT RUN", exc.reason)
        (r.out / MATRIX_EVIDENCE).write_text(result.to_json() + "\n")
        r.q.findings.extend(f.to_json() for f in result.findings)  # which contract the host follows
        table = result.evidence.get("table", [])
        item = Item.from_verdict("host", MATRIX_ITEM, result,
                                 f"{len(table)} rows, contract followed: {result.evidence.get('contract') or 'none'}",
                                 evidence=MATRIX_EVIDENCE)
        # One line a row after the failed checks: which contracts it matched, or why it did not run.
        idle = result.evidence.get("did_not_run", {})
        item.details += [f"{row['row']}: {row['status']}" + (f" (matches {'/'.join(row['matches'])})"
                         if row.get("matches") else f" ({idle[row['row']]})" if row["row"] in idle else "")
                         for row in table]
        return item

    r.guarded("host", MATRIX_ITEM, check)


def _guest(r: _Report, specs: Sequence[ScenarioSpec], image: GuestImage, binary: str, under: UnderTest) -> None:
    for spec in specs:
        outdir = r.out / "scenarios" / spec.name

        evidence = f"scenarios/{spec.name}"

        def check(spec: ScenarioSpec = spec, outdir: Path = outdir, evidence: str = evidence) -> Item:
            profile = under.profile_for(spec)
            unmet = scenario_unmet(spec, profile, binary=binary)
            if unmet:
                return Item("guest", spec.name, "CANNOT RUN", "; ".join(unmet))
            verdict = run_in_fresh_guest(spec, image, outdir, binary=binary, profile=profile,
                                         snapshot=under.snapshot).verdict
            r.q.setups[spec.name] = verdict.setup
            return Item("guest", spec.name, "PASS" if verdict.passed else "FAIL",
                        f"{spec.summary} ({len(verdict.checks)} checks)",
                        [c.line() for c in verdict.checks], evidence=evidence)

        r.guarded("guest", spec.name, check, evidence=evidence)


def qualify(out: Path, *, specs: Sequence[ScenarioSpec], image: GuestImage | None,
            binary: str = DEFAULT_QEMU, under: UnderTest | None = None,
            compare_with: dict[str, Any] | None = None, host: HostReport | None = None) -> Qualification:
    """Run every check, writing qualification.json and .html after each item.

    `under` is what the lab chose (profile, firmware, guest image...); it is recorded in the
    report next to each scenario's launch record (binary, QEMU version, firmware, image).
    `compare_with` is an older qualification.json: what changed goes into both reports.
    `host` stands in for this host's probed report in the host checks' gates (a report that
    says a capability is 0 shows what a host without it gets); default: probed here.
    """
    under = under if under is not None else UnderTest(qemu=binary)
    if specs and image is None:
        raise ValueError("guest scenarios were asked for, but no guest image was given")
    out.mkdir(parents=True, exist_ok=True)
    q = Qualification(started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), under_test=under.as_json())
    r = _Report(q, out, time.monotonic())
    try:
        q.preflight = preflight_report(binary)
    except Exception as exc:
        _LOG.exception("preflight raised")
        r.add(Item("host", "preflight", "ERROR", f"{type(exc).__name__}: {exc}"))
    r.save()
    _host_checks(r, host)
    _seed(r, host)
    _poison_matrix(r, host)
    if specs:
        assert image is not None
        _guest(r, specs, image, binary, under)
    if compare_with is not None:
        from gmemtest.compare import compare

        q.duration_s = time.monotonic() - r.t0
        q.comparison = compare(compare_with, q.to_json()).to_json()
    r.save()
    return q
