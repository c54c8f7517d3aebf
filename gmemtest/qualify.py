"""`gmemtest qualify`: one report for a host stack (kernel + KVM + QEMU + guest path).

It gathers what a release qualification needs in one run: the probed host and QEMU report, the
host-side checks that run on real KVM (guest_memfd uAPI table, tiny-VMM oracle and punch hole,
which memory serves gmem slots), the seed regression, and the guest scenarios, each as PASS,
FAIL or CANNOT RUN with its reason. Findings (understood divergences from upstream behaviour)
are listed apart: they do not fail a qualification, and they are never hidden.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gmemtest.evidence import atomic_write
from gmemtest.host_checks import HostCheck, host_checks_of
from gmemtest.preflight import preflight_report
from gmemtest.report_html import render
from gmemtest.report_model import Item, Qualification
from gmemtest.requirements import scenario_unmet
from gmemtest.runner import run_in_fresh_guest
from gmemtest.scenarios import ScenarioSpec
from gmemtest.under_test import UnderTest
from host_stack.capabilities import HostReport
from images.build import GuestImage
from outcome import Verdict
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
            broke = Verdict.did_not_run(name, "ERROR", f"{type(exc).__name__}: {exc}")
            item = Item.from_verdict(section, name, broke, "", evidence=evidence)
            item.details = traceback.format_exception_only(exc)
        if item is not None:
            if item.duration_s is None:
                item.duration_s = round(time.monotonic() - started, 2)
            self.add(item)


def _host_checks(r: _Report, report: HostReport | None, memory: str) -> None:
    """Every row of ``HOST_CHECK_TABLE`` of ``memory`` as an item: CANNOT RUN with the probed
    requirement when the host lacks it (``report``: default this host's), never an ERROR; else its verdict."""
    for check in host_checks_of(memory):
        r.guarded("host", check.name, functools.partial(_host_item, r, check, report), evidence=check.evidence)


def _host_item(r: _Report, check: HostCheck, report: HostReport | None) -> Item:
    verdict = check.verdict(report)
    (r.out / check.evidence).write_text(verdict.to_json() + "\n")
    # Documented divergences (an errno of another kernel, the backing source, the matrix's
    # contract): listed in the report's findings, never folded into a PASS.
    r.q.add_findings(f.to_json() for f in verdict.findings)
    item = Item.from_verdict("host", check.name, verdict, check.describe(verdict), evidence=check.evidence,
                             all_checks=check.all_checks)
    if check.lines is not None:
        item.details += check.lines(verdict)
    return item


def _guest(r: _Report, specs: Sequence[ScenarioSpec], image: GuestImage, binary: str, under: UnderTest) -> None:
    for spec in specs:
        outdir = r.out / "scenarios" / spec.name

        evidence = f"scenarios/{spec.name}"

        def check(spec: ScenarioSpec = spec, outdir: Path = outdir, evidence: str = evidence) -> Item:
            profile = under.profile_for(spec)
            unmet = scenario_unmet(spec, profile, binary=binary)
            if unmet:
                return Item.from_verdict("guest", spec.name, Verdict.did_not_run(spec.name, "CANNOT RUN",
                                                                                 "; ".join(unmet)), "")
            verdict = run_in_fresh_guest(spec, image, outdir, under=under).verdict
            r.q.setups[spec.name] = verdict.setup
            return Item.from_verdict("guest", spec.name, verdict, f"{spec.summary} ({len(verdict.checks)} checks)",
                                     evidence=evidence, all_checks=True)

        r.guarded("guest", spec.name, check, evidence=evidence)


def qualify(out: Path, *, specs: Sequence[ScenarioSpec], image: GuestImage | None,
            binary: str = DEFAULT_QEMU, under: UnderTest | None = None,
            compare_with: dict[str, Any] | None = None, host: HostReport | None = None,
            memory: str = "all") -> Qualification:
    """Run every check, writing qualification.json and .html after each item.

    `under` is what the lab chose (profile, firmware, guest image...); it is recorded in the
    report next to each scenario's launch record (binary, QEMU version, firmware, image).
    `compare_with` is an older qualification.json: what changed goes into both reports.
    `host` stands in for this host's probed report in the host checks' gates (a report that
    says a capability is 0 shows what a host without it gets); default: probed here.
    `memory` picks the host checks (``host_checks.MEMORY_KINDS``): the lab host runs the shared
    ones under Debian's KVM and the private ones under the rebuilt one.
    """
    host_checks_of(memory)  # a bad kind fails before anything runs
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
        r.add(Item.from_verdict("host", "preflight", Verdict.did_not_run("preflight", "ERROR",
                                                                          f"{type(exc).__name__}: {exc}"), ""))
    r.save()
    _host_checks(r, host, memory)
    if specs:
        assert image is not None
        _guest(r, specs, image, binary, under)
    if compare_with is not None:
        from gmemtest.compare import compare

        q.duration_s = time.monotonic() - r.t0
        q.comparison = compare(compare_with, q.to_json()).to_json()
    r.save()
    return q
