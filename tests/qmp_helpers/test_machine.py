"""qmp_helpers against the real qemu-system-x86_64 (TCG, no guest kernel)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from qmp_test_support import BASE_ARGS, MCE_MARKER, QEMU

from qmp_helpers import (
    STUCK_RUN_STATES,
    EventTimeout,
    GpaOutOfRange,
    HmpError,
    MachineStateError,
    MachineStuck,
    QemuBinaryNotFound,
    QemuDied,
    QemuError,
    QemuLaunchError,
    QemuMachine,
    QmpCommandError,
    QmpTimeout,
    find_tagged_qemus,
    mce_kind,
    reap_orphans,
)

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(60)]
REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _listening_inode(port: int) -> int | None:
    """Inode of the IPv4 TCP socket listening on 127.0.0.1:port, from /proc/net/tcp."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        addr, hexport = fields[1].split(":")
        if int(hexport, 16) == port and fields[3] == "0A" and addr == "0100007F":
            return int(fields[9])
    return None


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _transcript(machine: QemuMachine) -> list[dict[str, Any]]:
    return [json.loads(line) for line in machine.qmp_log.read_text().splitlines()]


def test_launch_and_shutdown_leave_nothing(tmp_path: Path) -> None:
    machine = QemuMachine([*BASE_ARGS, "-S"], tmp_path / "m", name="gmemtest-1-0123456789ab")
    fds_before = sorted(os.listdir("/proc/self/fd"))
    with machine:
        assert machine.launch() is machine  # enter-then-launch habit: no second QEMU
        pid = machine.pid
        sock = machine.qmp_socket
        assert _alive(pid), f"QEMU pid {pid} not running after launch"
        assert sock.is_socket(), f"expected QMP socket at {sock}"
        assert machine.args[0].endswith(QEMU)
        assert "-qmp" in machine.args and "-serial" in machine.args
        assert machine.status() == "prelaunch"
        assert find_tagged_qemus().get(pid) == machine.tag, "QEMU argv lacks the gmemtest tag"
    assert machine.shutdown() == 0, "second shutdown must be a no-op returning the status"
    with pytest.raises(MachineStateError, match="shut down"):
        machine.launch()
    assert not _alive(pid), f"QEMU pid {pid} still alive after shutdown"
    assert not sock.exists(), f"QMP socket {sock} left behind"
    records = _transcript(machine)
    assert records[0]["dir"] == "launch" and records[-1]["dir"] == "shutdown"
    assert all("t_mono" in r and "t_wall" in r for r in records)
    assert {"cmd": "quit"}.items() <= next(r for r in records if r.get("cmd") == "quit").items()
    assert [t.name for t in threading.enumerate() if t.name.startswith("q")] == [], \
        "QMP loop or launcher thread outlived shutdown"
    assert sorted(os.listdir("/proc/self/fd")) == fds_before, "file descriptors leaked"


def test_stop_cont_events_and_marks(machine: QemuMachine) -> None:
    mark = machine.event_mark()
    machine.qmp("stop")
    machine.qmp("cont")
    time.sleep(0.2)  # both events are recorded before the waits start: marks must find them
    stop = machine.wait_event("STOP", since=mark, timeout=5)
    resume = machine.wait_event("RESUME", since=mark, timeout=5)
    assert stop.t_mono <= resume.t_mono, f"STOP at {stop.t_mono} after RESUME {resume.t_mono}"
    assert machine.status() == "running"
    with pytest.raises(EventTimeout) as err:
        machine.wait_event("STOP", timeout=0.3)  # since=now: the old STOP must not count
    assert "STOP" in str(err.value)
    with pytest.raises(EventTimeout):
        machine.wait_event("RESUME", predicate=lambda e: e.data.get("x") == 1, since=mark,
                           timeout=0.2)
    assert {"event": "STOP"}.items() <= next(
        r for r in _transcript(machine) if r["dir"] == "event").items()


