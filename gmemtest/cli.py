"""The `gmemtest` command: preflight, image, scenarios, run, reap, bench.

`gmemtest run` is the by-hand path for an engineer reproducing a bug: the same scenario code the
Avocado tests use, with the evidence left in a directory the engineer names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gmemtest.host_checks import MEMORY_KINDS
from gmemtest.lab.kvm import KVM_CHOICES, STOCK, SW_PROTECTED
from gmemtest.scenarios import SCENARIOS, get_scenario, scenario_names
from outcome import Verdict
from qmp_helpers import DEFAULT_QEMU

if TYPE_CHECKING:
    from gmemtest.guest_run import GuestRun
    from gmemtest.scenarios import ScenarioSpec
    from gmemtest.under_test import UnderTest
    from guests.profiles import GuestProfile
    from images.build import GuestImage
    from images.labhost import KernelSource, LabhostImage

LOG = logging.getLogger("gmemtest")

EXIT_PASS, EXIT_FAIL, EXIT_UNMET, EXIT_USAGE = 0, 1, 3, 2


def _cmd_preflight(args: argparse.Namespace) -> int:
    from gmemtest.preflight import preflight_report, render_table

    report = preflight_report(args.qemu)
    if not args.no_plan:
        from gmemtest.plan import AVOCADO_TESTS, PlanError, plan_main_job

        if AVOCADO_TESTS.is_dir():  # the checkout's tests (an installed package has none)
            try:
                report["main_job"] = [p.to_json() for p in plan_main_job(qemu=args.qemu)]
            except PlanError as exc:
                report["main_job_error"] = str(exc)
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


def _under_test(args: argparse.Namespace, command: str) -> UnderTest | None:
    """The lab's choices from the options, or None after printing every bad one (exit 2)."""
    from gmemtest.under_test import UnderTest

    chosen = UnderTest.from_params(lambda name: getattr(args, name, None))
    problems = chosen.problems()
    for problem in problems:
        print(f"gmemtest {command}: {problem}", file=sys.stderr)
    return None if problems else chosen


def _guest_image(chosen: UnderTest, command: str) -> GuestImage | None:
    from images.build import BuildError

    try:
        return chosen.guest_image()
    except BuildError as exc:
        from images.qemu_build import HOST_CACHE_ENV

        chose = chosen.guest_manifest is not None or chosen.guest_kernel_version is not None
        if not chose and not os.environ.get(HOST_CACHE_ENV):
            raise
        print(f"gmemtest {command}: guest image: {exc}", file=sys.stderr)
        return None


def _scenario_errors() -> tuple[type[BaseException], ...]:
    """What stops one scenario without saying anything about the others (they still run)."""
    from gmemtest.host_poison import HostPoisonError
    from gmemtest.runner import ScenarioError
    from guests.probe_client import ProbeError
    from guests.ssh import SshError
    from host_stack.injectors import InjectionRefused
    from qmp_helpers import QemuError

    return (ScenarioError, HostPoisonError, InjectionRefused, ProbeError, SshError, QemuError, OSError)


def _row(verdict: Verdict) -> dict[str, Any]:
    """A verdict as summary.json holds it: the same document as its verdict.json."""
    row: dict[str, Any] = json.loads(verdict.to_json())
    return row


