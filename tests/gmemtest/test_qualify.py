"""`gmemtest qualify` on this host: real host checks, one real guest scenario, the HTML page."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from gmemtest.cli import main as cli_main
from gmemtest.host_checks import SEED_ITEM, HostCheck
from gmemtest.report_html import render
from gmemtest.report_model import Item, Qualification
from gmemtest.requirements import host_unmet
from host_stack.capabilities import HostReport
from host_stack.seed_regression import SEED_REQUIREMENTS
from outcome import Check, Verdict


@pytest.mark.qemu
def test_qualify_one_scenario_writes_json_and_html(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli_main(["qualify", "srao-late-touch-4k", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "qualification.json").read_text())
    items = {i["name"]: i for i in report["items"]}
    assert items["srao-late-touch-4k"]["status"] == "PASS", items["srao-late-touch-4k"]
    assert (tmp_path / "scenarios" / "srao-late-touch-4k" / "verdict.txt").exists()
    seed = items["seed regression: poison behind a slot with pgoff > 0"]
    unmet = host_unmet(SEED_REQUIREMENTS)
    if unmet:
        # A check that cannot run makes the qualification INCOMPLETE (exit 3), never PASSED, and
        # says which requirement this host lacks (guest_memfd or memory failure, as probed).
        assert seed["status"] == "CANNOT RUN" and report["outcome"] == "INCOMPLETE" and status == 3
        assert seed["summary"] == unmet
    # Whatever the host lacks, no host check raises: it runs, or it CANNOT RUN with the reason.
    assert not [i for i in report["items"] if i["status"] == "ERROR"], report["items"]
    html = (tmp_path / "qualification.html").read_text()
    assert f"QUALIFICATION {report['outcome']}" in html and "srao-late-touch-4k" in html
    for finding in report["findings"]:
        assert finding["id"] in html
    assert report["outcome"] in capsys.readouterr().out


def test_outcome_order_and_escaping() -> None:
    q = Qualification(started="now")
    q.items.append(Item("host", "a", "PASS", "fine"))
    assert q.outcome == "PASSED"
    q.items.append(Item("host", "b", "CANNOT RUN", "no <hwpoison> & no luck"))
    assert q.outcome == "INCOMPLETE"
    q.items.append(Item("guest", "c", "FAIL", "si_addr_lsb: expected 21, actual 12"))
    assert q.outcome == "FAILED"
    html = render(q)
    assert "no &lt;hwpoison&gt; &amp; no luck" in html and "<hwpoison>" not in html
    assert "QUALIFICATION FAILED" in html


def _stand_in(name: str, run: Callable[[HostReport | None], Verdict] | None = None) -> HostCheck:
    """A host check that needs nothing and passes (or does what ``run`` does)."""
    passing = Verdict(name, (Check("stand-in", "1", "1", True),))
    return HostCheck(name, (), run or (lambda _report: passing), lambda _v: "stand-in passed", f"{name}.json")


def test_a_check_that_raises_is_an_error_item_and_the_report_is_still_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """One broken check must not take the report with it: its exception is that item's ERROR."""
    from gmemtest import host_checks

    def broken(_report: HostReport | None) -> Verdict:
        raise RuntimeError("forced failure of the seed regression")

    table = (_stand_in("first"), _stand_in(SEED_ITEM, broken), _stand_in("last"))
    monkeypatch.setattr(host_checks, "HOST_CHECK_TABLE", table)
    status = cli_main(["qualify", "--no-guest", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "qualification.json").read_text())
    items = {i["name"]: i for i in report["items"]}
    seed = items[SEED_ITEM]
    assert seed["status"] == "ERROR" and "RuntimeError: forced failure of the seed regression" in seed["summary"]
    assert report["outcome"] == "FAILED" and status == 1
    assert (items["first"]["status"], items["last"]["status"]) == ("PASS", "PASS"), "the others are still judged"
    html = (tmp_path / "qualification.html").read_text()
    assert "forced failure of the seed regression" in html and "QUALIFICATION FAILED" in html
    capsys.readouterr()


def test_the_report_is_written_as_it_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after two host checks (here: a KeyboardInterrupt) still leaves their items on disk."""
    from gmemtest import host_checks
    from gmemtest import qualify as qualify_module

    def interrupted(_report: HostReport | None) -> Verdict:
        raise KeyboardInterrupt

    table = (_stand_in("one"), _stand_in("two"), _stand_in("three", interrupted))
    monkeypatch.setattr(host_checks, "HOST_CHECK_TABLE", table)
    with pytest.raises(KeyboardInterrupt):
        qualify_module.qualify(tmp_path, specs=[], image=None)
    report = json.loads((tmp_path / "qualification.json").read_text())
    assert [(i["section"], i["name"]) for i in report["items"]] == [("host", "one"), ("host", "two")], report["items"]
    assert (tmp_path / "qualification.html").is_file()


def test_run_exits_1_when_a_verdict_failed_even_if_another_scenario_was_unmet(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from types import SimpleNamespace

    import gmemtest.requirements
    import gmemtest.runner
    import images.build
    from outcome import Check, Verdict

    failed = Verdict("srao-late-touch-4k", (Check("si_addr_lsb", "12", "21", False),))
    monkeypatch.setattr(images.build, "build_default_image", lambda *a, **k: None)
    monkeypatch.setattr(gmemtest.runner, "run_in_fresh_guest", lambda spec, *a, **k: SimpleNamespace(
        verdict=failed, observations=SimpleNamespace(injection_to_sigbus_ms=None)))
    calls = iter([[], ["host lacks what the second scenario needs"]])
    monkeypatch.setattr(gmemtest.requirements, "unmet_requirements", lambda *a, **k: next(calls))
    status = cli_main(["run", "srao-late-touch-4k", "srao-late-touch-thp", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "FAIL" in out and "UNMET" in out
    assert status == 1, f"a failed verdict must give exit 1 whatever else was unmet, got {status}"
