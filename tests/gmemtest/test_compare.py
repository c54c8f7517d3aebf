"""`gmemtest qualify --compare OLD.json`: what changed between two host stacks, in text, JSON and HTML."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from gmemtest import qualify as qualify_module
from gmemtest.cli import main as cli_main
from gmemtest.compare import compare
from gmemtest.report_html import render
from gmemtest.report_model import Item, Qualification


def _report(items: list[Item], findings: tuple[str, ...] = (), duration_s: float = 20.0) -> dict[str, Any]:
    q = Qualification(started="then", items=items, findings=[{"id": f, "severity": "info", "text": f}
                                                             for f in findings])
    q.duration_s = duration_s
    return q.to_json()


OLD = _report([Item("host", "uapi", "PASS", "37 passed", duration_s=2.0),
               Item("guest", "srao-late-touch-4k", "PASS", "10 checks", evidence="scenarios/srao-late-touch-4k",
                    duration_s=6.0),
               Item("guest", "srar-user-spin-4k", "FAIL", "bad lsb", duration_s=7.0),
               Item("host", "seed", "CANNOT RUN", "no hwpoison")],
              findings=("gmem-slot-served-from-userspace-addr",))
NEW = _report([Item("host", "uapi", "PASS", "37 passed", duration_s=2.2),
               Item("guest", "srao-late-touch-4k", "FAIL", "si_addr: expected 0x1238, actual 0x1000",
                    evidence="scenarios/srao-late-touch-4k", duration_s=12.5),
               Item("guest", "srar-user-spin-4k", "PASS", "10 checks", duration_s=7.1),
               Item("host", "seed", "PASS", "judged")],
              findings=("uapi-einval-for-bound-range",), duration_s=40.0)


def test_a_check_that_fails_now_is_a_new_fail_and_the_rest_is_sorted_by_kind() -> None:
    c = compare(OLD, NEW)
    assert [ch.name for ch in c.new_failures] == ["srao-late-touch-4k"]
    assert c.new_failures[0].old == "PASS" and "expected 0x1238" in c.new_failures[0].summary
    assert [ch.name for ch in c.fixed] == ["srar-user-spin-4k"]
    assert [(ch.name, ch.old, ch.new) for ch in c.other_changes] == [("seed", "CANNOT RUN", "PASS")]
    assert c.findings_appeared == ["uapi-einval-for-bound-range"]
    assert c.findings_vanished == ["gmem-slot-served-from-userspace-addr"]
    # 6.0 -> 12.5 s moved; 2.0 -> 2.2 s (under 1 s) and 7.0 -> 7.1 s did not.
    assert [(t.name, t.old_s, t.new_s) for t in c.timings_moved] == [("srao-late-touch-4k", 6.0, 12.5),
                                                                     ("whole qualification", 20.0, 40.0)]
    text = "\n".join(c.lines())
    assert "NEW FAIL  srao-late-touch-4k: PASS -> FAIL" in text and "6.0 s -> 12.5 s (+108%)" in text


def test_the_same_report_twice_changed_nothing() -> None:
    assert compare(OLD, OLD).unchanged and "nothing changed" in compare(OLD, OLD).lines()[-1]


def test_the_html_shows_the_comparison_and_relative_evidence_links_that_open(tmp_path: Path) -> None:
    (tmp_path / "scenarios" / "srao-late-touch-4k").mkdir(parents=True)
    (tmp_path / "scenarios" / "srao-late-touch-4k" / "verdict.txt").write_text("srao-late-touch-4k: FAIL\n")
    q = Qualification(started="now", items=[Item(**i) for i in NEW["items"]])
    q.comparison = compare(OLD, NEW).to_json()
    html = render(q)
    assert "Compared with the qualification of then" in html
    assert re.search(r'<td class="FAIL">srao-late-touch-4k</td><td>PASS &rarr; FAIL</td>', html), html
    assert "vanished: <b>gmem-slot-served-from-userspace-addr</b>" in html
    hrefs = re.findall(r'href="([^"]+)"', html)
    assert hrefs, "no evidence links"
    for href in hrefs:
        assert not href.startswith(("/", "file:")), f"evidence link {href} is not relative"
        assert (tmp_path / href).exists(), f"evidence link {href} does not open from the report's directory"


def test_cli_compare_refuses_a_file_that_is_not_a_qualification_before_running_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(qualify_module, "qualify", lambda *a, **k: pytest.fail("ran checks"))
    (tmp_path / "old.json").write_text(json.dumps({"not": "a report"}))
    assert cli_main(["qualify", "--no-guest", "--compare", str(tmp_path / "old.json"), "--out", str(tmp_path)]) == 2
    assert "not a readable qualification.json" in capsys.readouterr().err


def test_cli_compare_prints_and_stores_the_comparison(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    def fake_qualify(out: Path, **kwargs: Any) -> Qualification:
        q = Qualification(started="now", items=[Item(**i) for i in NEW["items"]])
        q.comparison = compare(kwargs["compare_with"], q.to_json()).to_json()
        return q

    monkeypatch.setattr(qualify_module, "qualify", fake_qualify)
    (tmp_path / "old.json").write_text(json.dumps(OLD))
    assert cli_main(["qualify", "--no-guest", "--compare", str(tmp_path / "old.json"), "--out", str(tmp_path)]) == 1
    assert "NEW FAIL  srao-late-touch-4k: PASS -> FAIL" in capsys.readouterr().out
