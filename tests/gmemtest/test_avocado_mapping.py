"""The one mapping from a verdict to Avocado, and the host checks' path through it, without Avocado.

A fake test object stands in for avocado.Test (cancel and fail raise, as Avocado's do).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NoReturn

import pytest

from gmemtest import avocado_support, host_checks
from gmemtest import requirements as req
from gmemtest.host_checks import HostCheck
from host_stack.capabilities import HostReport
from outcome import Check, Finding, Verdict

OK = Check("si_addr_lsb", "12", "12", True)
BAD = Check("si_addr_lsb", "21", "12", False)


class Cancelled(Exception):
    pass


class Failed(Exception):
    pass


class FakeTest:
    def __init__(self, outputdir: Path) -> None:
        self.outputdir = str(outputdir)
        self.whiteboard = ""
        self.params: Any = None
        self.log = logging.getLogger(f"fake-avocado-test.{id(self)}")

    def cancel(self, message: str | None = None) -> NoReturn:
        raise Cancelled(message)

    def fail(self, message: str | None = None) -> NoReturn:
        raise Failed(message)


@pytest.mark.parametrize(("verdict", "raised", "text"), [
    (Verdict("row", (OK,)), None, ""),
    (Verdict("row", (OK, BAD)), Failed, "FAIL si_addr_lsb: expected 21, actual 12"),
    (Verdict("row"), Failed, "row: no check was made"),
    (Verdict.did_not_run("row", "NOT MEANINGFUL", "decoys answered"), Cancelled, "NOT MEANINGFUL: decoys answered"),
    (Verdict.did_not_run("row", "CANNOT RUN", "no EINJ"), Cancelled, "CANNOT RUN: no EINJ"),
    (Verdict.did_not_run("row", "ERROR", "OSError: boom"), Failed, "ERROR: OSError: boom"),
], ids=["pass", "fail", "no-check", "not-meaningful", "cannot-run", "error"])
def test_judge_maps_every_status(tmp_path: Path, verdict: Verdict, raised: type[Exception] | None, text: str) -> None:
    test = FakeTest(tmp_path)
    if raised is None:
        avocado_support.judge(test, verdict)  # type: ignore[arg-type]
    else:
        with pytest.raises(raised) as exc:
            avocado_support.judge(test, verdict)  # type: ignore[arg-type]
        assert text in str(exc.value)
    assert json.loads(test.whiteboard)["status"] == verdict.status


def _row(monkeypatch: pytest.MonkeyPatch, verdict: Verdict, requirements: tuple[str, ...] = ()) -> list[int]:
    calls: list[int] = []

    def run(_report: HostReport | None) -> Verdict:
        calls.append(1)
        return verdict

    row = HostCheck("stand-in check", requirements, run, lambda _v: "summary", "stand_in.json")
    monkeypatch.setattr(host_checks, "host_check", lambda name: row)
    return calls


def test_a_host_check_keeps_its_verdict_logs_findings_and_warns_on_a_failed_cleanup(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    finding = Finding("uapi-errno-x", "divergence", "EEXIST on 7.3.4, EINVAL here")
    verdict = Verdict("stand-in check", (OK,), findings=(finding,), warnings=("pfn 0x1234 left poisoned",))
    _row(monkeypatch, verdict)
    test = FakeTest(tmp_path)
    with caplog.at_level(logging.INFO, logger=test.log.name):
        avocado_support.run_host_check(test, "stand-in check")  # type: ignore[arg-type]
    assert Verdict.from_json((tmp_path / "stand_in.json").read_text()) == verdict
    levels = {(r.levelname, r.getMessage()) for r in caplog.records}
    # log.warning on the clean-up is what makes Avocado WARN; a finding stays INFO (no WARN).
    assert ("WARNING", "CLEANUP pfn 0x1234 left poisoned") in levels, levels
    assert ("INFO", "FINDING uapi-errno-x (divergence): EEXIST on 7.3.4, EINVAL here") in levels, levels


def test_a_host_check_cancels_before_running_when_the_host_lacks_its_requirement(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _row(monkeypatch, Verdict("stand-in check", (OK,)), requirements=("guest_memfd",))
    no_gmem = HostReport(kernel_release="6.18.44", kvm_device=True, kvm_reason=None, kvm_vendor_module="kvm_pvm",
                         kvm_api_version=12, cap_guest_memfd=0)
    monkeypatch.setattr(req, "host_report", lambda: no_gmem)
    with pytest.raises(Cancelled, match="unmet host requirement guest_memfd: host KVM lacks guest_memfd"):
        avocado_support.run_host_check(FakeTest(tmp_path), "stand-in check")  # type: ignore[arg-type]
    assert calls == [], "nothing runs on a host that lacks what the check needs"


def test_an_unknown_row_names_the_rows_there_are() -> None:
    with pytest.raises(KeyError, match="guest_memfd uAPI cases"):
        host_checks.host_check("nope")


def _l1_result(out: Path, items: list[dict[str, Any]]) -> Any:
    from gmemtest.lab.qualify import LabhostQualification

    return LabhostQualification(out=out, kernel_release="7.3.4", image_manifest="m", preflight={},
                                qualification={"items": items, "findings": []}, preflight_rc=0, qualify_rc=0,
                                timings={})


def test_a_lab_host_item_is_judged_from_the_verdict_l1_wrote(tmp_path: Path) -> None:
    """The L1 -> job path reads the verdict back whole: the failed check's own line, not a re-rendering."""
    (tmp_path / "chain" / "kvm-default" / "host-ar-touch-4k").mkdir(parents=True)
    (tmp_path / "chain" / "kvm-default" / "host-ar-touch-4k" / "verdict.json").write_text(
        Verdict("host-ar-touch-4k", (OK, BAD)).to_json())
    name = "host-ar-touch-4k/kvm-default"
    item = {"name": name, "status": "FAIL", "summary": "2 checks", "evidence": "chain/kvm-default/host-ar-touch-4k"}
    with pytest.raises(Failed, match="FAIL si_addr_lsb: expected 21, actual 12"):
        avocado_support._judge_item(FakeTest(tmp_path), item, name, _l1_result(tmp_path, [item]))  # type: ignore[arg-type]


