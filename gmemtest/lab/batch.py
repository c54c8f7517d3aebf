"""The project's host-side pytest suite, run for real inside the lab host.

The development and CI machines may lack guest_memfd and always lack memory failure, so there
the host tests that need them skip with the probed reason. The lab host (L1, Debian 7.x with
kvm_amd, memory failure and hwpoison_inject) has both, so one L1 boot runs the same pytest files
there, and the batch is judged from pytest's own JUnit XML:

- any failure or error fails the batch;
- so does any skip for a requirement the lab host guarantees (``LABHOST_GUARANTEES``): the
  skip reasons name their requirement (``unmet host requirement <name>: ...``, written by the
  tests' ``host_requires`` marker), so a test that stopped running there cannot hide;
- other skips (e.g. no ACPI EINJ, a kind of frame the kernel has none of) are listed.
"""

from __future__ import annotations

import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmemtest.evidence import retry_once
from gmemtest.lab.host import L1_FAILURES, RESULTS_IN_L1, LabhostError, l1_attempt_name, run_in_labhost
from gmemtest.lab.kvm import STOCK, SW_PROTECTED, kvm_command
from host_stack.capabilities import parse_unmet_line
from images.labhost import LabhostImage

__all__ = ["DEFAULT_PATHS", "LABHOST_GUARANTEES", "PRIVATE_PATHS", "SW_PROTECTED_GUARANTEES", "BatchResult",
           "TestOutcomes", "parse_junit", "run_batch"]

REPO = Path(__file__).resolve().parents[2]  # gmemtest/lab/batch.py -> the checkout
DEFAULT_PATHS = ("tests/host_stack",)
# What the lab host is built to offer (its preflight test proves these): a skip for one of them
# inside L1 is a failure of the batch, never a quiet gap in coverage.
LABHOST_GUARANTEES = ("kvm", "kvm_boots_linux", "guest_memfd", "guest_memfd_mmap", "guest_memfd_init_shared",
                      "hwpoison", "hwpoison_inject", "kprobes")
# ... and with the rebuilt KVM (gmemtest.lab.kvm), a software-protected VM with private memory.
SW_PROTECTED_GUARANTEES = (*LABHOST_GUARANTEES, "sw_protected_vm", "private_memory")
# The host-side tests of private memory, run in a batch of their own under the rebuilt KVM.
PRIVATE_PATHS = ("tests/host_stack/test_conversion_cases.py", "tests/host_stack/test_private_poison.py",
                 "tests/gmemtest/test_swprot_by_hand.py")
JUNIT = "junit.xml"
_OUTPUT_TAIL = 3000


@dataclass
class TestOutcomes:
    """pytest's outcomes as its JUnit XML records them."""

    passed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (test, message); errors included
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (test, reason)

    @property
    def total(self) -> int:
        return len(self.passed) + len(self.failed) + len(self.skipped)


def parse_junit(path: Path) -> TestOutcomes:
    """Every ``testcase`` of a pytest JUnit XML file, by outcome."""
    out = TestOutcomes()
    # Our own pytest wrote this file, in a run we started: trusted input.
    for case in ET.parse(path).getroot().iter("testcase"):  # noqa: S314
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        skip = case.find("skipped")
        if problem is not None:
            out.failed.append((name, (problem.get("message") or problem.text or "").strip()))
        elif skip is not None:
            out.skipped.append((name, _skip_reason(skip.get("message") or "")))
        else:
            out.passed.append(name)
    return out


def _skip_reason(message: str) -> str:
    # pytest writes "<file>:<line>: <reason>" for a skip raised in a test or fixture.
    head, sep, rest = message.partition(": ")
    return rest if sep and ":" in head else message


