"""The `gmemtest` command: preflight, image, scenarios, run, reap, bench.

`gmemtest run` is the by-hand path for an engineer reproducing a bug: the same scenario code the
Avocado tests use, with the evidence left in a directory the engineer names.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gmemtest.scenarios import SCENARIOS, get_scenario, scenario_names

LOG = logging.getLogger("gmemtest")

EXIT_PASS, EXIT_FAIL, EXIT_UNMET, EXIT_USAGE = 0, 1, 3, 2


def _cmd_preflight(args: argparse.Namespace) -> int:
    from gmemtest.preflight import preflight_report, render_table

    report = preflight_report(args.qemu)
    print(json.dumps(report, indent=2) if args.json else render_table(report))
    return EXIT_PASS


def _cmd_image(args: argparse.Namespace) -> int:
    from images.build import build_default_image

    t0 = time.monotonic()
    image = build_default_image(args.cache, force=args.force)
    if args.json:
        print(json.dumps(image.as_json(), indent=2))
    else:
        state = "cache hit" if image.cache_hit else "built"
        print(f"{state} in {time.monotonic() - t0:.2f}s: kernel {image.kernel_release}\n"
              f"  kernel   {image.kernel}\n  initrd   {image.initrd}\n  ssh key  {image.ssh_key}\n"
              f"  manifest {image.manifest}")
    return EXIT_PASS


def _cmd_scenarios(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([{"name": s.name, "summary": s.summary, "profile": s.profile, "tags": list(s.tags)}
                          for s in SCENARIOS], indent=2))
        return EXIT_PASS
    width = max(len(s.name) for s in SCENARIOS)
    for s in SCENARIOS:
        print(f"{s.name:<{width}}  {s.profile:<18}  {s.summary}")
    return EXIT_PASS


def _cmd_run(args: argparse.Namespace) -> int:
    from gmemtest.requirements import unmet_requirements
    from gmemtest.runner import run_in_fresh_guest
    from guests.profiles import get_profile
    from images.build import build_default_image

    names = scenario_names() if args.all else args.scenario
    if not names:
        print("gmemtest run: name at least one scenario, or --all; valid: " + ", ".join(scenario_names()),
              file=sys.stderr)
        return EXIT_USAGE
    specs = [get_scenario(n) for n in names]  # validate every name before booting anything
    image = build_default_image()
    out_root = Path(args.out) if args.out else Path("gmemtest-runs") / time.strftime("%Y%m%d-%H%M%S")
    status = EXIT_PASS
    summary = []
    for spec in specs:
        profile = get_profile(spec.profile)
        unmet = unmet_requirements(profile.requirements, accel=profile.accel, binary=args.qemu)
        if unmet:
            print(f"{spec.name}: UNMET: {'; '.join(unmet)}")
            status = status if status == EXIT_FAIL else EXIT_UNMET
            continue
        outdir = out_root / spec.name
        result = run_in_fresh_guest(spec, image, outdir, binary=args.qemu)
        print(result.verdict.summary())
        print(f"  evidence: {outdir}")
        summary.append({"scenario": spec.name, "passed": result.verdict.passed, "evidence": str(outdir),
                        "injection_to_sigbus_ms": result.observations.injection_to_sigbus_ms})
        if not result.verdict.passed:
            status = EXIT_FAIL  # a failed verdict outranks an unmet requirement elsewhere
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return status


def _cmd_qualify(args: argparse.Namespace) -> int:
    from gmemtest.qualify import qualify
    from images.build import build_default_image

    if args.no_guest:
        specs = []
    else:
        names = args.scenario or list(scenario_names())
        specs = [get_scenario(n) for n in names]
    image = build_default_image() if specs else None
    out = Path(args.out)
    q = qualify(out, specs=specs, image=image, binary=args.qemu)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(q.counts().items()))
    print(f"{q.outcome}: {counts}; findings: {len(q.findings)}")
    for finding in q.findings:
        print(f"  finding {finding['id']} ({finding['severity']})")
    print(f"report: {out / 'qualification.html'}\njson:   {out / 'qualification.json'}")
    return {"FAILED": EXIT_FAIL, "INCOMPLETE": EXIT_UNMET}.get(q.outcome, EXIT_PASS)


def _cmd_reap(_args: argparse.Namespace) -> int:
    from qmp_helpers import reap_orphans

    killed = reap_orphans()
    print(f"killed {len(killed)} orphaned QEMU process(es){': ' + ', '.join(map(str, killed)) if killed else ''}")
    return EXIT_PASS


def _cmd_bench(args: argparse.Namespace) -> int:
    from gmemtest.benchmark import run_benchmark

    results = run_benchmark(runs=args.runs, out=Path(args.out), suite=args.suite, cold=args.cold)
    print(json.dumps(results["summary"], indent=2))
    print(f"full results: {args.out}")
    return EXIT_PASS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmemtest", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug (QMP wire traces)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("preflight", help="what this host and its QEMU can do, probed")
    p.add_argument("--json", action="store_true")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary to ask")
    p.set_defaults(func=_cmd_preflight)

    p = sub.add_parser("image", help="build (or reuse) the default guest image")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache root (default: $GMEMTEST_CACHE or ~/.cache/gmemtest)")
    p.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_image)

    p = sub.add_parser("scenarios", help="list the guest scenarios")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_scenarios)

    p = sub.add_parser("run", help="boot a guest per scenario, inject, judge, keep the evidence")
    p.add_argument("scenario", nargs="*", help="scenario names (see 'gmemtest scenarios')")
    p.add_argument("--all", action="store_true", help="every scenario")
    p.add_argument("--out", help="evidence directory (default: ./gmemtest-runs/<timestamp>)")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("qualify", help="qualify this host stack: host checks, seed regression, guest scenarios")
    p.add_argument("scenario", nargs="*", help="guest scenarios to include (default: all)")
    p.add_argument("--no-guest", action="store_true", help="host-side checks only")
    p.add_argument("--out", default="gmemtest-qualification", help="report directory")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    p.set_defaults(func=_cmd_qualify)

    p = sub.add_parser("reap", help="kill QEMU processes left by a killed gmemtest run")
    p.set_defaults(func=_cmd_reap)

    p = sub.add_parser("bench", help="measure image build, boot to SSH, injection to SIGBUS, suite time")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default="bench-results/benchmark.json")
    p.add_argument("--suite", action="store_true", help="also time the default Avocado suite once")
    p.add_argument("--cold", action="store_true", help="also time a cold image build in a scratch cache")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ValueError as exc:
        print(f"gmemtest {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
