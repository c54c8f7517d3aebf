"""`gmemtest preflight`: what this host, its KVM and its QEMU can do, and which profiles can run.

Everything is probed (real ioctls, a real MADV_HWPOISON attempt in a child, QEMU asked through
QMP), so the table is the same evidence a test uses when it CANCELs.
"""

from __future__ import annotations

from typing import Any

from gmemtest.requirements import host_report, qemu_report, unmet_requirements
from guests.profiles import PROFILES
from qmp_helpers import DEFAULT_QEMU


def preflight_report(binary: str = DEFAULT_QEMU) -> dict[str, Any]:
    host = host_report()
    caps = qemu_report(binary)
    profiles: dict[str, Any] = {}
    for profile in PROFILES.values():
        unmet = unmet_requirements(profile.requirements, binary=binary, accel=profile.accel)
        profiles[profile.name] = {"accel": profile.accel, "requirements": list(profile.requirements),
                                  "runnable": not unmet, "unmet": unmet}
    return {
        "host": host.to_dict(),
        "host_rows": [list(row) for row in host.rows()],
        "qemu": caps if isinstance(caps, str) else caps.to_dict(),
        "project_qemu": _project_qemu(),
        "profiles": profiles,
    }


def _project_qemu() -> dict[str, Any] | str:
    """The project's QEMU (images.qemu_build) as the cache holds it; never built here."""
    from images.build import BuildError
    from images.qemu_build import built_in_cache, patch_series

    try:
        series = patch_series()
        built = built_in_cache(series=series)
    except (BuildError, OSError) as exc:
        return f"its patch series cannot be read: {exc}"
    if built is None:
        return (f"not built yet for series {series.identity} ({len(series.patches)} patches): "
                "python -m images qemu-build")
    return built.as_json()


def _qemu_rows(qemu: dict[str, Any] | str) -> list[tuple[str, str]]:
    if isinstance(qemu, str):
        return [("QEMU", qemu)]
    rows = [("QEMU binary", str(qemu["binary"])), ("QEMU version", str(qemu["version_text"])),
            ("accelerators (compiled in)", ", ".join(qemu["accelerators"]))]
    rows += [(f"object type {name}", "yes" if ok else "no") for name, ok in qemu["object_types"].items()]
    rows += [(f"{backend} guest-memfd property", "yes" if ok else "no")
             for backend, ok in qemu["guest_memfd_property"].items()]
    return rows


def _project_qemu_rows(built: dict[str, Any] | str | None) -> list[tuple[str, str]]:
    if built is None:
        return []
    if isinstance(built, str):
        return [("project QEMU", built)]
    return [("project QEMU", str(built["binary"])),
            ("  source, package version", f"Debian {built['source_version']}; {built['pkgversion']}"),
            ("  patch series", ", ".join(built["series"]))]


def render_table(report: dict[str, Any]) -> str:
    sections: list[tuple[str, list[tuple[str, str]]]] = [
        ("host", [(str(k), str(v)) for k, v in report["host_rows"]]),
        ("qemu", _qemu_rows(report["qemu"]) + _project_qemu_rows(report.get("project_qemu"))),
        ("profiles", [(name, "runnable" if p["runnable"] else "CANNOT RUN: " + "; ".join(p["unmet"]))
                      for name, p in report["profiles"].items()]),
    ]
    width = max(len(k) for _, rows in sections for k, _ in rows)
    out: list[str] = []
    for title, rows in sections:
        out.append(f"== {title}")
        out.extend(f"  {k:<{width}}  {v}" for k, v in rows)
    out.extend(_plan_lines(report))
    return "\n".join(out)


def _plan_lines(report: dict[str, Any]) -> list[str]:
    """The main job's plan: counts, then every test that will CANCEL here with the host fact."""
    if "main_job_error" in report:
        return ["== main job (avocado run avocado_tests/)", f"  cannot plan: {report['main_job_error']}"]
    plan = report.get("main_job")
    if plan is None:
        return []
    cancels = [p for p in plan if p["cancel"]]
    unknown = [p for p in plan if p.get("unknown")]
    runs = len(plan) - len(cancels) - len(unknown)
    lines = ["== main job (avocado run avocado_tests/)",
             f"  {len(plan)} tests: {runs} run here and must PASS, {len(cancels)} CANCEL"
             + (f", {len(unknown)} cannot be planned here" if unknown else "") + ":"]
    for p in cancels:
        lines.append(f"  CANCEL {p['test']}")
        lines.append(f"         {p['cancel']}")
    reasons: dict[str, list[str]] = {}
    for p in unknown:
        reasons.setdefault(str(p["unknown"]), []).append(str(p["test"]))
    for reason, tests in reasons.items():
        lines.append(f"  ?      {', '.join(tests)}")
        lines.append(f"         {reason if len(reason) <= 400 else reason[:400] + ' ...'}")
    return lines