@dataclass
class BatchResult:
    """What the batch ran in L1 and how it is judged."""

    paths: tuple[str, ...]
    kernel_release: str
    returncode: int | None
    outcomes: TestOutcomes
    wall_s: float
    l1_ready_s: float | None
    evidence: Path
    error: str | None = None  # L1 itself failed (boot, freeze, timeout): nothing is judged
    output_tail: str = ""
    kvm: str = STOCK

    @property
    def guarantees(self) -> tuple[str, ...]:
        """The requirements L1 under this KVM meets: a skip for one of them is refused."""
        return SW_PROTECTED_GUARANTEES if self.kvm == SW_PROTECTED else LABHOST_GUARANTEES

    @property
    def refused_skips(self) -> list[tuple[str, str, str]]:
        """(test, requirement, sentence) for every skip the lab host should never need."""
        refused = []
        for test, reason in self.outcomes.skipped:
            unmet = parse_unmet_line(reason)
            if unmet is not None and unmet[0] in self.guarantees:
                refused.append((test, *unmet))
        return refused

    @property
    def ok(self) -> bool:
        return (self.error is None and self.returncode == 0 and not self.outcomes.failed
                and not self.refused_skips and self.outcomes.total > 0)

    def summary_line(self) -> str:
        o = self.outcomes
        state = "PASS" if self.ok else "FAIL"
        return (f"lab-host batch ({' '.join(self.paths)}) in L1 {self.kernel_release}, {self.kvm} KVM: {state}: "
                f"{len(o.passed)} passed, {len(o.failed)} failed, {len(o.skipped)} skipped "
                f"({len(self.refused_skips)} for what the lab host guarantees); L1 ready "
                f"{self.l1_ready_s if self.l1_ready_s is not None else '-'} s, {self.wall_s:.1f} s in all; "
                f"evidence {self.evidence}")

    def problems(self) -> list[str]:
        """Why the batch failed, one line each (empty when it passed)."""
        lines = [f"L1: {self.error}"] if self.error else []
        if self.returncode not in (0, None) and not self.outcomes.failed:
            lines.append(f"pytest in L1 exited {self.returncode} without a failed test")
        if self.error is None and self.outcomes.total == 0:
            lines.append("pytest in L1 ran no test")
        lines += [f"FAILED {test}: {message[:400]}" for test, message in self.outcomes.failed]
        lines += [f"SKIPPED {test} for {name}, which the lab host guarantees: {sentence}"
                  for test, name, sentence in self.refused_skips]
        if lines and self.output_tail:
            lines.append(f"--- L1 output tail ---\n{self.output_tail}")
        return lines

    def to_json(self) -> dict[str, Any]:
        o = self.outcomes
        return {"paths": list(self.paths), "kernel_release": self.kernel_release, "ok": self.ok,
                "returncode": self.returncode, "passed": len(o.passed), "failed": o.failed,
                "skipped": o.skipped, "refused_skips": self.refused_skips, "wall_s": round(self.wall_s, 1),
                "l1_ready_s": self.l1_ready_s, "error": self.error}


def run_batch(image: LabhostImage, out: Path, paths: Sequence[str] = DEFAULT_PATHS, *,
              python: str = sys.executable, timeout: float = 900.0, extra_args: Sequence[str] = (),
              on_output: Callable[[str], None] | None = None, kvm: str = STOCK) -> BatchResult:
    """Boot L1, run ``pytest paths`` in this checkout there, power off, judge the JUnit XML; an L1 that
    froze, died or never got ready (``L1_FAILURES``) is booted once more, its evidence kept aside.

    ``python`` is the interpreter of the project's venv: L1 chroots into this machine's root,
    so the same path runs the same venv. ``kvm`` chooses L1's KVM (``gmemtest.lab.kvm``); under
    the rebuilt one a skip for a software-protected VM is refused too. Evidence: ``out/labhost``
    (console, output, dmesg) and ``out/results/junit.xml``.
    """
    share = out / "results"
    argv = kvm_command(kvm, [python, "-m", "pytest", *paths, "-p", "no:cacheprovider", "-q", "-rs",
                             f"--junitxml={RESULTS_IN_L1}/{JUNIT}", *extra_args], image.kernel_release,
                       python=python)
    started = time.monotonic()
    chunks: list[str] = []

    def keep(text: str) -> None:
        chunks.append(text)
        if on_output is not None:
            on_output(text)

    returncode: int | None = None
    ready: float | None = None
    error: str | None = None
    try:
        result, timings = retry_once(
            lambda: run_in_labhost(image, argv, out / "labhost", share_dir=share, timeout=timeout,
                                   on_output=keep, cwd=REPO, env={"PYTHONPATH": str(REPO)}),
            retry_on=L1_FAILURES, workdir=out, set_aside_as=l1_attempt_name, only=["labhost", "results"],
            on_retry=lambda _exc: chunks.clear())
        returncode, ready = result.returncode, timings.ready_s
    except LabhostError as exc:
        error = f"{type(exc).__name__}: {str(exc)[:2000]}"
    junit = share / JUNIT
    outcomes = parse_junit(junit) if junit.is_file() else TestOutcomes()
    if error is None and not junit.is_file():
        error = f"pytest in L1 left no {JUNIT} (exit {returncode})"
    return BatchResult(tuple(paths), image.kernel_release, returncode, outcomes, time.monotonic() - started,
                       ready, out, error, "".join(chunks)[-_OUTPUT_TAIL:], kvm=kvm)