def _cmd_run(args: argparse.Namespace) -> int:
    from gmemtest.requirements import scenario_unmet
    from gmemtest.runner import run_in_fresh_guest

    scenario_errors = _scenario_errors()

    names = scenario_names() if args.all else args.scenario
    if not names:
        print("gmemtest run: name at least one scenario, or --all; valid: " + ", ".join(scenario_names()),
              file=sys.stderr)
        return EXIT_USAGE
    specs = [get_scenario(n) for n in names]  # validate every name before booting anything
    chosen = _under_test(args, "run")
    if chosen is None:
        return EXIT_USAGE
    image = _guest_image(chosen, "run")
    if image is None:
        return EXIT_USAGE
    if args.keep and len(specs) != 1:
        print("gmemtest run --keep: name exactly one scenario (one guest is kept)", file=sys.stderr)
        return EXIT_USAGE
    out_root = Path(args.out) if args.out else Path("gmemtest-runs") / time.strftime("%Y%m%d-%H%M%S")
    out_root.mkdir(parents=True, exist_ok=True)
    _step_log(out_root / "steps.log")
    status = EXIT_PASS
    summary: list[dict[str, Any]] = []
    for spec in specs:
        profile = chosen.profile_for(spec)
        unmet = scenario_unmet(spec, profile, binary=chosen.qemu)
        if unmet:
            print(f"{spec.name}/{profile.name}: UNMET: {'; '.join(unmet)}")
            summary.append({"scenario": spec.name, "profile": profile.name,
                            "verdict": _row(Verdict.did_not_run(spec.name, "CANNOT RUN", "; ".join(unmet)))})
            status = status if status == EXIT_FAIL else EXIT_UNMET
            continue
        outdir = out_root / spec.name
        if args.keep:
            return _run_kept(spec, image, outdir, chosen, profile)
        try:
            result = run_in_fresh_guest(spec, image, outdir, under=chosen)
        except scenario_errors as exc:  # one scenario's error must not hide the others' verdicts
            logging.getLogger("gmemtest.cli").exception("%s/%s: error", spec.name, profile.name)
            print(f"{spec.name}/{profile.name}: ERROR: {type(exc).__name__}: {exc}")
            broke = Verdict.did_not_run(spec.name, "ERROR", f"{type(exc).__name__}: {exc}")
            summary.append({"scenario": spec.name, "profile": profile.name, "evidence": str(outdir),
                            "verdict": _row(broke)})
            status = EXIT_FAIL
            continue
        print(result.verdict.summary())
        print(f"  evidence: {outdir}")
        summary.append({"scenario": spec.name, "profile": profile.name, "evidence": str(outdir),
                        "injection_to_sigbus_ms": result.observations.injection_to_sigbus_ms,
                        "verdict": _row(result.verdict)})
        if not result.verdict.passed:
            status = EXIT_FAIL  # a failed verdict outranks an unmet requirement elsewhere
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return status


def _step_log(path: Path) -> None:
    """Every step of the run, with timestamps, into `path` (and onto a terminal as progress).

    The file gets INFO from every layer whatever -v says, so a run that went wrong can be read
    afterwards; a terminal without -v gets the same steps, short, so a 10 s boot is not silence.
    """
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
        for h in root.handlers:
            if h is not handler:
                h.setLevel(logging.WARNING)  # -v decides what the terminal's own handler shows
        if sys.stderr.isatty():
            progress = logging.StreamHandler(sys.stderr)
            progress.setLevel(logging.INFO)
            progress.addFilter(lambda r: r.name.startswith(("gmemtest", "images")))
            progress.setFormatter(logging.Formatter("  .. %(message)s"))
            root.addHandler(progress)


