"""The lab host runner: job quoting and the exit-marker protocol (unit), then real L1 boots.

The ``qemu``/``slow`` tests boot the real lab-host image (Debian 7.x kernel under TCG,
about 7 s to READY here) and run under ``flock /tmp/gmemtest-heavy.lock`` by whoever
starts pytest; each boot has its own deadlines on top of pytest's timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gmemtest.lab.host import (
    EXIT_FRAME,
    EXIT_MARKER,
    LabhostFrozen,
    LabhostTimeout,
    _ExitScanner,
    booted_labhost,
    job_script,
)
from images.labhost import LabhostImage, build_labhost_image

WEIRD_ARGV = ["it's", 'say "hi"', "$HOME `id` $(id)", "tab\there", "new\nline", "*", "-n", "", "ünï"]


def test_job_script_passes_every_argument_verbatim(tmp_path: Path) -> None:
    program = [sys.executable, "-c", "import json, os, sys; print(json.dumps([os.getcwd(), *sys.argv[1:]]))"]
    script = job_script([*program, *WEIRD_ARGV], tmp_path, "0123456789abcdef", {"GM_X": "a b'c"})
    (tmp_path / "job.sh").write_text(script)
    done = subprocess.run(["sh", str(tmp_path / "job.sh")], capture_output=True, text=True,
                          timeout=30, check=True, cwd="/")
    assert json.loads(done.stdout) == [str(tmp_path), *WEIRD_ARGV]
    assert script.splitlines()[0] == "# gmemtest-job 0123456789abcdef"


def test_job_script_env_and_exit_status(tmp_path: Path) -> None:
    script = job_script(["sh", "-c", 'printf %s "$GM_X"; exit 7'], tmp_path, "abcdef0123456789",
                        {"GM_X": "a b'c"})
    (tmp_path / "job.sh").write_text(script)
    done = subprocess.run(["sh", str(tmp_path / "job.sh")], capture_output=True, text=True, timeout=30,
                          check=False)
    assert (done.returncode, done.stdout) == (7, "a b'c")


def test_job_script_refuses_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="command is empty"):
        job_script([], tmp_path, "abcdef0123456789")
    with pytest.raises(ValueError, match="'1X' is not a shell name"):
        job_script(["true"], tmp_path, "abcdef0123456789", {"1X": "v"})
    with pytest.raises(ValueError, match="nonce 'xyz'"):
        job_script(["true"], tmp_path, "xyz")


def test_missing_cwd_exits_125(tmp_path: Path) -> None:
    (tmp_path / "job.sh").write_text(job_script(["true"], tmp_path / "absent", "abcdef0123456789"))
    done = subprocess.run(["sh", str(tmp_path / "job.sh")], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 125 and "cannot cd" in done.stderr


@pytest.mark.parametrize("chunk", [1, 2, 5, 1000])
def test_exit_scanner_returns_exact_output_and_status(chunk: int) -> None:
    nonce = "00ff00ff00ff00ff"
    fake = f"{EXIT_FRAME}{EXIT_MARKER} 1111111111111111 9\n"  # another job's nonce: just output
    output = f"line 1\nno newline at end{fake}\n{EXIT_FRAME}{EXIT_MARKER} {nonce}"
    stream = output + f"{EXIT_FRAME}{EXIT_MARKER} {nonce} 42\n"
    scanner = _ExitScanner(nonce)
    shown, status = [], None
    for i in range(0, len(stream), chunk):
        text, rc = scanner.feed(stream[i:i + chunk])
        shown.append(text)
        if rc is not None:
            status = rc
            break
    assert status == 42
    assert "".join(shown) == output


def test_exit_scanner_holds_back_a_partial_marker() -> None:
    scanner = _ExitScanner("00ff00ff00ff00ff")
    text, rc = scanner.feed(f"out\n{EXIT_FRAME}{EXIT_MARKER} 00ff")
    assert (text, rc) == ("out\n", None), "a finished line is shown at once; only the marker is held"
    text, rc = scanner.feed("00ff00ff00ff 0\n")
    assert (text, rc) == ("", 0)


# ----- real L1 ---------------------------------------------------------------------------------
def _our_qemus(workdir: Path) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" in cmdline and str(workdir) in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.fixture(scope="module")
def labhost_image() -> LabhostImage:
    try:
        return build_labhost_image()
    except Exception as exc:  # no mirror, no apt: the boot tests cannot run here
        pytest.skip(f"lab-host image unavailable: {exc}")


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cli_runs_a_failing_command_in_a_real_kvm_host(tmp_path: Path, labhost_image: LabhostImage,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    from gmemtest.cli import main

    script = ("cat /proc/modules; ls /dev/kvm; ls /sys/kernel/debug/hwpoison; "
              "echo to-stderr >&2; echo kept > \"$GMEMTEST_RESULTS/r.txt\"; exit 3")
    rc = main(["labhost", "run", "--results", str(tmp_path), "--timeout", "60", "--boot-timeout", "90",
               "--", "sh", "-c", script])
    out, err = capfd.readouterr()
    assert rc == 3, err
    modules = {line.split()[0] for line in out.splitlines() if " Live " in line}
    assert {"kvm_amd", "kvm", "hwpoison_inject", "9p"} <= modules
    assert "/dev/kvm\n" in out and "corrupt-pfn" in out and "to-stderr" in out
    assert "GMEMTEST-LABHOST-EXIT" not in out  # the marker is protocol, not output
    assert (tmp_path / "results" / "r.txt").read_text() == "kept\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["returncode"] == 3 and summary["timings"]["ready_s"] > 0
    console = (tmp_path / "labhost" / "console.log").read_text()
    assert "GMEMTEST-LABHOST-READY kvm=yes hwpoison_inject=yes" in console
    assert "Live" not in console  # command output stays off the kernel console
    assert (tmp_path / "labhost" / "ctl" / "dmesg.txt").stat().st_size > 0
    assert not _our_qemus(tmp_path)


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_boot_serves_several_commands_with_exact_argv(tmp_path: Path, labhost_image: LabhostImage) -> None:
    venv_python = Path(sys.executable)
    with booted_labhost(labhost_image, tmp_path / "w", share_dir=tmp_path / "share",
                        boot_timeout_s=90) as run:
        assert run.timings.ready_s > 0
        first = run.run([str(venv_python), "-c", "import json, os, sys; print(json.dumps("
                         "[os.getcwd(), os.environ['HOME'], os.path.exists('/dev/kvm'), *sys.argv[1:]]))",
                         *WEIRD_ARGV], timeout=60)
        assert first.returncode == 0, first.output
        assert json.loads(first.output) == [os.getcwd(), "/tmp", True, *WEIRD_ARGV]
        second = run.run(["sh", "-c", "echo partial; false"], timeout=30)
        assert (second.returncode, second.output) == (1, "partial\n")
        missing = run.run(["/no/such/program"], timeout=30)
        assert missing.returncode == 127 and "/no/such/program" in missing.output
    assert run.timings.poweroff_s is not None
    assert len(run.timings.commands_s) == 3
    assert not _our_qemus(tmp_path)


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_never_ready_l1_times_out_with_console_tail_and_no_qemu_left(tmp_path: Path,
                                                                     labhost_image: LabhostImage) -> None:
    # rdinit=/bin/sh: the kernel starts an interactive shell instead of the lab-host init,
    # so READY never comes.
    from gmemtest.lab.host import LabhostNotReady

    with pytest.raises(LabhostNotReady) as info, booted_labhost(
            labhost_image, tmp_path / "w", share_dir=tmp_path / "share",
            boot_timeout_s=15, extra_kernel_args=("rdinit=/bin/sh",)):
        pytest.fail("L1 became ready although init never ran")
    text = str(info.value)
    assert "not ready within 15.0 s" in text
    assert "L1 console tail" in text and "console.log" in text
    assert not _our_qemus(tmp_path)


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_stopped_heartbeat_is_reported_as_a_freeze_with_evidence(tmp_path: Path,
                                                                   labhost_image: LabhostImage) -> None:
    """The command stops L1's heartbeat (SIGSTOP): the runner says "froze" within seconds, keeps QEMU's
    view of the vCPUs, and kills L1, long before the command's own timeout."""
    import time

    with pytest.raises(LabhostFrozen) as info, booted_labhost(
            labhost_image, tmp_path / "w", share_dir=tmp_path / "share", boot_timeout_s=90,
            freeze_after_s=4) as run:
        pid = (run.ctl_dir / "heartbeat-pid").read_text().strip()
        t0 = time.monotonic()
        run.run(["sh", "-c", f"kill -STOP {pid}; echo heartbeat stopped; sleep 600"], timeout=100)
    assert time.monotonic() - t0 < 30, "a freeze must be reported long before the command's timeout"
    assert "L1 froze while running" in str(info.value) and "heartbeat stopped" in str(info.value)
    evidence = info.value.evidence.read_text()
    assert "== info registers -a" in evidence and "RIP=" in evidence and "== query-status" in evidence
    assert not _our_qemus(tmp_path)


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_command_timeout_kills_l1(tmp_path: Path, labhost_image: LabhostImage) -> None:
    with pytest.raises(LabhostTimeout) as info, booted_labhost(
            labhost_image, tmp_path / "w", share_dir=tmp_path / "share",
            boot_timeout_s=90) as run:
        run.run(["sh", "-c", "echo started; sleep 600"], timeout=5)
    assert "did not exit within 5.0 s" in str(info.value)
    assert "started" in str(info.value)  # the output tail
    assert not _our_qemus(tmp_path)


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("moment", ["while L1 boots", "while the command runs"])
def test_sigkilled_runner_leaves_no_qemu(tmp_path: Path, labhost_image: LabhostImage, moment: str) -> None:
    """SIGKILL of `gmemtest labhost run` at any point takes L1's QEMU with it (PDEATHSIG)."""
    import signal
    import time

    runner = subprocess.Popen(
        [sys.executable, "-m", "gmemtest.cli", "labhost", "run", "--results", str(tmp_path), "--timeout", "120",
         "--", "sh", "-c", "echo command-started; sleep 100"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        if moment == "while L1 boots":
            while not _our_qemus(tmp_path) and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            assert runner.stdout is not None
            for line in runner.stdout:  # the command's own output, streamed by the runner
                if "command-started" in line or time.monotonic() > deadline:
                    break
        assert _our_qemus(tmp_path), f"no L1 QEMU was running {moment}"
        runner.send_signal(signal.SIGKILL)
        runner.wait(10)
        deadline = time.monotonic() + 10
        while _our_qemus(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _our_qemus(tmp_path), f"L1's QEMU outlived the runner SIGKILLed {moment}"
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait(10)
        if runner.stdout is not None:
            runner.stdout.close()


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_cwd_under_tmp_is_the_commands_cwd_in_l1(tmp_path: Path, labhost_image: LabhostImage) -> None:
    """L1 mounts its own tmpfs on /tmp; a checkout there (as a CI clone may be) must still be seen."""
    from gmemtest.lab.host import run_in_labhost

    work = tmp_path / "checkout"
    work.mkdir()
    (work / "marker.txt").write_text("from the host's /tmp\n")
    result, _ = run_in_labhost(labhost_image, ["sh", "-c", "pwd; cat marker.txt"], tmp_path / "l1",
                               timeout=60, cwd=work)
    assert result.returncode == 0, result.output
    assert result.output == f"{work}\nfrom the host's /tmp\n"
    assert not _our_qemus(tmp_path)
