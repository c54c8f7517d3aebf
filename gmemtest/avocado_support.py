"""What the thin Avocado tests call: one function per test, no Avocado import here.

The test object is used through a small protocol (outputdir, log, cancel, fail), so this module
stays importable and testable without an Avocado job around it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from gmemtest.guest_run import GuestRun, booted_guest
from gmemtest.requirements import host_report, scenario_unmet, unmet_requirements
from gmemtest.runner import ScenarioResult, run_in_fresh_guest
from gmemtest.scenarios import SCENARIOS, ScenarioSpec, get_scenario, unsupported_under
from gmemtest.under_test import UnderTest
from guests.profiles import GuestProfile
from images.build import BuildError, GuestImage
from outcome import Check, Verdict

if TYPE_CHECKING:
    from gmemtest.lab.qualify import LabhostQualification

# Avocado's per-test timeout for a guest scenario: three boot-and-run attempts (a missed
# user-mode SRAR is retried) of about 10 s each here, with room for a loaded machine.
GUEST_TEST_TIMEOUT_S = 240
# A host-side check (ioctls, a child VMM, the seed regression's children).
HOST_TEST_TIMEOUT_S = 120


class ParamsLike(Protocol):
    def get(self, key: str, path: str | None = None, default: Any = None) -> Any: ...


class AvocadoTestLike(Protocol):
    outputdir: str
    log: logging.Logger
    whiteboard: str
    params: ParamsLike

    def cancel(self, message: str | None = None) -> NoReturn: ...

    def fail(self, message: str | None = None) -> NoReturn: ...


def under_test(test: AvocadoTestLike) -> UnderTest:
    """The lab's ``-p`` parameters (and a matrix variant's), or CANCEL naming every bad one.

    Checked before anything boots, so a typo in a path costs a second, not a job.
    """
    chosen = UnderTest.from_params(lambda name: test.params.get(name, default=None))
    problems = chosen.problems()
    if problems:
        test.cancel("bad test parameter: " + "; ".join(problems))
    return chosen


def judge(test: AvocadoTestLike, verdict: Verdict) -> None:
    """The one mapping of a verdict to Avocado's statuses, for every test: PASS passes; FAIL and
    ERROR fail with the failed checks (or the reason); CANNOT RUN and NOT MEANINGFUL cancel with
    their reason. Findings ride on the status; the verdict goes on the whiteboard. A warning (a
    frame the clean-up left poisoned, named) is ``log.warning``: Avocado's WARN, never hidden
    behind a PASS, whether the check ran here or inside the lab host."""
    test.whiteboard = verdict.to_json()
    for warning in verdict.warnings:
        test.log.warning("CLEANUP %s", warning)
    if verdict.not_run in ("CANNOT RUN", "NOT MEANINGFUL"):
        test.cancel(f"{verdict.not_run}: {verdict.reason}")
    if verdict.not_run == "ERROR":
        test.fail(f"ERROR: {verdict.reason}")
    if not verdict.passed:
        test.fail("; ".join(c.line() for c in verdict.failures) or f"{verdict.scenario}: no check was made")


def run_host_check(test: AvocadoTestLike, name: str) -> None:
    """One row of ``gmemtest.host_checks.HOST_CHECK_TABLE`` as this Avocado test, on this host.

    The row's ``verdict`` gates it (CANNOT RUN with the unmet requirement before anything runs,
    the same sentence the main job's plan predicts); the verdict goes to the row's evidence file
    in the outputdir, its findings to the log (a finding is not a failure), and the verdict to
    ``judge`` (which WARNs on a failed clean-up).
    """
    from gmemtest.host_checks import host_check

    check = host_check(name)
    verdict = check.verdict()
    (Path(test.outputdir) / check.evidence).write_text(verdict.to_json() + "\n")
    for finding in verdict.findings:
        test.log.info("FINDING %s (%s): %s", finding.id, finding.severity, finding.text)
    test.log.info("%s: %s", name, check.describe(verdict))
    judge(test, verdict)


def _quiet_wire_loggers() -> None:
    # Avocado records every logger at DEBUG; the QMP and SSH wire traces are already in
    # qmp.jsonl and probe.jsonl, and at DEBUG they bury the verdict under thousands of lines.
    # They also cost time: every record goes to Avocado's status server, and the THP test's
    # 1022 probe lines stalled about 0.13 s every 14 records (9.0 s of probe conversation
    # instead of 0.9 s under 'gmemtest run').
    for noisy in ("qemu.qmp", "paramiko", "guests.probe_client", "qmp_helpers.qmp_sync"):
        logging.getLogger(noisy).setLevel(logging.INFO)


def _prepare(test: AvocadoTestLike, chosen: UnderTest, spec: ScenarioSpec) -> tuple[GuestProfile, GuestImage]:
    """The profile and image `spec` runs with, or CANCEL with the probed reasons; nothing boots."""
    guest_profile = chosen.profile_for(spec)
    meaningless = unsupported_under(spec, guest_profile)
    if meaningless:
        test.cancel(meaningless)
    unmet = scenario_unmet(spec, guest_profile, binary=chosen.qemu)
    if unmet:
        test.cancel(f"{spec.name} under profile {guest_profile.name} cannot run here: " + "; ".join(unmet))
    try:
        image = chosen.guest_image(_job_dir(Path(test.outputdir)))
    except BuildError as exc:
        if chosen.guest_manifest is None and chosen.guest_kernel_version is None:
            raise  # the built-in image failing to build is an error of this job, not a choice
        test.cancel(f"guest image: {exc}")
    return guest_profile, image


def _run(test: AvocadoTestLike, chosen: UnderTest, spec: ScenarioSpec, *, guest_profile: GuestProfile,
         image: GuestImage, outdir: Path) -> ScenarioResult:
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "image.json").write_text(json.dumps(image.as_json(), indent=2) + "\n")
    (outdir / "under-test.json").write_text(json.dumps(chosen.as_json(), indent=2) + "\n")
    test.log.info("scenario %s/%s: %s", spec.name, guest_profile.name, spec.summary)
    return run_in_fresh_guest(spec, image, outdir, under=chosen)


def run_guest_scenario(test: AvocadoTestLike, name: str) -> ScenarioResult:
    """Boot the scenario's guest, run it, keep the evidence in the test's outputdir, judge it.

    ``-p profile=`` (or a matrix variant's ``profile``) runs it under another guest profile;
    ``-p qemu/firmware/guest_*`` choose what else is under test. A profile whose requirements
    this host does not meet CANCELs with the probed reasons.
    """
    _quiet_wire_loggers()
    chosen = under_test(test)
    spec = get_scenario(name)
    guest_profile, image = _prepare(test, chosen, spec)
    result = _run(test, chosen, spec, guest_profile=guest_profile, image=image, outdir=Path(test.outputdir))
    # The whiteboard travels with the job's results (results.json, the HTML report).
    test.whiteboard = result.verdict.to_json()
    if not result.verdict.passed:
        test.fail("; ".join(c.line() for c in result.verdict.failures))
    return result


def _random_bytes(guest: GuestRun) -> str:
    return guest.guest_text("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")


def check_guest_boot(test: AvocadoTestLike, *, restore: bool) -> None:
    """The two ways a test gets its guest, each checked on its own.

    ``restore=False``: a real boot (snapshots off), so the boot path stays tested in every job.
    ``restore=True``: two guests of one key; the second must be restored from the snapshot the
    first saved or used, be its own QEMU process, and not repeat the first one's random bytes.
    """
    _quiet_wire_loggers()
    chosen = under_test(test)
    profile = chosen.profile_or("tcg-default")
    unmet = unmet_requirements(profile.requirements, accel=profile.accel, binary=chosen.qemu)
    if unmet:
        test.cancel(f"profile {profile.name} cannot run here: " + "; ".join(unmet))
    if restore and not chosen.snapshot:
        test.cancel("snapshots are off (-p snapshot=off): there is no restore to check")
    if restore and not profile.restorable:
        test.cancel(f"profile {profile.name} is not restorable (confidential, guest_memfd RAM or the lab host)")
    image = chosen.guest_image(_job_dir(Path(test.outputdir)))
    out = Path(test.outputdir)
    if not restore:
        with booted_guest(image, out / "boot", profile=profile, binary=chosen.qemu, snapshot=False) as guest:
            release = guest.guest_text("uname -r").strip()
            checks: dict[str, tuple[object, object]] = {
                "mode": (guest.boot.mode, "boot"),
                "kernel release": (release, image.kernel_release),
                "ready marker on the console": ("GMEMTEST-READY" in guest.machine.console_text(), True)}
            test.log.info("real boot: console ready %.2f s, first SSH command %.2f s",
                          guest.timings.console_ready_s or 0.0, guest.timings.first_ssh_command_s)
    else:
        with booted_guest(image, out / "first", profile=profile, binary=chosen.qemu) as first:
            first_mode, first_pid, first_random = first.boot.mode, first.machine.pid, _random_bytes(first)
        with booted_guest(image, out / "second", profile=profile, binary=chosen.qemu) as second:
            refresh = second.boot.refresh or {}
            checks = {"second guest's mode": (second.boot.mode, "restore"),
                      "own QEMU process": (second.machine.pid != first_pid, True),
                      "own random bytes": (_random_bytes(second) != first_random, True),
                      "clock stepped to within 1 s": (abs(float(refresh.get("skew_after_s", 99))) < 1.0, True)}
            test.log.info("first guest: %s; second: restored, first SSH command %.2f s after launch (%s)",
                          first_mode, second.timings.first_ssh_command_s, second.boot.fallback or "no fallback")
    verdict = Verdict("guest-boot/" + ("restore" if restore else "real-boot"),
                      tuple(Check(name, repr(expected), repr(actual), actual == expected)
                            for name, (actual, expected) in checks.items()))
    test.whiteboard = verdict.to_json()
    if not verdict.passed:
        test.fail("; ".join(c.line() for c in verdict.failures))


def run_every_scenario_under(test: AvocadoTestLike, profile: str) -> list[ScenarioResult]:
    """Every guest scenario under `profile` (a lab profile), evidence in ``<outputdir>/<scenario>/``.

    One test per profile keeps the lab class to what a lab host can run; the scenarios inside it
    run one after the other and every failing one is named. `profile` outranks ``-p profile=``.
    """
    _quiet_wire_loggers()
    chosen = dataclasses.replace(under_test(test), profile=profile)
    results: list[ScenarioResult] = []
    not_meaningful: list[str] = []
    for spec in SCENARIOS:
        reason = unsupported_under(spec, chosen.profile_for(spec))
        own = [missing for name in spec.requirements if (missing := host_report().missing(name)) is not None]
        if reason is None and own:  # a host-poison row on a host without hwpoison-inject
            reason = f"{spec.name} needs what this host lacks: " + "; ".join(own)
        if reason is not None:  # e.g. the broadcast scenario under a 1-vCPU profile: left out, said so
            test.log.info("left out: %s", reason)
            not_meaningful.append(reason)
            continue
        guest_profile, image = _prepare(test, chosen, spec)
        results.append(_run(test, chosen, spec, guest_profile=guest_profile, image=image,
                            outdir=Path(test.outputdir) / spec.name))
    test.whiteboard = json.dumps({"verdicts": [json.loads(r.verdict.to_json()) for r in results],
                                  "left_out": not_meaningful}, indent=2)
    failed = [r for r in results if not r.verdict.passed]
    if failed:
        test.fail(" | ".join(f"{r.spec.name}/{profile}: " + "; ".join(c.line() for c in r.verdict.failures)
                             for r in failed))
    return results


# The lab-host tests share one L1 run per job: the first one waits for the whole run (L1 boot,
# the stock kernel's host checks, the chain under three QEMU/profile variants and the private-
# memory section, and the four kvm-gmem rows that each boot their guest: 7 min here alone, more
# while guest tests load both cores).
LABHOST_TEST_TIMEOUT_S = 1200
LABHOST_PREFLIGHT = "preflight inside the lab host"
# What preflight must prove inside L1: that it is the standard KVM host with memory failure it is
# built to be (FACTS section 5). A user-supplied kernel that lacks one of these fails here.
_LABHOST_FACTS: tuple[tuple[str, str, object], ...] = (
    ("hwpoison proven by MADV_HWPOISON", "hwpoison", True),
    ("hwpoison-inject (corrupt-pfn)", "hwpoison_inject", True),
    ("KVM boots Linux", "kvm_boots_linux", True),
    ("KVM_CAP_GUEST_MEMFD_FLAGS (MMAP|INIT_SHARED)", "guest_memfd_flags", 0x3),
)


def _job_dir(outputdir: Path) -> Path:
    """The Avocado job's directory (``<job>/test-results/<test>/data``), else the test's parent."""
    for parent in outputdir.parents:
        if parent.name == "test-results":
            return parent.parent
    return outputdir.parent


def _labhost_run(test: AvocadoTestLike) -> LabhostQualification:
    """The job's shared L1 run (built and run by the first lab-host test), its evidence in outputdir.

    The L1 run also carries the chain (host-poison rows under each KVM profile, L2 guests from
    the job's guest image), whichever lab-host test happens to start it.
    """
    from gmemtest.lab.qualify import lab_chain_variants, shared_run
    from images.debs import PackageError
    from images.kconfig import KernelConfigError
    from images.labhost import DEFAULT_SUITE, DebianKernel, build_labhost_image

    chosen = under_test(test)
    kernel = DebianKernel(chosen.labhost_kernel_suite or DEFAULT_SUITE, chosen.labhost_kernel_version)
    try:
        image = build_labhost_image(kernel=kernel)
    except (BuildError, PackageError, KernelConfigError) as exc:
        if chosen.labhost_kernel_version is None and chosen.labhost_kernel_suite is None:
            raise
        test.cancel(f"lab host kernel {kernel.describe()} (labhost_kernel_version/suite): {exc}")
    outdir = Path(test.outputdir)
    guest = chosen.guest_image(_job_dir(outdir))
    # Debian's newest QEMU in its own root, and the project's own: the chain also runs under them.
    result = shared_run(image, _job_dir(outdir) / "labhost", guest_manifest=Path(guest.manifest),
                        variants=lab_chain_variants(), private_kvm=chosen.labhost_kvm)
    for evidence in ("qualification.json", "qualification.html", "preflight.json", "labhost-qualification.json"):
        src = result.out / evidence
        if src.is_file():
            (outdir / evidence).write_bytes(src.read_bytes())
    (outdir / "labhost-evidence.txt").write_text(f"L1 run (console, output, dmesg): {result.out / 'labhost'}\n")
    test.log.info("lab host kernel %s, L1 ready in %s s", result.kernel_release, result.timings.get("ready_s"))
    return result


def run_labhost_item(test: AvocadoTestLike, name: str) -> None:
    """Judge one check of the lab host's qualification as this Avocado test.

    The checks run inside L1 (one shared run per job, see gmemtest.lab.qualify); this test
    takes its own item, keeps it and the shared evidence in its outputdir, and maps the status:
    PASS passes, FAIL and ERROR fail with the details, CANNOT RUN and NOT MEANINGFUL cancel with
    their reason. Findings (documented divergences) are logged and listed on the whiteboard.
    """
    result = _labhost_run(test)
    outdir = Path(test.outputdir)
    if name == LABHOST_PREFLIGHT:
        host = result.preflight.get("host", {})
        checks = tuple(Check(label, str(want), str(host.get(key)), host.get(key) == want)
                       for label, key, want in _LABHOST_FACTS)
        verdict = Verdict(LABHOST_PREFLIGHT, checks)
        (outdir / "verdict.txt").write_text(verdict.summary() + "\n")
        judge(test, verdict)
        return
    _judge_item(test, result.items.get(name), name, result)


def run_chain_item(test: AvocadoTestLike, scenario: str, variant: str) -> None:
    """One host-poison row of a chain ``variant`` (a profile under a QEMU), as it ran inside the
    job's shared L1 run.

    Its evidence (host, QEMU and guest layers) is copied into the test's outputdir; a profile
    the lab host cannot run (e.g. kvm-gmem without a QEMU that has guest-memfd) CANCELs with the
    reason probed inside L1.
    """
    from gmemtest.lab.qualify import CHAIN_DIR

    result = _labhost_run(test)
    item = result.items.get(f"{scenario}/{variant}")
    evidence = result.out / CHAIN_DIR / variant / scenario
    if evidence.is_dir():
        shutil.copytree(evidence, Path(test.outputdir) / scenario, dirs_exist_ok=True)
    if item is not None and item.get("status") == "PASS":
        test.log.info("%s/%s: %s", scenario, variant, item.get("summary"))
    _judge_item(test, item, f"{scenario}/{variant}", result)


def _item_verdict(item: dict[str, Any], name: str, result: LabhostQualification) -> Verdict:
    """The verdict L1 judged for ``item``, read back whole from its evidence (a host check's verdict
    file, a chain row's ``verdict.json``); an item L1 has no verdict file for (it could not run,
    or broke) is the item's own status and why. Reasons say where they were found."""
    evidence = item.get("evidence")
    path = result.out / str(evidence) if evidence else None
    if path is not None and path.is_dir():
        path = path / "verdict.json"
    if path is not None and path.is_file():
        verdict = Verdict.from_json(path.read_text())
    elif item["status"] in ("CANNOT RUN", "NOT MEANINGFUL", "ERROR"):
        verdict = Verdict.did_not_run(name, item["status"], str(item["summary"]))
    else:
        verdict = Verdict.did_not_run(name, "ERROR", f"L1 reported {item['status']} for {name!r} but left no verdict "
                                      f"file ({evidence})")
    if verdict.reason is not None:
        verdict = dataclasses.replace(verdict, reason=f"{name} inside the lab host: {verdict.reason}")
    return verdict


def _judge_item(test: AvocadoTestLike, item: dict[str, Any] | None, name: str, result: LabhostQualification) -> None:
    outdir = Path(test.outputdir)
    if item is None:
        test.fail(f"the lab host's qualification has no item {name!r}; it has: {', '.join(result.items)}")
    (outdir / "item.json").write_text(json.dumps(item, indent=2) + "\n")
    item_evidence = item.get("evidence")
    if item_evidence and (result.out / str(item_evidence)).is_file():
        (outdir / Path(str(item_evidence)).name).write_bytes((result.out / str(item_evidence)).read_bytes())
    for finding in result.qualification.get("findings", []):
        # log() at WARNING level would make the test WARN; a finding is reported, not a failure.
        test.log.log(logging.INFO, "FINDING %s: %s", finding.get("id"), finding.get("summary", ""))
    judge(test, _item_verdict(item, name, result))
