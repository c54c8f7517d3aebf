"""`gmemtest run NAME --keep`: the judged guest stays up, `gmemtest ssh`/`qmp` reach it, Ctrl-C ends it.

The end-to-end test is the README's by-hand path: a real TCG guest, a real OpenSSH client, QMP on
the engineer's own monitor socket, SIGINT like a Ctrl-C, and no QEMU of the keeper left after it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gmemtest.kept import KeptGuest, find_kept, remove_record, write_record
from qmp_helpers import find_tagged_qemus

REPO = Path(__file__).resolve().parents[2]


def _kept(pid: int) -> KeptGuest:
    return KeptGuest(pid=pid, scenario="s", profile="p", ssh_port=2222, ssh_key="/k", qmp_socket="/q",
                     console_log="/c", evidence="/e")


def test_find_kept_takes_the_newest_live_record_and_ignores_dead_keepers(tmp_path: Path) -> None:
    with pytest.raises(LookupError, match="no kept guest: start one with 'gmemtest run NAME --keep'"):
        find_kept(root=tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    write_record(_kept(int(dead.stdout)), root=tmp_path)  # that process has exited
    with pytest.raises(LookupError):
        find_kept(root=tmp_path)
    write_record(_kept(os.getpid()), root=tmp_path)
    assert find_kept(root=tmp_path).pid == os.getpid()
    with pytest.raises(LookupError, match=f"kept now: {os.getpid()}"):
        find_kept(1, root=tmp_path)
    remove_record(os.getpid(), root=tmp_path)
    with pytest.raises(LookupError):
        find_kept(root=tmp_path)


def test_ssh_argv_names_key_port_and_user() -> None:
    argv = _kept(1).ssh_argv(["cat", "/proc/version"])
    assert argv[:5] == ["ssh", "-i", "/k", "-p", "2222"] and argv[-3:] == ["root@127.0.0.1", "cat", "/proc/version"]


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ssh") is None, reason="no OpenSSH client (openssh-client) on this host")
def test_keep_holds_the_guest_for_ssh_and_qmp_and_ctrl_c_leaves_no_qemu(tmp_path: Path) -> None:
    env = dict(os.environ, GMEMTEST_CACHE=os.environ.get("GMEMTEST_CACHE", str(Path.home() / ".cache" / "gmemtest")),
               PYTHONPATH=str(REPO))
    gmemtest = [sys.executable, "-m", "gmemtest.cli"]
    # SIGINT starts out ignored in the keeper, as for a job a non-interactive shell put in the
    # background (CI): Ctrl-C must end the kept guest all the same.
    ignoring_sigint = ["sh", "-c", 'trap "" INT; exec "$@"', "sh"]
    keeper = subprocess.Popen([*ignoring_sigint, *gmemtest, "run", "srao-late-touch-4k", "--keep", "--out",
                               str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    lines: list[str] = []
    try:
        assert keeper.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = keeper.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("  evidence"):
                break
        text = "".join(lines)
        assert "srao-late-touch-4k: PASS" in text and "guest kept up" in text, text
        assert "ssh -i " in text and "-p " in text and "qmp:" in text and "console:" in text, text
        record = json.loads((tmp_path / "srao-late-touch-4k" / "kept.json").read_text())
        assert record["pid"] == keeper.pid

        ssh = subprocess.run([*gmemtest, "ssh", "--", "cat", "/proc/sys/kernel/hostname", "/proc/meminfo"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=60, check=False)
        assert ssh.returncode == 0, ssh.stderr
        assert re.search(r"HardwareCorrupted:\s+4 kB", ssh.stdout), f"not the judged guest's meminfo:\n{ssh.stdout}"
        qmp = subprocess.run([*gmemtest, "qmp", "query-status"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=30, check=False)
        assert qmp.returncode == 0 and json.loads(qmp.stdout)["return"]["status"] == "running", qmp.stdout + qmp.stderr
        assert any(f"-{keeper.pid}-" in tag for tag in find_tagged_qemus().values()), "the kept QEMU is not running"
    finally:
        keeper.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            rest, _ = keeper.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            keeper.kill()  # never leave the keeper (and its guest) behind a failed test
            keeper.communicate(timeout=10)
            raise
    assert "stopped: the kept guest's QEMU is gone" in rest, rest
    assert keeper.returncode == 0, "".join(lines) + rest
    time.sleep(0.5)
    left = [pid for pid, tag in find_tagged_qemus().items() if f"-{keeper.pid}-" in tag]
    assert not left, f"QEMU {left} outlived the kept run's Ctrl-C"
    with pytest.raises(LookupError):
        find_kept(keeper.pid)
    steps = (tmp_path / "steps.log").read_text()
    assert "launching tcg-default" in steps and "injected at gpa" in steps, steps
