"""`gmemtest qualify` on this host: real host checks, one real guest scenario, the HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gmemtest.cli import main as cli_main
from gmemtest.qualify import Item, Qualification
from gmemtest.report_html import render
from gmemtest.requirements import host_report


@pytest.mark.qemu
def test_qualify_one_scenario_writes_json_and_html(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli_main(["qualify", "srao-late-touch-4k", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "qualification.json").read_text())
    items = {i["name"]: i for i in report["items"]}
    assert items["srao-late-touch-4k"]["status"] == "PASS", items["srao-late-touch-4k"]
    assert (tmp_path / "scenarios" / "srao-late-touch-4k" / "verdict.txt").exists()
    seed = items["seed regression: poison behind a slot with pgoff > 0"]
    hwpoison_missing = host_report().missing("hwpoison")
    if hwpoison_missing:
        # A check that cannot run makes the qualification INCOMPLETE (exit 3), never PASSED.
        assert seed["status"] == "CANNOT RUN" and report["outcome"] == "INCOMPLETE" and status == 3
        assert "CONFIG_MEMORY_FAILURE" in seed["summary"]
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