def _run_kept(spec: ScenarioSpec, image: GuestImage, outdir: Path, chosen: UnderTest,
              profile: GuestProfile) -> int:
    """Run `spec`, then hold its guest up and say how to reach it until Ctrl-C (or SIGTERM)."""
    import os
    import signal
    import tempfile

    from gmemtest.kept import KeptGuest, remove_record, user_qmp_args, write_record
    from gmemtest.runner import ScenarioResult, run_in_fresh_guest

    # A short directory: AF_UNIX paths hold 107 bytes, evidence directories can be longer.
    sock_dir = Path(tempfile.mkdtemp(prefix="gmemtest-kept-"))
    user_qmp = sock_dir / "qmp.sock"

    def hold(guest: GuestRun, result: ScenarioResult) -> None:
        print(result.verdict.summary(), flush=True)
        kept = KeptGuest(pid=os.getpid(), scenario=spec.name, profile=profile.name, ssh_port=guest.machine.ssh_port,
                         ssh_key=str(guest.image.ssh_key), qmp_socket=str(user_qmp),
                         console_log=str(guest.machine.console_log), evidence=str(outdir))
        write_record(kept)
        (outdir / "kept.json").write_text(json.dumps(kept.__dict__, indent=2) + "\n")
        print(kept.how_to_reach(), flush=True)
        try:
            while True:
                time.sleep(3600)
        finally:
            remove_record(kept.pid)

    def stop(_signo: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a process started in the background by a non-interactive shell (a CI job, a
    # pipeline step) inherits SIGINT ignored, and Python then leaves it ignored; Ctrl-C or a
    # pipeline's interrupt must still end the kept guest.
    previous = signal.signal(signal.SIGTERM, stop)
    previous_int = signal.signal(signal.SIGINT, stop)
    result: ScenarioResult | None = None

    def keep_result(guest: GuestRun, res: ScenarioResult) -> None:
        nonlocal result
        result = res
        hold(guest, res)

    try:
        # No snapshot: the kept guest's own QMP socket is a per-run path in its argv.
        run_in_fresh_guest(spec, image, outdir, under=dataclasses.replace(chosen, snapshot_value="off"),
                           extra_qemu_args=user_qmp_args(user_qmp), after_verdict=keep_result)
    except KeyboardInterrupt:
        print("\nstopped: the kept guest's QEMU is gone", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        user_qmp.unlink(missing_ok=True)
        sock_dir.rmdir()
    if result is None:
        return EXIT_FAIL
    return EXIT_PASS if result.verdict.passed else EXIT_FAIL


def _cmd_ssh(args: argparse.Namespace) -> int:
    import subprocess

    from gmemtest.kept import find_kept

    try:
        kept = find_kept(args.pid)
    except LookupError as exc:
        print(f"gmemtest ssh: {exc}", file=sys.stderr)
        return EXIT_USAGE
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    sys.stdout.flush()
    # The engineer's terminal is inherited: an interactive shell, or COMMAND's output and status.
    return subprocess.run(kept.ssh_argv(command), check=False).returncode


def _cmd_qmp(args: argparse.Namespace) -> int:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    from gmemtest.kept import find_kept

    try:
        arguments = qmp_arguments(args.arguments)
        kept = find_kept(args.pid)
    except (LookupError, ValueError) as exc:
        print(f"gmemtest qmp: {exc}", file=sys.stderr)
        return EXIT_USAGE
    monitor = QEMUMonitorProtocol(kept.qmp_socket)
    try:
        monitor.connect()
        monitor.settimeout(10.0)
        reply = monitor.cmd_raw(args.qmp_command, arguments)
    except OSError as exc:
        print(f"gmemtest qmp: {kept.qmp_socket}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        monitor.close()
    print(json.dumps(reply, indent=2))
    return EXIT_PASS if "return" in reply else EXIT_FAIL


def _cmd_qualify_labhost(args: argparse.Namespace) -> int:
    from gmemtest.lab.host import LabhostError
    from gmemtest.lab.qualify import lab_chain_variants, qualify_in_labhost

    if args.scenario:
        print("gmemtest qualify --labhost: the lab host runs the chain rows (host poison) itself; "
              f"drop {' '.join(args.scenario)}", file=sys.stderr)
        return EXIT_USAGE
    chosen = _under_test(args, "qualify")
    if chosen is None:
        return EXIT_USAGE
    guest = _guest_image(chosen, "qualify")
    if guest is None:
        return EXIT_USAGE
    try:
        image = _labhost_image(args)
        variants = lab_chain_variants()
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"gmemtest qualify --labhost: image: {exc}", file=sys.stderr)
        return EXIT_LABHOST_ERROR
    out = Path(args.out)
    try:
        result = qualify_in_labhost(image, out, on_output=None if args.quiet else _stream,
                                    guest_manifest=Path(guest.manifest), variants=variants,
                                    private_kvm=args.kvm)
    except LabhostError as exc:
        print(f"gmemtest qualify --labhost: {exc}", file=sys.stderr)
        return EXIT_LABHOST_ERROR
    q = result.qualification
    counts = ", ".join(f"{n} {s}" for s, n in sorted(q.get("counts", {}).items()))
    print(f"lab host kernel {result.kernel_release}: {q.get('outcome')}: {counts}; "
          f"findings: {len(q.get('findings', []))}")
    for finding in q.get("findings", []):
        print(f"  finding {finding['id']} ({finding['severity']})")
    print(f"report: {out / 'qualification.html'}\njson:   {out / 'qualification.json'}\n"
          f"L1:     {out / 'labhost'} (console, output, dmesg)")
    return {"FAILED": EXIT_FAIL, "INCOMPLETE": EXIT_UNMET, "PASSED": EXIT_PASS}.get(
        str(q.get("outcome")), EXIT_FAIL)


def _stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _cmd_qualify(args: argparse.Namespace) -> int:
    from gmemtest.qualify import qualify

    if args.labhost:
        return _cmd_qualify_labhost(args)
    if args.no_guest:
        specs = []
    else:
        names = args.scenario or list(scenario_names())
        specs = [get_scenario(n) for n in names]
    chosen = _under_test(args, "qualify")
    if chosen is None:
        return EXIT_USAGE
    image = _guest_image(chosen, "qualify") if specs else None
    if specs and image is None:
        return EXIT_USAGE
    old: dict[str, Any] | None = None
    if args.compare:
        try:
            old = json.loads(Path(args.compare).read_text())
            if not isinstance(old, dict) or "items" not in old or "outcome" not in old:
                raise ValueError("no 'items' or 'outcome'")
        except (OSError, ValueError) as exc:
            print(f"gmemtest qualify: --compare {args.compare}: not a readable qualification.json: {exc}",
                  file=sys.stderr)
            return EXIT_USAGE
    out = Path(args.out)
    q = qualify(out, specs=specs, image=image, binary=chosen.qemu, under=chosen, compare_with=old, memory=args.memory)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(q.counts().items()))
    print(f"{q.outcome}: {counts}; findings: {len(q.findings)}")
    for finding in q.findings:
        print(f"  finding {finding['id']} ({finding['severity']})")
    if q.comparison is not None:
        from gmemtest.compare import compare

        assert old is not None
        print("\n".join(compare(old, q.to_json()).lines()))
    print(f"report: {out / 'qualification.html'}\njson:   {out / 'qualification.json'}")
    return {"FAILED": EXIT_FAIL, "INCOMPLETE": EXIT_UNMET}.get(q.outcome, EXIT_PASS)


# Like timeout(1) and env(1): the command's own status passes through unchanged, so
# these two mean "the command did not finish" and "the lab host itself failed".
EXIT_LABHOST_TIMEOUT, EXIT_LABHOST_ERROR = 124, 125


def _kernel_source(args: argparse.Namespace) -> KernelSource:
    from images.labhost import DebianKernel, KernelDebs, KernelTree

    if args.kernel_debs and args.kernel_tree:
        raise ValueError("give --kernel-debs or --kernel-tree, not both")
    if args.kernel_debs:
        return KernelDebs(tuple(Path(p) for p in args.kernel_debs))
    if args.kernel_tree:
        vmlinuz, modules, config = (Path(p) for p in args.kernel_tree)
        return KernelTree(vmlinuz, modules, config)
    return DebianKernel(args.kernel_suite, args.kernel_version)


def _labhost_image(args: argparse.Namespace) -> LabhostImage:
    from images.labhost import build_labhost_image

    return build_labhost_image(args.cache, _kernel_source(args), force=args.force)


def _cmd_labhost_image(args: argparse.Namespace) -> int:
    from images.build import BuildError
    from images.debs import PackageError
    from images.kconfig import KernelConfigError
    from images.kvm_modules import build_kvm_modules

    t0 = time.monotonic()
    try:
        image = _labhost_image(args)
        kvm = (build_kvm_modules(image.kernel_release, progress=_progress)
               if args.kvm == SW_PROTECTED else None)
    except (BuildError, PackageError, KernelConfigError) as exc:
        print(f"gmemtest labhost image: {exc}", file=sys.stderr)
        return EXIT_LABHOST_ERROR
    if args.json:
        doc = image.as_json()
        if kvm is not None:
            doc["kvm_modules"] = {"option": kvm.option, "package_version": kvm.package_version,
                                  "modules": [str(p) for p in kvm.modules], "manifest": str(kvm.manifest),
                                  "cache_hit": kvm.cache_hit}
        print(json.dumps(doc, indent=2))
    else:
        state = "cache hit" if image.cache_hit else "built"
        print(f"{state} in {time.monotonic() - t0:.2f}s: kernel {image.kernel_release} "
              f"({image.kernel_source})\n  kernel   {image.kernel}\n  initrd   {image.initrd}\n"
              f"  manifest {image.manifest}\n  modules  {' '.join(image.modules)}")
        if kvm is not None:
            print(f"  KVM      rebuilt with CONFIG_{kvm.option}=y from {kvm.package_version}: "
                  f"{' '.join(str(p) for p in kvm.modules)}")
    return EXIT_PASS


def _cmd_labhost_run(args: argparse.Namespace) -> int:
    from gmemtest.lab.host import LabhostError, LabhostTimeout, run_in_labhost
    from gmemtest.lab.kvm import kvm_command
    from images.build import BuildError
    from images.debs import PackageError
    from images.kconfig import KernelConfigError

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("gmemtest labhost run: name the command after '--', e.g. "
              "gmemtest labhost run -- ls /dev/kvm", file=sys.stderr)
        return EXIT_USAGE
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"gmemtest labhost run: --env {item!r} must be NAME=VALUE", file=sys.stderr)
            return EXIT_USAGE
        env[name] = value
    out = Path(args.results) if args.results else (
        Path("gmemtest-labhost-runs") / time.strftime("%Y%m%d-%H%M%S"))
    t0 = time.monotonic()
    try:
        image = _labhost_image(args)
    except (BuildError, PackageError, KernelConfigError) as exc:
        print(f"gmemtest labhost run: image: {exc}", file=sys.stderr)
        return EXIT_LABHOST_ERROR
    t_image = time.monotonic() - t0
    try:
        argv = kvm_command(args.kvm, argv, image.kernel_release, progress=_progress)
    except BuildError as exc:
        print(f"gmemtest labhost run: --kvm {args.kvm}: {exc}", file=sys.stderr)
        return EXIT_LABHOST_ERROR

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    summary: dict[str, Any] = {"argv": argv, "image_s": round(t_image, 3),
                               "kernel_release": image.kernel_release, "kvm": args.kvm}
    status = EXIT_LABHOST_ERROR
    try:
        result, timings = run_in_labhost(
            image, argv, out / "labhost", share_dir=out / "results", timeout=args.timeout,
            on_output=stream, env=env, boot_timeout_s=args.boot_timeout, binary=args.qemu)
    except LabhostTimeout as exc:
        print(f"gmemtest labhost run: timeout: {exc}", file=sys.stderr)
        status = EXIT_LABHOST_TIMEOUT
        summary["error"] = str(exc)
    except LabhostError as exc:
        print(f"gmemtest labhost run: {exc}", file=sys.stderr)
        summary["error"] = str(exc)
    else:
        status = result.returncode
        summary |= {"returncode": result.returncode, "timings": timings.as_json()}
    summary["wall_s"] = round(time.monotonic() - t0, 3)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    timing = summary.get("timings", {})
    print(f"gmemtest labhost: exit {status}; image {t_image:.2f}s, L1 ready "
          f"{timing.get('ready_s', float('nan')):.2f}s, total {summary['wall_s']:.2f}s; "
          f"results {out}", file=sys.stderr)
    return status


def _cmd_labhost_test(args: argparse.Namespace) -> int:
    from gmemtest.lab.batch import DEFAULT_PATHS, run_batch
    from images.build import BuildError
    from images.debs import PackageError
    from images.kconfig import KernelConfigError

    out = Path(args.results) if args.results else (
        Path("gmemtest-labhost-runs") / time.strftime("test-%Y%m%d-%H%M%S"))
    try:
        image = _labhost_image(args)
    except (BuildError, PackageError, KernelConfigError) as exc:
        print(f"gmemtest labhost test: image: {exc}", file=sys.stderr)
        return EXIT_LABHOST_ERROR
    try:
        result = run_batch(image, out.absolute(), tuple(args.paths or DEFAULT_PATHS), timeout=args.timeout,
                           on_output=None if args.quiet or args.json else _stream, kvm=args.kvm)
    except BuildError as exc:
        print(f"gmemtest labhost test: --kvm {args.kvm}: {exc}", file=sys.stderr)
        return EXIT_LABHOST_ERROR
    out.mkdir(parents=True, exist_ok=True)
    doc = json.dumps(result.to_json(), indent=2)
    (out / "batch.json").write_text(doc + "\n")
    if args.json:
        print(doc)
    else:
        for line in result.problems():
            print(line, file=sys.stderr)
        print(result.summary_line())
    if result.error is not None:
        return EXIT_LABHOST_ERROR
    return EXIT_PASS if result.ok else EXIT_FAIL


def _add_kvm_option(p: argparse.ArgumentParser, help_text: str, default: str = STOCK) -> None:
    p.add_argument("--kvm", choices=KVM_CHOICES, default=default, help=help_text)


def _progress(line: str) -> None:
    """A build step's progress line, on stderr (stdout holds the command's own output)."""
    print(line, file=sys.stderr)


def _add_kernel_options(p: argparse.ArgumentParser) -> None:
    from images.labhost import DEFAULT_SUITE

    p.add_argument("--kernel-suite", default=DEFAULT_SUITE,
                   help=f"Debian suite of the L1 kernel (default: {DEFAULT_SUITE})")
    p.add_argument("--kernel-version", default=None,
                   help="kernel ABI version like 7.3.4+deb13 (default: the newest 7.x)")
    p.add_argument("--kernel-debs", nargs="+", metavar="DEB", help="use these kernel .debs instead")
    p.add_argument("--kernel-tree", nargs=3, metavar=("VMLINUZ", "MODULES_DIR", "CONFIG"),
                   help="use a kernel you built: bzImage, lib/modules/<release>, .config")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache root (default: $GMEMTEST_CACHE or ~/.cache/gmemtest)")
    p.add_argument("--force", action="store_true", help="rebuild the image even on a cache hit")


def _add_under_test_options(p: argparse.ArgumentParser) -> None:
    """The options of gmemtest.under_test.PARAMETERS (the Avocado -p names), same meaning."""
    from gmemtest.under_test import PARAMETERS

    for name, meaning in PARAMETERS.items():
        if name.startswith("labhost_"):
            continue  # the lab host's kernel has its --kernel-* options
        if name == "snapshot":
            p.add_argument("--no-snapshot", dest="snapshot", action="store_const", const="off", default=None,
                           help="boot every guest; never restore one from a saved boot")
            continue
        metavar = {"qemu": "BINARY", "profile": "NAME", "guest_kernel_version": "VERSION"}.get(name, "PATH")
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar=metavar, help=meaning,
                       default=DEFAULT_QEMU if name == "qemu" else None)


