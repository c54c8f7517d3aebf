"""The host-side suite inside the lab host, and the judge of that batch.

``test_host_stack_suite_passes_inside_the_lab_host`` is how the README's test command keeps the
host-side coverage on a machine without guest_memfd or memory failure: one L1 boot runs
``tests/host_stack`` (the witness tests included) where both are real. Its counts are printed
at the end of the pytest run (the ``gmemtest`` section of the summary).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from run_summary import add_phase, add_summary_line

from gmemtest.lab.batch import LABHOST_GUARANTEES, PRIVATE_PATHS, BatchResult, parse_junit, run_batch
from host_stack.capabilities import unmet_line

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="3" tests="6">
<testcase classname="tests.host_stack.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.host_stack.test_a" name="test_bad" time="0.1">
  <failure message="AssertionError: expected 0x41, got 0x40">trace</failure></testcase>
<testcase classname="tests.host_stack.test_a" name="test_setup" time="0.1">
  <error message="failed on setup with OSError">trace</error></testcase>
<testcase classname="tests.host_stack.test_b" name="test_gmem" time="0.0">
  <skipped type="pytest.skip" message="{gmem}">skip</skipped></testcase>
<testcase classname="tests.host_stack.test_b" name="test_einj" time="0.0">
  <skipped type="pytest.skip" message="{einj}">skip</skipped></testcase>
<testcase classname="tests.host_stack.test_b" name="test_frame" time="0.0">
  <skipped type="pytest.skip" message="tests/host_stack/test_b.py:12: no frame of kind nopage">skip</skipped>
</testcase>
</testsuite></testsuites>
"""


def _batch(tmp_path: Path, gmem_skip: str) -> BatchResult:
    einj = unmet_line("einj", "host has no ACPI EINJ with memory uncorrectable non-fatal (0x10): no apei/einj")
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT.format(gmem=gmem_skip, einj=einj))
    return BatchResult(("tests/host_stack",), "7.3.4+deb13-amd64", 1, parse_junit(path), 1.0, 8.0, tmp_path)


def test_the_judge_reads_every_outcome_and_refuses_a_skip_for_what_l1_guarantees(tmp_path: Path) -> None:
    gmem = unmet_line("guest_memfd", "host KVM lacks guest_memfd: KVM_CAP_GUEST_MEMFD is 0")
    result = _batch(tmp_path, f"tests/host_stack/test_b.py:7: {gmem}")
    o = result.outcomes
    assert (len(o.passed), len(o.failed), len(o.skipped)) == (1, 2, 3), o
    assert o.failed[0] == ("tests.host_stack.test_a::test_bad", "AssertionError: expected 0x41, got 0x40")
    assert result.refused_skips == [("tests.host_stack.test_b::test_gmem", "guest_memfd",
                                     "host KVM lacks guest_memfd: KVM_CAP_GUEST_MEMFD is 0")]
    assert not result.ok
    problems = "\n".join(result.problems())
    assert "FAILED tests.host_stack.test_a::test_setup: failed on setup with OSError" in problems
    assert "SKIPPED tests.host_stack.test_b::test_gmem for guest_memfd, which the lab host guarantees" in problems
    assert "1 passed, 2 failed, 3 skipped (1 for what the lab host guarantees)" in result.summary_line()


def test_skips_for_what_l1_does_not_guarantee_are_listed_not_refused(tmp_path: Path) -> None:
    result = _batch(tmp_path, "tests/host_stack/test_b.py:7: needs root")
    assert result.refused_skips == []
    assert "einj" not in LABHOST_GUARANTEES and "hwpoison" in LABHOST_GUARANTEES
    result.returncode, result.outcomes.failed = 0, []
    assert result.ok, result.problems()


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_host_stack_suite_passes_inside_the_lab_host(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from images.labhost import build_labhost_image

    result = run_batch(build_labhost_image(), tmp_path / "batch", timeout=1200)
    add_summary_line(request.config, result.summary_line())
    add_phase(request.config, "lab-host batch", result.wall_s)
    for test, reason in result.outcomes.skipped:
        add_summary_line(request.config, f"  skipped in L1: {test}: {reason}")
    assert result.ok, "\n".join(result.problems())


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_private_memory_suite_passes_inside_the_lab_host_with_the_rebuilt_kvm(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The type-1 tests under the KVM rebuilt with CONFIG_KVM_SW_PROTECTED_VM (swapped in first):
    a skip for a software-protected VM fails it, as a skip for guest_memfd fails the stock batch."""
    from images.labhost import build_labhost_image

    result = run_batch(build_labhost_image(), tmp_path / "batch", PRIVATE_PATHS, timeout=600, kvm="sw-protected")
    add_summary_line(request.config, result.summary_line())
    add_phase(request.config, "lab-host private batch", result.wall_s)
    assert "sw_protected_vm" in result.guarantees
    assert result.ok, "\n".join(result.problems())
    assert result.outcomes.passed and not result.outcomes.skipped, result.outcomes


def test_an_l1_that_never_got_ready_is_booted_once_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a boot that never reached READY is retried (its console kept aside); a command that fails is
    the batch's result."""
    import gmemtest.lab.batch as batch
    from gmemtest.lab.host import LabhostNotReady, LabhostResult, LabhostTimings

    calls: list[int] = []

    def fake_run(image: object, argv: list[str], workdir: Path,
                 **kwargs: object) -> tuple[LabhostResult, LabhostTimings]:
        calls.append(1)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "console.log").write_text(f"attempt {len(calls)}\n")
        if len(calls) == 1:
            raise LabhostNotReady("L1 not ready within 90.0 s; no GMEMTEST-LABHOST-READY on the console")
        share = Path(str(kwargs["share_dir"]))
        share.mkdir(parents=True, exist_ok=True)
        (share / batch.JUNIT).write_text(JUNIT.format(gmem="g", einj="e"))
        return LabhostResult(tuple(argv), 0, "", 1.0), LabhostTimings(ready_s=6.0)

    class Image:
        kernel_release = "7.3.4+deb13-amd64"

    monkeypatch.setattr(batch, "run_in_labhost", fake_run)
    result = batch.run_batch(Image(), tmp_path / "b")  # type: ignore[arg-type]
    assert len(calls) == 2 and result.error is None and result.l1_ready_s == 6.0
    assert (tmp_path / "b" / "not-ready-attempt-1" / "labhost" / "console.log").read_text() == "attempt 1\n"
    assert "not ready" in (tmp_path / "b" / "not-ready-attempt-1" / "why.txt").read_text()
