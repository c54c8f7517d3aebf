"""Measure what a lab pays per run: image build, boot to SSH, injection to SIGBUS, suite time.

Numbers are written as JSON with every sample, so a regression can be traced to one run.
Nothing here asserts a bound: tests judge behaviour, this script reports speed.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gmemtest.guest_run import booted_guest
from gmemtest.runner import run_scenario
from gmemtest.scenarios import get_scenario
from gmemtest.snapshots import SnapshotCache
from images.build import build_default_image
from qmp_helpers import MceInjection

# Scenarios whose SIGBUS follows the injection directly (no touch in between).
LATENCY_SCENARIOS = ("srao-early-kill-prctl-4k", "srar-user-spin-4k")


def _stats(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    return {"n": len(samples), "median": round(statistics.median(samples), 4), "min": round(min(samples), 4),
            "max": round(max(samples), 4), "samples": [round(s, 4) for s in samples]}


def _timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.monotonic() - t0


def _image_builds(runs: int, cold: bool) -> dict[str, Any]:
    build = [sys.executable, "-m", "images", "build", "--json"]
    result: dict[str, Any] = {}
    if cold:
        with tempfile.TemporaryDirectory(prefix="gmemtest-bench-cache-") as cache:
            env = {**os.environ, "GMEMTEST_CACHE": cache}
            result["cold_s"] = _stats([_timed(build, env)])
    _timed(build)  # make sure the default cache is warm before timing warm builds
    result["warm_s"] = _stats([_timed(build) for _ in range(runs)])
    return result


def _guest_runs(runs: int, workdir: Path) -> dict[str, Any]:
    """Boot and restore side by side in one run, then the injection latency in restored guests.

    The snapshot cache is a scratch one, so the save is measured too and no earlier snapshot
    (of another checkout or image) takes part.
    """
    image = build_default_image()
    cache = SnapshotCache(workdir / "snapshot-cache")
    with booted_guest(image, workdir / "prime", cache=cache) as guest:
        prime = {"mode": guest.boot.mode, "save_s": guest.timings.save_s,
                 "snapshot_bytes": (guest.boot.snapshot or {}).get("size_bytes")}
    boot_console: list[float] = []
    boot_ssh: list[float] = []
    restore_loaded: list[float] = []
    restore_ssh: list[float] = []
    behind: list[float] = []
    skew_after: list[float] = []
    modes: list[str] = []
    for i in range(runs):
        with booted_guest(image, workdir / f"boot-{i}", snapshot=False) as guest:
            boot_console.append(guest.timings.console_ready_s or 0.0)
            boot_ssh.append(guest.timings.first_ssh_command_s)
        with booted_guest(image, workdir / f"restore-{i}", cache=cache) as guest:
            modes.append(guest.boot.mode)
            if guest.boot.mode == "restore" and guest.boot.refresh is not None:
                restore_loaded.append(guest.timings.state_loaded_s or 0.0)
                restore_ssh.append(guest.timings.first_ssh_command_s)
                behind.append(-float(guest.boot.refresh["skew_before_s"]))
                skew_after.append(float(guest.boot.refresh["skew_after_s"]))
    latency: dict[str, list[float]] = {name: [] for name in LATENCY_SCENARIOS}
    verdicts: list[dict[str, Any]] = []
    landing_stops: list[float] = []
    for i in range(runs):
        for name in LATENCY_SCENARIOS:
            spec = get_scenario(name)
            outdir = workdir / f"{name}-{i}"
            with booted_guest(image, outdir, profile=spec.profile, cache=cache) as guest:
                result = run_scenario(spec, guest, outdir)
            if isinstance(result.injection, MceInjection) and result.injection.landing is not None:
                # How many stops of the VM it took to find the vCPU where the SRAR must land.
                landing_stops.append(float(result.injection.landing_tries))
            verdicts.append({"scenario": name, "run": i, "passed": result.verdict.passed,
                             "guest": guest.boot.mode})
            if result.observations.injection_to_sigbus_ms is not None:
                latency[name].append(result.observations.injection_to_sigbus_ms)
    boot_median = _stats(boot_ssh).get("median")
    restore_median = _stats(restore_ssh).get("median")
    return {
        "snapshot_prime": prime,
        "boot": {"launch_to_console_ready_s": _stats(boot_console),
                 "launch_to_first_ssh_command_s": _stats(boot_ssh)},
        "restore": {"modes": modes,
                    "launch_to_state_loaded_s": _stats(restore_loaded),
                    "launch_to_first_ssh_command_s": _stats(restore_ssh),
                    "clock_behind_before_step_s": _stats(behind),
                    "clock_skew_after_step_s": _stats(skew_after)},
        "restore_to_boot_ratio": (round(restore_median / boot_median, 3)
                                  if boot_median and restore_median else None),
        "injection_to_sigbus_ms": {name: _stats(v) for name, v in latency.items()},
        "srar_landing_stops": _stats(landing_stops),
        "verdicts": verdicts,
    }


def _suite(results_dir: Path) -> dict[str, Any]:
    """The guest tests (``-t guest``), with snapshots on (warm: primed by the runs before) and off."""
    avocado = str(Path(sys.executable).with_name("avocado"))
    result: dict[str, Any] = {}
    for label, extra in (("snapshots_on", []), ("snapshots_off", ["-p", "snapshot=off"])):
        argv = [avocado, "run", "--max-parallel-tasks=2", "--job-results-dir", str(results_dir / label),
                "-t", "guest", *extra, "avocado_tests/"]
        t0 = time.monotonic()
        proc = subprocess.run(argv, check=False, capture_output=True, text=True)
        result[label] = {"wall_s": round(time.monotonic() - t0, 2), "exit_status": proc.returncode,
                         "tail": proc.stdout.strip().splitlines()[-6:]}
    return result


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _cached_and_rebuilt(build: Callable[[bool], object], runs: int, cold: bool) -> dict[str, Any]:
    """A cached build's look-ups (``runs`` of them, after one that builds or fetches it), and with
    ``cold`` one forced rebuild; ``build(force)`` is the recipe."""

    def timed(force: bool) -> float:
        t0 = time.monotonic()
        build(force)
        return time.monotonic() - t0

    timed(False)
    return {"cached_s": _stats([timed(False) for _ in range(runs)]),
            **({"forced_rebuild_s": round(timed(True), 2)} if cold else {})}


def _kvm_modules(kernel_release: str, runs: int, cold: bool) -> dict[str, Any]:
    """The rebuilt KVM pair: cached look-ups, and with ``cold`` one forced rebuild (packages cached)."""
    from images.kvm_modules import build_kvm_modules

    return _cached_and_rebuilt(lambda force: build_kvm_modules(kernel_release, force=force), runs, cold)


def _project_qemu(runs: int, cold: bool) -> dict[str, Any]:
    """The project's QEMU (images.qemu_build): cached look-ups, and with ``cold`` one forced rebuild
    (its source cached), with the per-patch build times the manifest records."""
    from images.qemu_build import build_qemu

    doc = _cached_and_rebuilt(lambda force: build_qemu(force=force), runs, cold)
    if cold:
        built = build_qemu()
        doc["patches"] = json.loads(built.manifest.read_text())["patches"]
        doc["binary_bytes"] = built.binary.stat().st_size
    return doc


def _shared_run_figures(job: Path) -> dict[str, Any]:
    """From the job's shared L1 run's own records: the private-memory section (module swap,
    preflight, qualify start-up) and each private check, and each chain variant's run."""
    from gmemtest.host_checks import host_checks_of

    found = sorted(job.glob("latest/labhost/labhost-*/labhost-qualification.json"))
    if not found:
        return {"error": f"no labhost-qualification.json under {job}"}
    timings = json.loads(found[-1].read_text())["timings"]
    items = json.loads((found[-1].parent / "qualification.json").read_text())["items"]
    private = {check.name for check in host_checks_of("private")}
    checks = {i["name"]: i.get("duration_s") for i in items if i["name"] in private}
    return {"section_s": timings.get("private_s"), "checks_s": checks,
            "checks_total_s": round(sum(v or 0 for v in checks.values()), 2), "chain_s": timings.get("chain_s", {})}