def test_hmp_errors_raise(machine: QemuMachine) -> None:
    assert "pc.ram" in machine.hmp("info mtree -f")
    cases = {"no-such-command": "unknown command", "mce 0 9": "parse error",
             "gpa2hva 0x100000000": "unmapped gpa", "mce 0 10 0 0 0 0": "invalid MCE bank",
             'trace-event no_such_event on': "unknown trace event"}
    for line, shape in cases.items():
        with pytest.raises(HmpError) as err:
            machine.hmp(line)
        assert err.value.matched == shape, f"{line!r}: expected {shape}, got {err.value}"
    with pytest.raises(QmpCommandError) as qerr:
        machine.qmp("no-such-qmp-command")
    assert qerr.value.error_class == "CommandNotFound"


def test_a_running_vm_with_a_silent_console_is_stuck_with_its_registers(tmp_path: Path) -> None:
    """No firmware output at all (-S: the vCPU never starts): 'silent', not the deadline."""
    with QemuMachine([*BASE_ARGS, "-S"], tmp_path / "m") as m:
        t0 = time.monotonic()
        with pytest.raises(MachineStuck, match="console stayed empty for 1 s") as info:
            m.wait_console("never printed", timeout=30, silent_after_s=1.0)
        assert time.monotonic() - t0 < 10 and info.value.state == "silent"
        assert "CPU#0" in (tmp_path / "m" / "silent-registers.txt").read_text()  # real mode: EIP=, not RIP=


def test_qemu_dying_during_a_command_is_named_as_such(machine: QemuMachine) -> None:
    """A QEMU that aborts under a QMP command (seen: an assertion on an mce into a nested KVM
    guest) is reported as its death with status and stderr, not as a broken socket."""
    os.kill(machine.pid, signal.SIGKILL)
    with pytest.raises(QemuDied, match=r"exited with status -9 during QMP 'query-status'") as info:
        for _ in range(50):  # the socket may answer once more before the kernel closes it
            machine.qmp("query-status")
            time.sleep(0.05)
    assert info.value.returncode == -9


def test_trace_event_set_state(machine: QemuMachine) -> None:
    machine.trace_event_set_state("kvm_run_exit", True)
    state = machine.qmp("trace-event-get-state", name="kvm_run_exit")
    assert state[0]["state"] in {"enabled", "unavailable"}, state
    with pytest.raises(QmpCommandError) as err:
        machine.trace_event_set_state("no_such_trace_event", True)
    assert "no_such_trace_event" in err.value.desc


def test_mce_bad_inputs_refused_before_injection(machine: QemuMachine) -> None:
    mark = machine.event_mark()
    with pytest.raises(GpaOutOfRange) as err:
        machine.inject_mce("SRAO", 0x1_0000_0000)
    assert "0x100000000" in str(err.value) and "pc.ram" in str(err.value)
    assert any(end == 0xFFF_FFFF for _, end, _ in err.value.ram_ranges), err.value.ram_ranges
    with pytest.raises(ValueError, match=r"unknown MCE kind 'SRAX'.*SRAO, SRAR"):
        machine.inject_mce("SRAX", 0x200000)
    with pytest.raises(ValueError, match=r"bank 10 is invalid.*0\.\.9"):
        machine.inject_mce("SRAO", 0x200000, bank=10)
    with pytest.raises(ValueError, match=r"cpu index 1 does not exist.*\[0\]"):
        machine.inject_mce("SRAO", 0x200000, cpu=1)
    sent = [r["arguments"] for r in _transcript(machine) if r["dir"] == "cmd" and r["cmd"] ==
            "human-monitor-command"]
    assert not [a for a in sent if str(a["command-line"]).startswith("mce")], sent
    assert [e.name for e in machine.events[mark:]] == []
    assert MCE_MARKER not in machine.console_text()


def test_mce_kind_lookup() -> None:
    assert mce_kind("srar").name == "SRAR"
    with pytest.raises(ValueError, match="valid kinds: SRAO, SRAR"):
        mce_kind("AO")