def _cmd_snapshots(args: argparse.Namespace) -> int:
    from gmemtest.snapshots import SnapshotCache

    cache = SnapshotCache(args.cache)
    if args.action == "clear":
        print(f"dropped {cache.clear()} snapshot(s) from {cache.root}")
        return EXIT_PASS
    entries = cache.entries()
    if args.json:
        print(json.dumps([e.record() for e in entries], indent=2))
        return EXIT_PASS
    print(f"{len(entries)} snapshot(s) in {cache.root} (most recently used first)")
    for e in entries:
        print(f"  {e.key[:24]}  {e.size_bytes / 1e6:6.1f} MB  {e.age_s:8.0f} s old  saved in {e.save_s} s")
    return EXIT_PASS


def _cmd_reap(_args: argparse.Namespace) -> int:
    from qmp_helpers import reap_orphans

    killed = reap_orphans()
    print(f"killed {len(killed)} orphaned QEMU process(es){': ' + ', '.join(map(str, killed)) if killed else ''}")
    return EXIT_PASS


def _cmd_bench(args: argparse.Namespace) -> int:
    from gmemtest.benchmark import run_benchmark

    results = run_benchmark(runs=args.runs, out=Path(args.out), suite=args.suite, cold=args.cold,
                            labhost=args.labhost, guest=not args.no_guest, nested=args.nested,
                            nested_scenario=args.nested_scenario, conversions=args.conversions)
    print(json.dumps(results["summary"], indent=2))
    print(f"full results: {args.out}")
    return EXIT_PASS


