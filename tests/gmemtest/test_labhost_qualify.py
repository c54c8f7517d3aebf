"""The lab-host qualification's plumbing: one L1 run per job and image, shared by its tests."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from gmemtest.avocado_support import _job_dir
from gmemtest.cli import main as cli_main
from gmemtest.lab import qualify as lq
from gmemtest.report_model import Qualification
from outcome import Check, Finding, Verdict


class _Image:
    def __init__(self, root: Path) -> None:
        self.manifest = root / "images" / "abc123" / "manifest.json"
        self.kernel_release = "7.3.4+deb13-amd64"


def _fake_run(calls: list[Path], fail_first: bool = False) -> Any:
    def run(image: Any, out: Path, **_: Any) -> lq.LabhostQualification:
        calls.append(out)
        if fail_first and len(calls) == 1:
            raise lq.LabhostError("L1 not ready within 90.0 s")
        out.mkdir(parents=True, exist_ok=True)
        qual = {"outcome": "PASSED", "counts": {"PASS": 1}, "findings": [],
                "items": [{"section": "host", "name": "x", "status": "PASS", "summary": "", "details": []}]}
        (out / "qualification.json").write_text(json.dumps(qual))
        (out / "preflight.json").write_text(json.dumps({"host": {}}))
        result = lq.LabhostQualification(out, image.kernel_release, str(image.manifest), {"host": {}}, qual,
                                         0, 0, {"ready_s": 7.0})
        (out / lq.RESULT_NAME).write_text(json.dumps(result.to_json()))
        return result
    return run


def test_one_l1_run_serves_every_test_of_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(lq, "qualify_in_labhost", _fake_run(calls))
    image: Any = _Image(tmp_path)
    results: list[lq.LabhostQualification] = []
    threads = [threading.Thread(target=lambda: results.append(lq.shared_run(image, tmp_path / "job")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1, f"expected one L1 run for the job, got {len(calls)}"
    assert len(results) == 4 and all(r.items["x"]["status"] == "PASS" for r in results)


def test_a_failed_l1_run_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(lq, "qualify_in_labhost", _fake_run(calls, fail_first=True))
    image: Any = _Image(tmp_path)
    with pytest.raises(lq.LabhostError, match="not ready"):
        lq.shared_run(image, tmp_path / "job")
    assert lq.shared_run(image, tmp_path / "job").kernel_release == "7.3.4+deb13-amd64"
    assert len(calls) == 2
    why = tmp_path / "job" / "labhost-abc123" / "failed-attempt-1" / "why.txt"
    assert "not ready" in why.read_text(), "the failed attempt keeps its evidence, not overwritten by the retry"


def test_a_shared_run_that_keeps_failing_stops_being_retried(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def failing(image: Any, out: Path, **_: Any) -> lq.LabhostQualification:
        calls.append(out)
        (out / "labhost").mkdir(parents=True, exist_ok=True)
        (out / "labhost" / "console.log").write_text(f"attempt {len(calls)}\n")
        raise lq.LabhostError(f"L1 exited (attempt {len(calls)})")

    monkeypatch.setattr(lq, "qualify_in_labhost", failing)
    image: Any = _Image(tmp_path)
    for _ in range(lq.SHARED_RUN_ATTEMPTS):
        with pytest.raises(lq.LabhostError, match="L1 exited"):
            lq.shared_run(image, tmp_path / "job")
    with pytest.raises(lq.LabhostError, match=r"failed 2 times; the last time: LabhostError: L1 exited \(attempt 2\)"):
        lq.shared_run(image, tmp_path / "job")
    assert len(calls) == lq.SHARED_RUN_ATTEMPTS
    kept = tmp_path / "job" / "labhost-abc123"
    assert (kept / "failed-attempt-1" / "labhost" / "console.log").read_text() == "attempt 1\n"


def test_job_dir_is_found_from_a_tests_outputdir(tmp_path: Path) -> None:
    out = tmp_path / "job-1" / "test-results" / "3-avocado_tests_x.py_T.test" / "data"
    assert _job_dir(out) == tmp_path / "job-1"
    assert _job_dir(tmp_path / "a" / "data") == tmp_path / "a"


def test_qualify_labhost_refuses_guest_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["qualify", "--labhost", "srao-late-touch-4k"]) == 2
    assert "the lab host runs the chain rows (host poison) itself; drop srao-late-touch-4k" in capsys.readouterr().err


def _chain_tree(out: Path) -> None:
    """What `gmemtest run` of the chain left in out/chain/<profile>/ (shapes of a real L1 run)."""
    default = out / lq.CHAIN_DIR / "kvm-default"
    (default / "host-ar-touch-4k").mkdir(parents=True)
    judged = Verdict("host-ar-touch-4k", (
        Check("KPF_HWPOISON on host pfn 0x117961", "True", "True", True, "host"),
        Check("si_code", "4 (BUS_MCEERR_AR)", "4 (BUS_MCEERR_AR)", True, "guest")),
        findings=(Finding("qemu-forwards-4k-of-a-larger-poisoned-page", "divergence", "QEMU 10.0.2 ..."),))
    (default / "host-ar-touch-4k" / "verdict.json").write_text(judged.to_json())
    broke = Verdict.did_not_run("host-ao-late-touch-4k", "ERROR", "HostPoisonError: refusing")
    (default / "summary.json").write_text(json.dumps([
        {"scenario": "host-ar-touch-4k", "profile": "kvm-default", "verdict": judged.to_dict()},
        {"scenario": "host-ao-late-touch-4k", "profile": "kvm-default", "verdict": broke.to_dict()}]))
    gmem = out / lq.CHAIN_DIR / "kvm-gmem"
    gmem.mkdir(parents=True)
    cannot = Verdict.did_not_run("host-ar-touch-4k", "CANNOT RUN",
                                 "/usr/bin/qemu-system-x86_64 (QEMU 10.0.2) has no 'guest-memfd' property")
    (gmem / "summary.json").write_text(json.dumps([
        {"scenario": "host-ar-touch-4k", "profile": "kvm-gmem", "verdict": cannot.to_dict()}]))


def test_chain_rows_become_report_items_per_profile(tmp_path: Path) -> None:
    _chain_tree(tmp_path)
    qual = {"started": "now", "items": [{"section": "host", "name": "x", "status": "PASS", "summary": "",
                                         "details": []}], "preflight": {}}
    doc = lq._merge(qual, tmp_path, lq.chain_variants(None), Qualification(started=""))
    items = {i["name"]: i for i in doc["items"] if i["section"] == "chain"}
    assert items["host-ar-touch-4k/kvm-default"]["status"] == "PASS"
    assert items["host-ar-touch-4k/kvm-default"]["details"][0].startswith("ok   [host] KPF_HWPOISON")
    assert items["host-ao-late-touch-4k/kvm-default"]["status"] == "ERROR"
    assert items["host-ar-touch-4k/kvm-gmem"]["status"] == "CANNOT RUN"
    assert "guest-memfd" in items["host-ar-touch-4k/kvm-gmem"]["summary"]
    assert doc["outcome"] == "FAILED"  # the ERROR row outranks the others
    assert [f["id"] for f in doc["findings"]] == ["qemu-forwards-4k-of-a-larger-poisoned-page"]  # the chain's too
    html = (tmp_path / "qualification.html").read_text()
    assert "The whole chain" in html and "host-ar-touch-4k/kvm-gmem" in html


def _private_share(share: Path, *, report: bool) -> None:
    where = share / lq.PRIVATE_QUAL_DIR
    where.mkdir(parents=True)
    (share / lq.PRIVATE_PREFLIGHT_NAME).write_text('{"host": {"vm_types_mask": 3}}')
    if report:
        verdict = Verdict("private seed regression", (Check("memory_fault.flags", "0x8", "0x8", True),))
        (where / "private_seed_regression.json").write_text(verdict.to_json())
        (where / "qualification.json").write_text(json.dumps({
            "started": "now", "findings": [{"id": "private-unpoison-needs-punch", "severity": "info", "text": "t"}],
            "items": [{"section": "host", "name": "private seed", "status": "PASS", "summary": "13 checks",
                       "details": [], "evidence": "private_seed_regression.json"}]}))


def test_the_private_section_adds_its_items_findings_and_evidence_naming_l1s_kvm(tmp_path: Path) -> None:
    share, out = tmp_path / "share", tmp_path / "out"
    out.mkdir()
    _private_share(share, report=True)
    section = lq._private_section(share, out, "", "sw-protected")
    qual = {"started": "now", "items": [{"section": "host", "name": "x", "status": "PASS", "summary": "",
                                         "details": []}], "preflight": {}}
    doc = lq._merge({**qual, "findings": [dict(section.findings[0])]}, out, (), section)
    item = next(i for i in doc["items"] if i["name"] == "private seed")
    assert item["status"] == "PASS" and item["summary"].endswith("[L1 KVM: sw-protected]")
    assert [f["id"] for f in doc["findings"]] == ["private-unpoison-needs-punch"]  # said once
    assert (out / "private_seed_regression.json").is_file() and (out / lq.PRIVATE_PREFLIGHT_NAME).is_file()


def test_a_private_section_that_left_no_report_is_an_error_item(tmp_path: Path) -> None:
    share = tmp_path / "share"
    _private_share(share, report=False)
    section = lq._private_section(share, tmp_path, "swap failed", "sw-protected")
    (item,) = section.items
    assert item.status == "ERROR" and "no readable qualification.json" in item.summary, item


def test_a_row_without_a_verdict_or_checks_is_not_a_pass(tmp_path: Path) -> None:
    item = lq.chain_item({"scenario": "host-ar-touch-4k", "passed": True}, "kvm-default", tmp_path)
    assert item.status == "ERROR" and "summary row has no verdict" in item.summary
    empty = Verdict("host-ar-touch-4k").to_dict()
    item = lq.chain_item({"scenario": "host-ar-touch-4k", "verdict": empty}, "kvm-default", tmp_path)
    assert item.status == "FAIL", "a verdict without checks decided nothing"


def test_chain_command_keeps_qemu_logs_on_l1_tmpfs() -> None:
    argv = lq._chain_command(lq.ChainVariant("kvm-default", "kvm-default"), Path("/g/manifest.json"))
    assert argv[:2] == ["sh", "-c"] and "--out /tmp/chain-kvm-default" in argv[2]
    assert f"cp -r /tmp/chain-kvm-default {lq.RESULTS_IN_L1}/chain/kvm-default" in argv[2]
    assert "--qemu" not in argv
    rows = ("host-ao-late-touch-4k", "host-ao-early-kill-4k", "host-ao-reset-4k", "host-ar-touch-4k")
    assert tuple(argv[-len(rows):]) == rows
    assert lq.ChainVariant("kvm-hugetlb", "kvm-hugetlb").scenarios == ("host-ao-hugetlb-thp",)


def test_chain_variants_run_gmem_and_swprot_under_the_newer_qemu_only() -> None:
    newer = Path("/cache/images/q/bin/qemu-system-x86_64")
    assert [(v.label, v.profile, v.qemu, v.private_kvm) for v in lq.chain_variants(newer)] == [
        ("kvm-default", "kvm-default", None, False), ("kvm-default+newer-qemu", "kvm-default", newer, False),
        ("kvm-hugetlb", "kvm-hugetlb", None, False), ("kvm-gmem", "kvm-gmem", newer, False),
        ("kvm-swprot", "kvm-swprot", newer, True)]
    assert [v.label for v in lq.chain_variants(None)] == ["kvm-default", "kvm-hugetlb", "kvm-gmem", "kvm-swprot"]
    assert lq.ChainVariant("kvm-swprot", "kvm-swprot").scenarios == (
        "private-convert-4k", "private-srar-user-spin-4k", "private-host-poison-touch-4k", "private-host-poison-mce-4k")
    argv = lq._chain_command(lq.chain_variants(newer)[1], Path("/g/manifest.json"))
    assert argv[argv.index("--qemu") + 1] == str(newer) and argv[argv.index("--profile") + 1] == "kvm-default"


def test_a_frozen_l1_is_retried_once_keeping_its_evidence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gmemtest.lab.host import LabhostFrozen

    calls: list[Path] = []
    good = _fake_run([])

    def once(image: Any, out: Path, **kwargs: Any) -> lq.LabhostQualification:
        calls.append(out)
        if len(calls) == 1:
            (out / "labhost").mkdir(parents=True)
            (out / "labhost" / "frozen.txt").write_text("== info registers -a\nRIP=ffffffff81000000\n")
            raise LabhostFrozen("L1 froze while running 'x'", out / "labhost" / "frozen.txt")
        return good(image, out, **kwargs)

    monkeypatch.setattr(lq, "qualify_once", once)
    result = lq.qualify_in_labhost(_Image(tmp_path), tmp_path / "run")
    assert len(calls) == 2 and result.kernel_release == "7.3.4+deb13-amd64"
    kept = tmp_path / "run" / "frozen-attempt-1"
    assert "RIP=" in (kept / "labhost" / "frozen.txt").read_text()
    assert "L1 froze" in (kept / "why.txt").read_text()
    calls.clear()

    def always(image: Any, out: Path, **kwargs: Any) -> lq.LabhostQualification:
        calls.append(out)
        raise LabhostFrozen("L1 froze again", out / "frozen.txt")

    monkeypatch.setattr(lq, "qualify_once", always)
    with pytest.raises(LabhostFrozen, match="froze again"):
        lq.qualify_in_labhost(_Image(tmp_path), tmp_path / "run2")
    assert len(calls) == 2, "at most one retry"



def test_an_l1_that_died_is_retried_once_keeping_its_oops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gmemtest.lab.host import LabhostDied

    calls: list[Path] = []
    good = _fake_run([])

    def once(image: Any, out: Path, **kwargs: Any) -> lq.LabhostQualification:
        calls.append(out)
        if len(calls) == 1:
            (out / "labhost").mkdir(parents=True)
            (out / "labhost" / "console.log").write_text("BUG: TASK stack guard page was hit\n")
            raise LabhostDied("L1 exited while running 'x'\n--- L1 console tail ---\nKernel panic")
        return good(image, out, **kwargs)

    monkeypatch.setattr(lq, "qualify_once", once)
    assert lq.qualify_in_labhost(_Image(tmp_path), tmp_path / "run").kernel_release == "7.3.4+deb13-amd64"
    kept = tmp_path / "run" / "died-attempt-1"
    assert "stack guard page" in (kept / "labhost" / "console.log").read_text()
    assert len(calls) == 2


def test_the_lab_modules_name_the_checkout_they_run_from() -> None:
    """L1 sees the checkout through the work share at REPO: a wrong REPO hides the venv from it."""
    from gmemtest.lab import batch

    for repo in (lq.REPO, batch.REPO):
        assert (repo / "setup.cfg").is_file() and (repo / "gmemtest" / "lab").is_dir(), repo