def _labhost(runs: int, workdir: Path, cold: bool = False) -> dict[str, Any]:
    """L1 boot to /dev/kvm usable (READY), warm lab-host image builds, the rebuilt KVM modules, the
    labhost Avocado tests and the private-memory section of their shared L1 run."""
    from gmemtest.lab.host import booted_labhost
    from images.labhost import build_labhost_image

    build = [sys.executable, "-m", "gmemtest.cli", "labhost", "image", "--json"]
    _timed(build)
    warm = [_timed(build) for _ in range(runs)]
    image = build_labhost_image()
    modules = _kvm_modules(image.kernel_release, runs, cold)
    qemu = _project_qemu(runs, cold)
    ready: list[float] = []
    uptime: list[float] = []
    first_command: list[float] = []
    for i in range(runs):
        with booted_labhost(image, workdir / f"l1-{i}", share_dir=workdir / f"l1-{i}" / "results") as run:
            ready.append(run.timings.ready_s)
            if run.timings.guest_uptime_at_ready_s is not None:
                uptime.append(run.timings.guest_uptime_at_ready_s)
            first_command.append(run.run(["true"], 60).seconds)
    from gmemtest.lab.snapshot import labhost_snapshot_trial

    snapshot = labhost_snapshot_trial(image, workdir / "snapshot", restores=runs)
    avocado = str(Path(sys.executable).with_name("avocado"))
    argv = [avocado, "run", "--max-parallel-tasks=2", "--job-results-dir", str(workdir / "avocado"),
            "-t", "labhost", "avocado_tests/"]
    t0 = time.monotonic()
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    return {
        "image_build_warm_s": _stats(warm),
        "launch_to_ready_s": _stats(ready),
        "guest_uptime_at_ready_s": _stats(uptime),
        "first_command_s": _stats(first_command),
        "snapshot_trial": snapshot,
        "restore_to_ready_s": _stats([r["ready_s"] for r in snapshot["restores"]]),
        "labhost_tests": {"wall_s": round(time.monotonic() - t0, 2), "exit_status": proc.returncode,
                          "tail": proc.stdout.strip().splitlines()[-4:]},
        "kvm_modules": modules,
        "project_qemu": qemu,
        "shared_run": _shared_run_figures(workdir / "avocado"),
    }