def test_a_lab_host_item_without_a_verdict_file_keeps_its_status_and_says_where(tmp_path: Path) -> None:
    name = "host-ar-touch-4k/kvm-gmem"
    cannot = {"name": name, "status": "CANNOT RUN", "summary": "QEMU has no 'guest-memfd' property"}
    with pytest.raises(Cancelled, match=f"CANNOT RUN: {name} inside the lab host: QEMU has no 'guest-memfd'"):
        avocado_support._judge_item(FakeTest(tmp_path), cannot, name, _l1_result(tmp_path, [cannot]))  # type: ignore[arg-type]
    claimed = {"name": name, "status": "PASS", "summary": "", "evidence": "chain/kvm-gmem/host-ar-touch-4k"}
    with pytest.raises(Failed, match=r"ERROR: .*L1 reported PASS .* but left no verdict file"):
        avocado_support._judge_item(FakeTest(tmp_path), claimed, name, _l1_result(tmp_path, [claimed]))  # type: ignore[arg-type]


def test_a_lab_host_item_whose_clean_up_left_a_frame_poisoned_warns_naming_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A PASS inside L1 whose clean-up failed is a WARN in the job (the private seed's frame, by gpa)."""
    left = "cleanup of corrupt-pfn poison (pid 140 gpa 0x41000 pfn 0x126fbb) failed: EBUSY"
    (tmp_path / "private_seed_regression.json").write_text(
        Verdict("private seed regression", (OK,), warnings=(left,)).to_json())
    name = "private seed regression: poison behind a private gfn of a slot with pgoff > 0"
    item = {"name": name, "status": "PASS", "summary": "13 checks", "evidence": "private_seed_regression.json"}
    test = FakeTest(tmp_path / "out")
    (tmp_path / "out").mkdir()
    with caplog.at_level(logging.INFO, logger=test.log.name):
        avocado_support._judge_item(test, item, name, _l1_result(tmp_path, [item]))  # type: ignore[arg-type]
    assert ("WARNING", f"CLEANUP {left}") in {(r.levelname, r.getMessage()) for r in caplog.records}
