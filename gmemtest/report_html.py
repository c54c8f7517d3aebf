"""Render a qualification as one self-contained HTML page (no scripts, no external assets)."""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

from gmemtest.compare import MOVED_ABS_S, MOVED_REL
from gmemtest.report_model import Item, Qualification

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;width:100%;font-size:.92em}td,th{border:1px solid #ddd;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f4f4f4}
.PASS{color:#176f2c;font-weight:600}.FAIL,.ERROR{color:#b00020;font-weight:600}
.CANNOT,.NOT{color:#8a5a00;font-weight:600}.finding{background:#fff6e0;border-left:4px solid #e0a000;
padding:.5em 1em;margin:.5em 0}pre{white-space:pre-wrap;margin:.3em 0;font-size:.9em}
.banner{padding:.6em 1em;font-size:1.1em}.ok{background:#e6f4ea}.bad{background:#fde7e9}
.incomplete{background:#fff6e0}
"""


_RUNNABLE = '<span class="PASS">runnable</span>'


def _status(status: str) -> str:
    css = status.split(maxsplit=1)[0]
    return f'<span class="{css}">{escape(status)}</span>'


def _items_table(items: list[Item]) -> str:
    rows = []
    for item in items:
        details = ""
        if item.details:
            details = f"<details><summary>{len(item.details)} lines</summary><pre>" + escape(
                "\n".join(item.details)) + "</pre></details>"
        evidence = f"<br><small>evidence: {_link(item.evidence)}</small>" if item.evidence else ""
        rows.append(f"<tr><td>{escape(item.name)}</td><td>{_status(item.status)}</td>"
                    f"<td>{escape(item.summary)}{details}{evidence}</td></tr>")
    return "<table><tr><th>check</th><th>status</th><th>what</th></tr>" + "".join(rows) + "</table>"


def _link(evidence: str) -> str:
    """A link relative to the report's directory (the report and its evidence travel together).

    A scenario's directory also gets a link to its verdict.txt, since a browser shows a local
    directory only as a listing, and not every browser does that.
    """
    if evidence.startswith("/"):  # a report written before evidence paths were relative
        return escape(evidence)
    href = quote(evidence)
    link = f'<a href="{href}">{escape(evidence)}</a>'
    if "." not in evidence.rsplit("/", 1)[-1]:
        link += f' (<a href="{href}/verdict.txt">verdict.txt</a>)'
    return link


def _comparison(c: dict[str, Any]) -> str:
    def rows(changes: list[dict[str, Any]], css: str) -> str:
        return "".join(f'<tr><td class="{css}">{escape(ch["name"])}</td><td>{escape(str(ch["old"] or "absent"))}'
                       f' &rarr; {escape(str(ch["new"] or "absent"))}</td><td>{escape(ch.get("summary", ""))}</td></tr>'
                       for ch in changes)
    table = (rows(c["new_failures"], "FAIL") + rows(c["fixed"], "PASS") + rows(c["other_changes"], "NOT"))
    findings = "".join(f"<li>appeared: <b>{escape(f)}</b></li>" for f in c["findings_appeared"]) + "".join(
        f"<li>vanished: <b>{escape(f)}</b></li>" for f in c["findings_vanished"])
    timings = "".join(f"<li>{escape(t['name'])}: {escape(t['change'])}</li>" for t in c["timings_moved"])
    return (f"<h2>Compared with the qualification of {escape(c['old_started'])}</h2>"
            f"<p>{escape(c['old_outcome'])} &rarr; {escape(c['new_outcome'])}; "
            f"{len(c['new_failures'])} new FAIL, {len(c['fixed'])} fixed, {len(c['other_changes'])} other changes</p>"
            + (f"<table><tr><th>check</th><th>status</th><th>now</th></tr>{table}</table>" if table else "")
            + f"<p>Findings:</p><ul>{findings or '<li>unchanged</li>'}</ul>"
            + f"<p>Timings that moved (by at least {MOVED_ABS_S:.0f} s and {MOVED_REL:.0%}):</p>"
            + f"<ul>{timings or '<li>none</li>'}</ul>")


def render(q: Qualification) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(q.counts().items()))
    css = {"PASSED": "ok", "INCOMPLETE": "incomplete"}.get(q.outcome, "bad")
    banner = (css, f"QUALIFICATION {q.outcome}")
    host_rows = "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))}</td></tr>"
                        for k, v in q.preflight.get("host_rows", []))
    qemu = q.preflight.get("qemu")
    if isinstance(qemu, dict):
        qemu_rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in qemu.items())
    else:
        qemu_rows = f"<tr><td>QEMU</td><td>{escape(str(qemu))}</td></tr>"
    findings = "".join(
        f'<div class="finding"><b>{escape(f["id"])}</b> ({escape(f["severity"])})<br>{escape(f["text"])}</div>'
        for f in q.findings) or "<p>none</p>"
    sections = ""
    for section, title in (("host", "Host kernel and KVM"), ("guest", "Guest scenarios (QEMU, MCE injection)"),
                           ("chain", "The whole chain: host poison, QEMU, guest (per profile, inside the lab host)")):
        items = [i for i in q.items if i.section == section]
        if items:
            sections += f"<h2>{title}</h2>" + _items_table(items)
    profiles = "".join(
        f"<tr><td>{escape(name)}</td><td>{_RUNNABLE if p['runnable'] else _status('CANNOT RUN')}</td>"
        f"<td>{escape('; '.join(p['unmet']))}</td></tr>" for name, p in q.preflight.get("profiles", {}).items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>gmemtest qualification</title>
<style>{_CSS}</style></head><body>
<h1>gmemtest qualification</h1>
<div class="banner {banner[0]}">{banner[1]}: {escape(counts)} &middot; started {escape(q.started)},
took {q.duration_s:.0f} s</div>
{_comparison(q.comparison) if q.comparison else ""}
<h2>Findings (divergences that do not fail the qualification)</h2>{findings}
{sections}
<h2>Guest profiles on this host</h2><table><tr><th>profile</th><th>status</th><th>why not</th></tr>{profiles}</table>
<h2>Host stack</h2><table>{host_rows}</table>
<h2>QEMU</h2><table>{qemu_rows}</table>
</body></html>
"""