def _conversions(round_trips: int, workdir: Path) -> dict[str, Any]:
    """QMP conversion round trips in a kvm-swprot guest inside the software-protected lab host
    (gmemtest.conversion_bench), with the L1 run's own wall time."""
    from gmemtest.lab.host import booted_labhost
    from gmemtest.lab.kvm import SW_PROTECTED, kvm_command
    from images.labhost import build_labhost_image
    from images.qemu_build import build_qemu

    build_qemu()  # on the host: L1 finds it in the host's cache
    image = build_labhost_image()
    inner = f"{sys.executable} -m gmemtest.conversion_bench {round_trips} \"$GMEMTEST_RESULTS\"/conversions.json"
    argv = kvm_command(SW_PROTECTED, ["sh", "-c", inner], image.kernel_release)
    share = workdir / "results"
    t0 = time.monotonic()
    with booted_labhost(image, workdir, share_dir=share, cwd=Path(__file__).resolve().parents[1]) as run:
        done = run.run(argv, 600)
    result: dict[str, Any] = {"l1_wall_s": round(time.monotonic() - t0, 2), "exit_status": done.returncode}
    path = share / "conversions.json"
    if path.is_file():
        result.update(json.loads(path.read_text()))
    else:
        result["tail"] = done.output.strip().splitlines()[-6:]
    return result


# The headline chain: the lab host poisons the frame, KVM signals QEMU's vCPU, QEMU injects.
NESTED_SCENARIO = "host-ar-touch-4k"


def _record_retry(into: list[str], exc: BaseException) -> None:
    """A frozen or dead L1's first line, for the benchmark's record of retried attempts."""
    into.append(str(exc).splitlines()[0])


