"""The whole guest-side chain on the real default guest: boot, SSH, probe, QMP injection, verdict.

These run real TCG guests one at a time (a few seconds each) and check both that the scenarios
pass and that the failure paths leave nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gmemtest.cli import main as cli_main
from gmemtest.guest_run import booted_guest
from gmemtest.runner import run_scenario
from gmemtest.scenarios import get_scenario
from images.build import GuestImage, build_default_image
from qmp_helpers import MachineStateError, QemuBinaryNotFound, find_tagged_qemus

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_default_image()


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # fields after comm: state ppid ...


def _qemus_descending_from(ancestor: int) -> set[int]:
    """Tagged QEMUs started below ``ancestor``: the job under test, not another job on the machine."""
    found = set()
    for pid in find_tagged_qemus():
        cur: int | None = pid
        for _ in range(64):
            cur = _ppid(cur) if cur is not None else None
            if cur is None or cur <= 1:
                break
            if cur == ancestor:
                found.add(pid)
                break
    return found


def _our_qemus() -> set[int]:
    return {pid for pid, tag in find_tagged_qemus().items() if tag.startswith(f"gmemtest-{os.getpid()}-")}


@pytest.mark.parametrize("name", ["srao-late-touch-4k", "srao-late-touch-hugetlb", "srar-kernel-panic"])
def test_scenario_passes_with_evidence(image: GuestImage, tmp_path: Path, name: str) -> None:
    spec = get_scenario(name)
    with booted_guest(image, tmp_path, profile=spec.profile) as guest:
        result = run_scenario(spec, guest, tmp_path)
    assert result.verdict.passed, result.verdict.summary()
    for evidence in ("console.log", "qmp.jsonl", "probe.jsonl", "verdict.txt", "expectation.json", "layout.json"):
        assert (tmp_path / evidence).stat().st_size > 0, f"evidence file {evidence} missing or empty"
    events = [json.loads(line) for line in (tmp_path / "qmp.jsonl").read_text().splitlines()]
    assert any("MEMORY_FAILURE" in json.dumps(e) for e in events), "QMP transcript lacks the MEMORY_FAILURE event"
    assert not _our_qemus(), "a QEMU outlived its booted_guest() context"


def test_guest_that_never_reaches_ssh_names_the_console_and_leaves_nothing(image: GuestImage, tmp_path: Path) -> None:
    no_init = ["rdinit=/gmemtest-no-such-init"]
    with pytest.raises(MachineStateError) as err, booted_guest(image, tmp_path, boot_timeout_s=8.0,
                                                               extra_kernel_args=no_init):
        pytest.fail("the guest must not become ready without an init")
    message = str(err.value)
    assert "GMEMTEST-READY" in message and str(tmp_path / "console.log") in message, message
    assert "Kernel panic" in message, f"the console tail (why the guest never came up) is missing: {message}"
    assert not _our_qemus()
    assert not list(tmp_path.glob("*.sock")), "QMP socket left behind"


def test_missing_qemu_binary_is_named(image: GuestImage, tmp_path: Path) -> None:
    with pytest.raises(QemuBinaryNotFound, match="qemu-system-nonexistent"), \
            booted_guest(image, tmp_path, binary="qemu-system-nonexistent"):
        pass
    assert not _our_qemus()


def test_cli_rejects_unknown_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["run", "srao-late-touch-5k"]) == 2
    err = capsys.readouterr().err
    assert "unknown scenario 'srao-late-touch-5k'" in err and "srao-late-touch-4k" in err


def test_cli_run_by_hand_keeps_evidence(image: GuestImage, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "gmemtest.cli", "run", "srao-early-kill-prctl-4k", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "srao-early-kill-prctl-4k: PASS" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary[0]["verdict"]["status"] == "PASS" and summary[0]["injection_to_sigbus_ms"] > 0
    assert summary[0]["verdict"] == json.loads((tmp_path / "srao-early-kill-prctl-4k" / "verdict.json").read_text())


def test_sigkilled_avocado_job_leaves_no_qemu(image: GuestImage, tmp_path: Path) -> None:
    """SIGKILL the avocado process mid-run: every QEMU it started must be gone soon after."""
    avocado = str(Path(sys.executable).with_name("avocado"))
    job = subprocess.Popen(
        [avocado, "run", "--max-parallel-tasks=1", "--job-results-dir", str(tmp_path),
         "avocado_tests/guest/test_machine_checks.py:MachineChecks.test_srao_late_touch_4k"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        started: set[int] = set()
        while time.monotonic() < deadline and not started:
            started = _qemus_descending_from(job.pid)
            time.sleep(0.1)
        assert started, "the avocado job never started a QEMU"
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=10)
        deadline = time.monotonic() + 30
        alive = started
        while time.monotonic() < deadline and alive:
            alive = started & set(find_tagged_qemus())
            time.sleep(0.2)
        assert not alive, f"QEMU pids {sorted(alive)} outlived the SIGKILLed avocado job"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)


@pytest.mark.parametrize(("name", "cs"), [("srar-user-spin-4k", 0x33), ("srar-kernel-panic", 0x10)])
def test_srar_lands_where_the_row_says(image: GuestImage, tmp_path: Path, name: str, cs: int) -> None:
    """The SRAR rows inject into a stopped VM at a checked vCPU position; the guest must agree.

    The guest kernel prints the RIP its #MC interrupted ("RIP 33:<...>", 0x33 __USER_CS, 0x10
    __KERNEL_CS): it must be the position read from QEMU before the injection, in the probe's
    text for the user-mode row (CI once saw the SRAR land in sshd instead: no SIGBUS at all).
    """
    spec = get_scenario(name)
    with booted_guest(image, tmp_path / "guest", profile=spec.profile) as guest:
        result = run_scenario(spec, guest, tmp_path / "run")
        console = guest.machine.console_text()
    landing = result.injection.landing  # type: ignore[union-attr]
    assert landing is not None, result.injection
    assert landing.cs == cs, landing
    printed = f"RIP {cs:02x}:<{landing.rip:016x}>"
    seen = (tmp_path / "run" / "dmesg.txt").read_text() if cs == 0x33 else console
    assert printed in seen, f"the guest's MCE record does not name the checked landing {printed}"
    assert result.verdict.passed, result.verdict.summary()


def test_a_late_second_sigbus_is_judged(image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGBUS the probe reports after its last reply must reach the 'sigbus count' check.

    The probe is sent a second SIGBUS once every observer has been read (after its 'flags'
    reply): a runner that drained the signals earlier would still call this a PASS.
    """
    from gmemtest import runner

    original = runner.observe_recovery

    def observe_then_signal(guest: Any, probe: Any, *args: Any, **kwargs: Any) -> None:
        original(guest, probe, *args, **kwargs)
        guest.guest_text(f"kill -BUS {probe.pid}")

    monkeypatch.setattr(runner, "observe_recovery", observe_then_signal)
    spec = get_scenario("srao-late-touch-4k")
    with booted_guest(image, tmp_path, profile=spec.profile) as guest:
        result = run_scenario(spec, guest, tmp_path)
    count = next(c for c in result.verdict.checks if c.name == "sigbus count")
    assert (count.expected, count.actual, count.ok) == ("1", "2", False), result.verdict.summary()
    assert not result.verdict.passed


