"""What the thin Avocado tests call: one function per test, no Avocado import here.

The test object is used through a small protocol (outputdir, log, cancel, fail), so this module
stays importable and testable without an Avocado job around it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import NoReturn, Protocol

from gmemtest.requirements import unmet_requirements
from gmemtest.runner import ScenarioResult, run_in_fresh_guest
from gmemtest.scenarios import get_scenario
from guests.profiles import get_profile
from images.build import build_default_image

# Avocado's per-test timeout for a guest scenario: three boot-and-run attempts (a missed
# user-mode SRAR is retried) of about 10 s each here, with room for a loaded machine.
GUEST_TEST_TIMEOUT_S = 240
# A host-side check (ioctls, a child VMM, the seed regression's children).
HOST_TEST_TIMEOUT_S = 120


class AvocadoTestLike(Protocol):
    outputdir: str
    log: logging.Logger
    whiteboard: str

    def cancel(self, message: str | None = None) -> NoReturn: ...

    def fail(self, message: str | None = None) -> NoReturn: ...


def run_guest_scenario(test: AvocadoTestLike, name: str, *, profile: str | None = None) -> ScenarioResult:
    """Boot the scenario's guest, run it, keep the evidence in the test's outputdir, judge it.

    `profile` runs the same scenario under another guest profile (e.g. a KVM lab profile);
    a profile whose requirements this host does not meet CANCELs with the probed reasons.
    """
    # Avocado records every logger at DEBUG; the QMP and SSH wire traces are already in
    # qmp.jsonl and probe.jsonl, and at DEBUG they bury the verdict under thousands of lines.
    for noisy in ("qemu.qmp", "paramiko"):
        logging.getLogger(noisy).setLevel(logging.INFO)
    spec = get_scenario(name)
    if profile is not None:
        spec = dataclasses.replace(spec, profile=profile)
    guest_profile = get_profile(spec.profile)
    unmet = unmet_requirements(guest_profile.requirements, accel=guest_profile.accel)
    if unmet:
        test.cancel(f"profile {guest_profile.name} cannot run here: " + "; ".join(unmet))
    image = build_default_image()
    outdir = Path(test.outputdir)
    (outdir / "image.json").write_text(json.dumps(image.as_json(), indent=2) + "\n")
    test.log.info("scenario %s: %s", spec.name, spec.summary)
    result = run_in_fresh_guest(spec, image, outdir)
    # The whiteboard travels with the job's results (results.json, the HTML report).
    test.whiteboard = result.verdict.to_json()
    if not result.verdict.passed:
        test.fail("; ".join(c.line() for c in result.verdict.failures))
    return result