def _nested(runs: int, workdir: Path, scenario: str = NESTED_SCENARIO) -> dict[str, Any]:
    """``runs`` chain runs, each its own L1: boot L1, boot a kvm-default L2 in it, inject, judge.

    What counts is how often a run ends any other way than with a verdict: a VM stuck at boot
    (retried once by the runner, kept as stuck-attempt-N), or L1 itself failing or timing out.
    """
    from gmemtest.evidence import retry_once
    from gmemtest.lab.host import LabhostDied, LabhostError, LabhostFrozen, l1_attempt_name, run_in_labhost
    from images.labhost import build_labhost_image

    l1_image = build_labhost_image()
    manifest = build_default_image().manifest
    inner = (f"{Path(sys.executable).parent}/gmemtest run --profile kvm-default --guest-manifest {manifest} "
             f"{scenario} --out /tmp/run; rc=$?; cp -r /tmp/run \"$GMEMTEST_RESULTS\"/; exit $rc")
    records: list[dict[str, Any]] = []
    for i in range(runs):
        rundir = workdir / f"nested-{i}"
        t0 = time.monotonic()
        record: dict[str, Any] = {"run": i, "l1_retried_attempts": []}
        retried: list[str] = record["l1_retried_attempts"]
        try:  # a frozen or dead L1 is retried once, as the shared lab-host run does
            result, timings = retry_once(
                functools.partial(run_in_labhost, l1_image, ["sh", "-c", inner], rundir, timeout=400, cwd=Path.cwd()),
                retry_on=(LabhostFrozen, LabhostDied), workdir=rundir, set_aside_as=l1_attempt_name,
                on_retry=functools.partial(_record_retry, retried))
            record.update(rc=result.returncode, l1_ready_s=timings.ready_s)
        except LabhostError as exc:  # LabhostTimeout included: L1 failed (twice, if it froze or died)
            if isinstance(exc, (LabhostFrozen, LabhostDied)):
                _record_retry(retried, exc)
            record.update(rc=None, l1_error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
        record["wall_s"] = round(time.monotonic() - t0, 2)
        evidence = rundir / "results" / "run" / scenario
        verdict = evidence / "verdict.json"
        record["passed"] = json.loads(verdict.read_text())["passed"] if verdict.is_file() else None
        record["stuck_attempts"] = sorted(p.name for p in evidence.glob("stuck-attempt-*")) if evidence.is_dir() else []
        boot = evidence / "boot.json"
        if boot.is_file():
            doc = json.loads(boot.read_text())
            record.update(l2_mode=doc["mode"], l2_first_ssh_s=doc["timings"]["first_ssh_command_s"])
        observed = evidence / "observations.json"
        if observed.is_file():
            record["injection_to_sigbus_ms"] = json.loads(observed.read_text()).get("injection_to_sigbus_ms")
        records.append(record)
    walls = [r["wall_s"] for r in records if r["passed"] is not None]
    return {"scenario": scenario, "runs": records,
            "passed": sum(1 for r in records if r["passed"]),
            "failed_verdicts": sum(1 for r in records if r["passed"] is False),
            "no_verdict": sum(1 for r in records if r["passed"] is None),
            "stuck_retried": sum(len(r["stuck_attempts"]) for r in records),
            "l1_retried": sum(len(r["l1_retried_attempts"]) for r in records),
            "ended_at_timeout": sum(1 for r in records if "LabhostTimeout" in str(r.get("l1_error", ""))),
            "wall_s": _stats(walls),
            "l2_first_ssh_s": _stats([r["l2_first_ssh_s"] for r in records if "l2_first_ssh_s" in r]),
            "injection_to_sigbus_ms": _stats([r["injection_to_sigbus_ms"] for r in records
                                              if r.get("injection_to_sigbus_ms") is not None])}


def run_benchmark(*, runs: int, out: Path, suite: bool, cold: bool, labhost: bool = False,
                  guest: bool = True, nested: int = 0, nested_scenario: str = NESTED_SCENARIO,
                  conversions: int = 0) -> dict[str, Any]:
    from gmemtest.scenarios import get_scenario

    get_scenario(nested_scenario)  # a bad name fails before anything boots, naming the valid ones
    if runs < 1:
        raise ValueError(f"--runs must be >= 1, got {runs}")
    if nested < 0:
        raise ValueError(f"--nested must be >= 0, got {nested}")
    if conversions < 0:
        raise ValueError(f"--conversions must be >= 0, got {conversions}")
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": {"nproc": os.cpu_count(), "uname": " ".join(os.uname()),
                                           "cpu": _cpu_model()}, "runs": runs}
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gmemtest-bench-") as tmp:
        if guest:
            results["image_build"] = _image_builds(runs, cold)
            results["guest"] = _guest_runs(runs, Path(tmp))
            g = results["guest"]
            summary.update({
                "image_build_warm_median_s": results["image_build"]["warm_s"]["median"],
                "image_build_cold_s": results["image_build"].get("cold_s", {}).get("median"),
                "boot_launch_to_first_ssh_median_s": g["boot"]["launch_to_first_ssh_command_s"]["median"],
                "restore_launch_to_first_ssh_median_s": g["restore"]["launch_to_first_ssh_command_s"]["median"],
                "restore_to_boot_ratio": g["restore_to_boot_ratio"],
                "snapshot_save_s": g["snapshot_prime"]["save_s"],
                "injection_to_sigbus_median_ms": {k: v.get("median") for k, v in g["injection_to_sigbus_ms"].items()},
                "all_verdicts_passed": all(v["passed"] for v in g["verdicts"]),
                "srar_landing_stops_max": g["srar_landing_stops"].get("max"),
            })
        if suite:
            results["suite"] = _suite(Path(tmp) / "avocado")
            summary["guest_suite_wall_s"] = {k: v["wall_s"] for k, v in results["suite"].items()}
        if labhost:
            results["labhost"] = lab = _labhost(runs, Path(tmp) / "labhost", cold)
            summary.update({
                "labhost_image_build_warm_median_s": lab["image_build_warm_s"]["median"],
                "labhost_launch_to_ready_median_s": lab["launch_to_ready_s"]["median"],
                "labhost_restore_to_ready_median_s": lab["restore_to_ready_s"]["median"],
                "labhost_save_s": lab["snapshot_trial"]["save_s"],
                "labhost_tests_wall_s": lab["labhost_tests"]["wall_s"],
                "labhost_tests_exit_status": lab["labhost_tests"]["exit_status"],
                "kvm_modules_cached_median_s": lab["kvm_modules"]["cached_s"]["median"],
                "kvm_modules_forced_rebuild_s": lab["kvm_modules"].get("forced_rebuild_s"),
                "private_section_s": lab["shared_run"].get("section_s"),
                "private_checks_total_s": lab["shared_run"].get("checks_total_s"),
                "project_qemu_cached_median_s": lab["project_qemu"]["cached_s"]["median"],
                "project_qemu_forced_rebuild_s": lab["project_qemu"].get("forced_rebuild_s"),
                "chain_variant_s": lab["shared_run"].get("chain_s"),
            })
        if conversions:
            results["conversions"] = conv = _conversions(conversions, Path(tmp) / "conversions")
            summary.update({"conversion_round_trip_median_ms": conv.get("round_trip_to_trace_ms", {}).get("median"),
                            "conversion_l1_wall_s": conv["l1_wall_s"]})
        if nested:
            results["nested"] = chain = _nested(nested, Path(tmp) / "nested", nested_scenario)
            summary.update({"nested_scenario": nested_scenario, "nested_runs": nested, "nested_passed": chain["passed"],
                            "nested_no_verdict": chain["no_verdict"], "nested_stuck_retried": chain["stuck_retried"],
                            "nested_l1_retried": chain["l1_retried"],
                            "nested_ended_at_timeout": chain["ended_at_timeout"],
                            "nested_wall_median_s": chain["wall_s"].get("median"),
                            "nested_l2_first_ssh_median_s": chain["l2_first_ssh_s"].get("median")})
    results["summary"] = summary
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results