def test_memory_failure_after_injection(machine: QemuMachine) -> None:
    hva = machine.gpa2hva(0x200000)
    assert hva > 0 and hva % 4096 == 0
    srao = machine.inject_mce("SRAO", 0x200000, bank=9)
    event = machine.wait_event("MEMORY_FAILURE", since=srao.event_mark, timeout=5)
    # MEMORY_FAILURE says QEMU queued the MCE: the guest's own console line is the proof
    # that guest code took #MC (the event alone is not evidence of recovery).
    assert event.data == {"recipient": "guest", "action": "inject",
                          "flags": {"action-required": False, "recursive": False}}, event
    assert srao.t_mono_before <= event.t_mono, (srao, event)
    assert not srao.guest_reset, srao.monitor_text
    machine.wait_console(MCE_MARKER, timeout=5)
    # A second MCE while MCIP is still set (the firmware never clears it): QEMU resets.
    srar = machine.inject_mce("SRAR", 0x200000)
    second = machine.wait_event("MEMORY_FAILURE", since=srar.event_mark, timeout=5)
    assert second.data["action"] == "reset" and srar.guest_reset, (second, srar)
    assert second.data["flags"] == {"action-required": True, "recursive": True}, second


def test_missing_binary(tmp_path: Path) -> None:
    with pytest.raises(QemuBinaryNotFound) as err:
        QemuMachine(BASE_ARGS, tmp_path / "m", binary="qemu-system-nonexistent").launch()
    assert "qemu-system-nonexistent" in str(err.value) and "PATH=" in str(err.value)
    with pytest.raises(QemuBinaryNotFound):
        QemuMachine(BASE_ARGS, tmp_path / "m", binary=str(tmp_path / "no-qemu")).launch()


def test_bad_argument_reports_stderr(tmp_path: Path) -> None:
    machine = QemuMachine([*BASE_ARGS, "-no-such-option"], tmp_path / "m")
    with pytest.raises(QemuLaunchError) as err:
        machine.launch()
    assert "-no-such-option: invalid option" in err.value.stderr
    assert "-no-such-option: invalid option" in str(err.value)
    assert err.value.returncode == 1
    assert "invalid option" in machine.stderr_log.read_text()
    assert machine.tag not in find_tagged_qemus().values(), "the failed QEMU is still running"
    assert not (tmp_path / "m" / "qmp.sock").exists()
    assert [t.name for t in threading.enumerate() if t.name.startswith("q")] == [], \
        "QMP loop or launcher thread outlived a failed launch"


def test_two_machines_get_distinct_bound_ssh_ports(tmp_path: Path) -> None:
    with QemuMachine([*BASE_ARGS, "-S"], tmp_path / "a") as a, \
            QemuMachine([*BASE_ARGS, "-S"], tmp_path / "b") as b:
        assert a.ssh_port != b.ssh_port
        for m in (a, b):
            inode = _listening_inode(m.ssh_port)
            assert inode is not None, f"nothing listens on 127.0.0.1:{m.ssh_port}"
            assert inode in _socket_inodes(m.pid), \
                f"port {m.ssh_port} is not bound by QEMU pid {m.pid}"
            with socket.create_connection(("127.0.0.1", m.ssh_port), timeout=2):
                pass


def test_qmp_timeout_and_shutdown_escalation(tmp_path: Path) -> None:
    machine = QemuMachine([*BASE_ARGS, "-S"], tmp_path / "m", ssh_forward_port=None)
    with machine:
        os.kill(machine.pid, signal.SIGSTOP)  # QEMU cannot answer any more
        t0 = time.monotonic()
        with pytest.raises(QmpTimeout):
            machine.qmp("query-status", qmp_timeout=0.5)
        assert time.monotonic() - t0 < 2
        with pytest.raises(MachineStateError):
            _ = machine.ssh_port
        status = machine.shutdown(timeout=0.5)  # quit times out, SIGTERM stays pending
    assert status == -signal.SIGKILL, f"expected SIGKILL escalation, got status {status}"
    assert not _alive(machine.pid)