def test_an_unexpected_panic_is_a_fail_verdict_with_the_panic_text(
        image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest that panics where the scenario expects it to survive is judged, not an SSH timeout."""
    from gmemtest import acts

    original = acts.wait_recovery

    def recover_then_crash(guest: Any, before_kb: int, pages: int = 1) -> None:
        original(guest, before_kb, pages)
        guest.ssh.start("echo c > /proc/sysrq-trigger")  # never answers: the kernel is gone

    monkeypatch.setattr(acts, "wait_recovery", recover_then_crash)
    spec = get_scenario("srao-late-touch-4k")
    with booted_guest(image, tmp_path, profile=spec.profile) as guest:
        result = run_scenario(spec, guest, tmp_path)
    lines = {c.name: c for c in result.verdict.checks}
    panicked = lines["guest panicked (GUEST_PANICKED)"]
    assert (panicked.expected, panicked.actual, panicked.ok) == ("False", "True", False)
    message = lines["panic message on the serial console"]
    assert not message.ok and "sysrq" in message.actual, message
    assert not result.verdict.passed
    # The panic must end the wait (abort poll, or the exec deadline), never the probe's own timeout.
    why = (tmp_path / "unexpected-panic.txt").read_text()
    assert why.startswith(("ProbeAbortedError", "CommandTimeoutError", "SshError")), why


def test_a_gpa_the_guest_misreports_is_refused_before_injection(
        image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest kernel's pagemap alone does not decide where to inject: QEMU must read the pattern there."""
    import dataclasses

    from gmemtest.runner import ScenarioError
    from guests.probe_client import ProbeClient

    real_map, real_locate = ProbeClient.map, ProbeClient.locate

    def lying_map(self: ProbeClient, kind: Any, npages: int) -> Any:
        m = real_map(self, kind, npages)
        pages = tuple(dataclasses.replace(p, pfn=p.pfn + 1, gpa=p.gpa + 0x1000) for p in m.pages)
        return dataclasses.replace(m, pages=pages)

    def lying_locate(self: ProbeClient, mapping_id: int, offset: int) -> Any:
        where = real_locate(self, mapping_id, offset)
        return dataclasses.replace(where, pfn=where.pfn + 1, gpa=where.gpa + 0x1000)

    monkeypatch.setattr(ProbeClient, "map", lying_map)
    monkeypatch.setattr(ProbeClient, "locate", lying_locate)
    spec = get_scenario("srao-late-touch-4k")
    with booted_guest(image, tmp_path, profile=spec.profile) as guest:
        with pytest.raises(ScenarioError, match="refusing to inject"):
            run_scenario(spec, guest, tmp_path)
        assert not any(e.name == "MEMORY_FAILURE" for e in guest.machine.events), "it injected anyway"
    interlock = json.loads((tmp_path / "gpa-interlock.json").read_text())
    assert interlock["expected"] != interlock["qemu_read"]
