"""Project-wide pytest hooks: tests that need a host capability skip with the probed reason.

``@pytest.mark.host_requires("guest_memfd", ...)`` names host requirements
(``host_stack.capabilities.REQUIREMENTS``); before the test runs, the host is probed (lazily:
only the facts those names depend on) and the test is skipped with
``unmet host requirement <name>: <sentence>`` when one is unmet. The reason names the
requirement, so a run can be read back by requirement: the lab-host batch
(``gmemtest.lab.batch``) fails on any such skip for what the lab host guarantees.
"""

from __future__ import annotations

import os
import time

import pytest
from run_summary import PHASE_SECONDS, SUMMARY_LINES

from host_stack.capabilities import REQUIREMENTS


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "host_requires(*names): skip with the probed reason unless the host meets these requirements"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    names = [name for mark in item.iter_markers("host_requires") for name in mark.args]
    if not names:
        return
    unknown = sorted(set(names) - set(REQUIREMENTS))
    if unknown:
        valid = ", ".join(REQUIREMENTS)
        raise pytest.UsageError(f"{item.nodeid}: unknown host requirement(s) {unknown}; valid: {valid}")
    from gmemtest.requirements import host_unmet

    reason = host_unmet(names)  # the same gate as Avocado's and qualify's (gmemtest.host_checks)
    if reason is not None:
        pytest.skip(reason)


# Seconds of the phases before pytest ("bootstrap=12.3 images=2.1 lint=30.0"), set by
# ci/run-tests.sh so that the run's one phase line comes before pytest's closing line.
PHASES_ENV = "GMEMTEST_PHASES"
_STARTED = time.monotonic()


def _phase_line(config: pytest.Config) -> str | None:
    before = os.environ.get(PHASES_ENV)
    if not before:
        return None
    parts = [f"{name} {float(secs):.1f} s" for name, _, secs in (p.partition("=") for p in before.split())]
    inside = config.stash.get(PHASE_SECONDS, {})
    extra = "".join(f", of which {name} {secs:.1f} s" for name, secs in inside.items())
    parts.append(f"pytest {time.monotonic() - _STARTED:.1f} s{extra}")
    return "phases: " + "; ".join(parts)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Lines tests leave for the end of the run (the lab-host batch's counts), and the phase times."""
    lines: list[str] = terminalreporter.config.stash.get(SUMMARY_LINES, [])
    phases = _phase_line(terminalreporter.config)
    if lines or phases:
        terminalreporter.section("gmemtest")
        for line in [*lines, *([phases] if phases else [])]:
            terminalreporter.write_line(line)