def test_long_workdir_socket_elsewhere_and_removed(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with QemuMachine([*BASE_ARGS, "-S"], deep, ssh_forward_port=None) as machine:
        sock = machine.qmp_socket
        assert not sock.is_relative_to(deep) and sock.is_socket()
    assert not sock.parent.exists()


_CHILD = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    from qmp_helpers import QemuMachine
    box = []
    def launch():  # from a thread that then ends: PDEATHSIG must not fire with it
        box.append(QemuMachine(sys.argv[2:], Path(sys.argv[1])).launch())
    t = threading.Thread(target=launch); t.start(); t.join()
    print(box[0].pid, flush=True)
    time.sleep(60)
""")


def test_qemu_dies_with_sigkilled_launcher(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "m"), *BASE_ARGS,
                              "-S"], stdout=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout is not None
        qemu_pid = int(child.stdout.readline())
        time.sleep(0.5)
        assert _alive(qemu_pid), "QEMU died when its launching thread ended"
        t_kill = time.monotonic()
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        deadline = t_kill + 5
        while _alive(qemu_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(qemu_pid), f"QEMU {qemu_pid} outlived its SIGKILLed launcher by 5 s"
        print(f"QEMU gone {time.monotonic() - t_kill:.3f} s after launcher SIGKILL")
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
        reap_orphans()


def test_reap_orphans_kills_only_orphans(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    tag = f"gmemtest-{dead.pid}-{'0' * 12}"
    orphan = subprocess.Popen([QEMU, *BASE_ARGS, "-S", "-display", "none", "-name",
                               f"guest=orphan.{tag}"], stderr=subprocess.DEVNULL)
    try:
        with QemuMachine([*BASE_ARGS, "-S"], tmp_path / "m", ssh_forward_port=None) as ours:
            deadline = time.monotonic() + 5
            while orphan.pid not in find_tagged_qemus() and time.monotonic() < deadline:
                time.sleep(0.05)
            # Only this test's two QEMUs are judged: a parallel job's orphans are not ours to kill.
            killed = reap_orphans(only={orphan.pid, ours.pid})
            assert killed == [orphan.pid], f"expected to reap only {orphan.pid}, got {killed}"
            assert orphan.wait(5) == -signal.SIGKILL
            assert ours.running() and ours.status() == "prelaunch"
    finally:
        orphan.kill()
        orphan.wait()


def test_wait_event_stops_early_when_qemu_exits(tmp_path: Path) -> None:
    with QemuMachine([*BASE_ARGS, "-S"], tmp_path / "m", ssh_forward_port=None) as machine:
        mark = machine.event_mark()
        os.kill(machine.pid, signal.SIGTERM)
        t0 = time.monotonic()
        with pytest.raises(EventTimeout, match="QEMU exited with status 0"):
            machine.wait_event("MEMORY_FAILURE", since=mark, timeout=30)
        assert time.monotonic() - t0 < 5, "wait_event kept waiting after QEMU exited"
        shutdown = machine.wait_event("SHUTDOWN", since=mark, timeout=1)
        assert shutdown.data.get("reason") == "host-signal", shutdown


def test_qmp_to_a_dead_qemu_raises_the_projects_error(tmp_path: Path) -> None:
    """qemu.qmp's own errors (StateError, disconnects) never reach callers unwrapped."""
    with QemuMachine([*BASE_ARGS, "-S"], tmp_path / "m", ssh_forward_port=None) as machine:
        os.kill(machine.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while machine.running() and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(QemuError) as err:
            machine.qmp("query-status")
        assert type(err.value).__module__ == "qmp_helpers.errors", repr(err.value)
        assert "query-status" in str(err.value)


def test_wait_console_ends_at_a_stuck_run_state(machine: QemuMachine) -> None:
    """A VM that stopped (here: paused; under KVM: internal-error) is reported as such at once."""
    machine.qmp("stop")
    with pytest.raises(MachineStateError, match=r"the VM stopped in state 'paused' \(QEMU says: ") as caught:
        machine.wait_console("NEVER-PRINTED", timeout=60, stuck_states=("paused", *STUCK_RUN_STATES))
    assert "not within" not in str(caught.value)