def _add_preflight(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("preflight", help="what this host and its QEMU can do, probed")
    p.add_argument("--json", action="store_true")
    p.add_argument("--qemu", default=DEFAULT_QEMU, help="QEMU binary to ask")
    p.add_argument("--no-plan", action="store_true",
                   help="leave out the main job's plan (which Avocado test CANCELs here, and the host fact why)")
    p.set_defaults(func=_cmd_preflight)


def _add_image(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("image", help="build (or reuse) the default guest image")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache root (default: $GMEMTEST_CACHE or ~/.cache/gmemtest)")
    p.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_image)


def _add_scenarios(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("scenarios", help="list the guest scenarios")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_scenarios)


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="boot a guest per scenario, inject, judge, keep the evidence")
    p.add_argument("scenario", nargs="*", help="scenario names (see 'gmemtest scenarios')")
    p.add_argument("--all", action="store_true", help="every scenario")
    p.add_argument("--out", help="evidence directory (default: ./gmemtest-runs/<timestamp>)")
    _add_under_test_options(p)
    p.add_argument("--keep", action="store_true",
                   help="keep the guest up after the verdict and print how to reach it, until Ctrl-C")
    p.set_defaults(func=_cmd_run)


def _add_ssh(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ssh", help="log into the guest a 'gmemtest run --keep' holds (OpenSSH)")
    p.add_argument("--pid", type=int, help="the keeping gmemtest's pid (default: the newest kept guest)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="[--] COMMAND to run instead of a shell")
    p.set_defaults(func=_cmd_ssh)


def _add_qmp(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("qmp", help="send one QMP command to the guest a 'gmemtest run --keep' holds")
    p.add_argument("--pid", type=int, help="the keeping gmemtest's pid (default: the newest kept guest)")
    p.add_argument("qmp_command", help="e.g. query-status, human-monitor-command")
    p.add_argument("arguments", nargs="*",
                   help='its arguments: one JSON object, e.g. \'{"command-line": "info mtree"}\', or NAME=VALUE '
                        'words, e.g. gpa=0x70000 size=4096 private=true (integers in any base, true/false)')
    p.set_defaults(func=_cmd_qmp)


def qmp_arguments(words: list[str]) -> dict[str, Any]:
    """Pure: ``gmemtest qmp``'s arguments, one JSON object or NAME=VALUE words; ValueError naming a bad one."""
    if len(words) == 1 and words[0].lstrip().startswith("{"):
        try:
            arguments: dict[str, Any] = json.loads(words[0])
        except ValueError as exc:
            raise ValueError(f"arguments {words[0]!r} are not JSON: {exc}") from exc
        return arguments
    parsed: dict[str, Any] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise ValueError(f"argument {word!r} is neither a JSON object nor NAME=VALUE "
                             "(e.g. gpa=0x70000 size=4096 private=true)")
        if value in ("true", "false"):
            parsed[name] = value == "true"
        else:
            try:
                parsed[name] = int(value, 0)
            except ValueError:
                parsed[name] = value
    return parsed


def _add_qualify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("qualify", help="qualify this host stack: host checks, seed regression, guest scenarios")
    p.add_argument("scenario", nargs="*", help="guest scenarios to include (default: all)")
    p.add_argument("--no-guest", action="store_true", help="host-side checks only")
    p.add_argument("--out", default="gmemtest-qualification", help="report directory")
    _add_under_test_options(p)
    p.add_argument("--labhost", action="store_true",
                   help="qualify the kernel inside the lab host (an L1 KVM host under TCG) instead of this host")
    p.add_argument("--quiet", action="store_true", help="with --labhost: do not stream L1's output")
    p.add_argument("--memory", choices=MEMORY_KINDS, default="all",
                   help="which host checks: of shared guest_memfd memory, of private memory, or all (default)")
    _add_kvm_option(p, "with --labhost: L1's KVM for the private-memory section (the shared-memory checks always "
                    "run under Debian's stock modules first); under stock the private checks cannot run",
                    default=SW_PROTECTED)
    p.add_argument("--compare", metavar="OLD.json",
                   help="an older qualification.json: report new FAILs, fixes, findings and timings that changed")
    _add_kernel_options(p)
    p.set_defaults(func=_cmd_qualify)


def _add_labhost(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("labhost", help="the lab host in a box: an L1 KVM host (kvm_amd, memory "
                       "failure, hwpoison_inject) under TCG")
    lab = p.add_subparsers(dest="labhost_command", required=True)
    q = lab.add_parser("image", help="build (or reuse) the lab-host image")
    _add_kernel_options(q)
    _add_kvm_option(q, "with sw-protected, also build (or reuse) the KVM modules rebuilt for its kernel")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_cmd_labhost_image)
    q = lab.add_parser("run", help="boot L1, run COMMAND in a chroot of this machine's root, "
                       "stream its output, return its exit status",
                       usage="gmemtest labhost run [options] -- COMMAND [ARG...]")
    _add_kernel_options(q)
    q.add_argument("--timeout", type=float, default=600.0, help="seconds COMMAND may run (default 600)")
    q.add_argument("--boot-timeout", type=float, default=90.0,
                   help="seconds from launch to L1 ready (default 90)")
    q.add_argument("--results", help="directory for results/ (L1's $GMEMTEST_RESULTS), labhost/ "
                   "(console, output, dmesg) and summary.json (default: ./gmemtest-labhost-runs/<timestamp>)")
    q.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="add to the command's otherwise clean environment (repeatable)")
    q.add_argument("--qemu", default=DEFAULT_QEMU, help="QEMU binary")
    _add_kvm_option(q, "L1's KVM: Debian's stock modules, or the pair rebuilt with CONFIG_KVM_SW_PROTECTED_VM "
                       "(built for L1's kernel on first use, then cached), swapped in before COMMAND")
    q.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    q.set_defaults(func=_cmd_labhost_run)
    q = lab.add_parser("test", help="run the project's host-side pytest files inside L1 (real guest_memfd "
                       "and memory failure); fails on a failure or on a skip for what L1 guarantees")
    _add_kernel_options(q)
    q.add_argument("paths", nargs="*", default=None,
                   help="pytest paths and options, options after -- (default: tests/host_stack)")
    q.add_argument("--timeout", type=float, default=900.0, help="seconds pytest may run in L1 (default 900)")
    q.add_argument("--results", help="evidence directory (default: ./gmemtest-labhost-runs/test-<timestamp>)")
    q.add_argument("--quiet", action="store_true", help="do not stream L1's output")
    q.add_argument("--json", action="store_true", help="print the judged result as JSON")
    _add_kvm_option(q, "L1's KVM (see 'labhost run'); under sw-protected a skip for a software-protected VM "
                       "fails the batch too")
    q.set_defaults(func=_cmd_labhost_test)


def _add_snapshots(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("snapshots", help="list or clear the saved guest boots that tests restore from")
    p.add_argument("action", nargs="?", choices=("list", "clear"), default="list")
    p.add_argument("--cache", type=Path, default=None, help="cache root (default: $GMEMTEST_CACHE, ~/.cache/gmemtest)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_snapshots)


def _add_reap(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("reap", help="kill QEMU processes left by a killed gmemtest run")
    p.set_defaults(func=_cmd_reap)


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="measure image build, boot to SSH, injection to SIGBUS, suite time")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default="bench-results/benchmark.json")
    p.add_argument("--suite", action="store_true", help="also time the guest Avocado tests, snapshots on and off")
    p.add_argument("--cold", action="store_true", help="also time a cold image build in a scratch cache (with "
                   "--labhost also a forced rebuild of the KVM modules, their packages cached)")
    p.add_argument("--labhost", action="store_true",
                   help="also time the lab host: L1 boot to /dev/kvm ready, warm image build, the rebuilt KVM "
                        "modules (cached), the labhost tests and the private-memory section of their L1 run")
    p.add_argument("--no-guest", action="store_true", help="skip the guest boots and injections")
    p.add_argument("--nested", type=int, default=0, metavar="N",
                   help="also N chain runs, each its own L1 with a kvm-default guest (how often one ends "
                        "without a verdict)")
    p.add_argument("--conversions", type=int, default=0, metavar="N",
                   help="also N QMP conversion round trips of one page in a kvm-swprot guest inside the "
                        "software-protected lab host (command to QEMU's trace line, both ways)")
    p.add_argument("--nested-scenario", default="host-ar-touch-4k", metavar="NAME",
                   help="the scenario each nested chain run judges (default: host-ar-touch-4k, the host-poison chain)")
    p.set_defaults(func=_cmd_bench)


# One adder per subcommand, in the order 'gmemtest --help' lists them.
_SUBCOMMANDS = (_add_preflight, _add_image, _add_scenarios, _add_run, _add_ssh, _add_qmp, _add_qualify, _add_labhost,
                _add_snapshots, _add_reap, _add_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmemtest", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug (QMP wire traces)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:
        # qemu.qmp logs its own ERROR for every refused connection, including the expected ones
        # (a probe start that QEMU aborts); our errors carry the cause, so its lines are noise.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except ValueError as exc:
        print(f"gmemtest {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
