"""SigbusWitness on child programs that really receive SIGBUS with known fields.

Each child (sigbus_child.py) announces the address it will fault on, the witness attaches,
the child faults. The witness must record the kernel's siginfo, and the child must behave
exactly as it would untraced: its handler runs and sees the same fields (exit 42), or,
without a handler, it dies of SIGBUS.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytest

from host_stack import mm_uapi as m
from host_stack.witness import SigbusWitness, WitnessError, decode_siginfo

CHILD = Path(__file__).with_name("sigbus_child.py")
HANDLER_EXIT = 42


class Child:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"child {args} printed nothing; exit {self.proc.poll()}"
        self.ready: dict[str, Any] = json.loads(line)
        assert self.ready["event"] == "ready", self.ready

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def finish(self) -> tuple[int, list[dict[str, Any]]]:
        assert self.proc.stdout is not None and self.proc.stdin is not None
        out = self.proc.stdout.read().decode()
        rc = self.proc.wait(30)
        self.proc.stdin.close()
        self.proc.stdout.close()
        return rc, [json.loads(line) for line in out.splitlines()]


@contextmanager
def child(*args: str) -> Iterator[Child]:
    c = Child(*args)
    try:
        yield c
    finally:
        if c.proc.poll() is None:
            c.proc.kill()
        c.proc.wait(30)
        for f in (c.proc.stdin, c.proc.stdout):
            if f is not None:
                f.close()


def run_witnessed(*args: str) -> tuple[Child, SigbusWitness, int, list[dict[str, Any]]]:
    with child(*args) as c:
        with SigbusWitness(c.pid) as w:
            c.go()
            w.wait_for(1, 20)
            status = w.wait_exit(20)
        _rc, events = c.finish()
    return c, w, status, [*events]


def _worker_tid(events: list[dict[str, Any]]) -> int:
    return int(next(e["tid"] for e in events if e["event"] == "worker"))


# The gmem variants load from a guest_memfd page the kernel will not fault in: they need a
# guest_memfd that can be mapped (skipped with the probed reason on a host without one).
GMEM = (pytest.mark.kvm, pytest.mark.host_requires("kvm", "guest_memfd", "guest_memfd_mmap"))
CASES = [
    pytest.param("truncated", "main", id="truncated-main"),
    pytest.param("truncated", "thread", id="truncated-thread-before-attach"),
    pytest.param("truncated", "clone", id="truncated-thread-after-attach"),
    pytest.param("gmem", "main", marks=GMEM, id="gmem-mmap-no-init-shared"),
    pytest.param("gmem", "clone", marks=GMEM, id="gmem-thread"),
]


@pytest.mark.parametrize(("kind", "threading_mode"), CASES)
def test_witness_records_and_handler_sees_same_fields(kind: str, threading_mode: str) -> None:
    c, w, status, events = run_witnessed(kind, threading_mode, "handler")
    seen = [e for e in events if e["event"] == "sigbus"]
    assert len(seen) == 1, f"expected the child's handler to run once, got {events}"
    handler = seen[0]
    assert len(w.records) == 1, f"expected 1 witnessed SIGBUS, got {w.records}"
    rec = w.records[0]
    tid = _worker_tid(events)
    # The kernel's answer for a load past EOF / from a gmem page it will not fault in.
    assert (rec.si_signo, rec.si_code, rec.si_addr) == (m.SIGBUS, m.BUS_ADRERR, c.ready["addr"])
    assert rec.tid == tid, f"expected SIGBUS on faulting thread {tid}, witness saw {rec.tid}"
    if threading_mode != "main":
        assert tid != c.pid, "the faulting thread must not be the leader in this variant"
    # The target saw exactly what the witness saw: the witness changed nothing.
    assert (handler["si_code"], handler["si_addr"], handler["si_addr_lsb"], handler["tid"]) == (
        rec.si_code, rec.si_addr, rec.si_addr_lsb, rec.tid,
    )  # fmt: skip
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == HANDLER_EXIT, hex(status)
    assert c.proc.returncode == HANDLER_EXIT, "the real parent must still reap the exit code"


@pytest.mark.parametrize(("kind", "threading_mode"), CASES)
def test_child_without_handler_still_dies_of_sigbus(kind: str, threading_mode: str) -> None:
    c, w, status, _events = run_witnessed(kind, threading_mode, "none")
    assert [r.si_addr for r in w.records] == [c.ready["addr"]]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, hex(status)
    assert c.proc.returncode == -signal.SIGBUS, f"expected -7, got {c.proc.returncode}"


def test_other_signals_pass_through_unchanged() -> None:
    with child("truncated", "main", "handler") as c, SigbusWitness(c.pid) as w:
        os.kill(c.pid, signal.SIGUSR1)  # default action: terminate
        status = w.wait_exit(20)
        rc, _ = c.finish()
    assert w.records == []
    assert (c.pid, signal.SIGUSR1) in w.other_signals, w.other_signals
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGUSR1, hex(status)
    assert rc == -signal.SIGUSR1


def _tracer_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no TracerPid line for pid {pid}")


def test_detach_leaves_target_untraced_and_unchanged() -> None:
    with child("truncated", "thread", "handler") as c:
        with SigbusWitness(c.pid) as w:
            tids = [int(t) for t in os.listdir(f"/proc/{c.pid}/task")]
            assert [_tracer_pid(t) for t in tids] == [w.tracer_pid] * len(tids)
        assert [_tracer_pid(t) for t in tids] == [0] * len(tids), "detach must untrace all"
        c.go()
        rc, events = c.finish()
    assert w.records == [], "no SIGBUS happened while attached"
    assert rc == HANDLER_EXIT and any(e["event"] == "sigbus" for e in events), events


def test_attach_to_missing_process_fails_with_reason() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)  # reaped: the pid no longer names a process
    with pytest.raises(WitnessError, match=f"pid {proc.pid}"):
        SigbusWitness(proc.pid).start()


def test_decode_siginfo_layout() -> None:
    raw = bytearray(m.SIGINFO_SIZE)
    raw[0:4] = (7).to_bytes(4, "little")
    raw[8:12] = m.BUS_MCEERR_AR.to_bytes(4, "little")
    raw[16:24] = (0x7F0012345000).to_bytes(8, "little")
    raw[24:26] = (21).to_bytes(2, "little")
    rec = decode_siginfo(bytes(raw), 1, 2)
    assert (rec.si_signo, rec.code_name, rec.si_addr, rec.si_addr_lsb) == (
        7, "BUS_MCEERR_AR", 0x7F0012345000, 21,
    )  # fmt: skip
    with pytest.raises(ValueError, match="128 bytes"):
        decode_siginfo(bytes(64), 1, 2)


def _state(tid: int) -> str:
    return Path(f"/proc/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_group_stop_is_kept_and_sigcont_resumes() -> None:
    """SIGSTOP must stop the target as untraced (no SIGBUS while stopped), SIGCONT resume it."""
    with child("truncated", "thread", "handler") as c, SigbusWitness(c.pid) as w:
        os.kill(c.pid, signal.SIGSTOP)
        tids = os.listdir(f"/proc/{c.pid}/task")
        deadline = time.monotonic() + 10
        while any(_state(int(t)) not in ("t", "T") for t in tids):
            assert time.monotonic() < deadline, [_state(int(t)) for t in tids]
            time.sleep(0.01)
        c.go()
        with pytest.raises(TimeoutError, match=r"expected 1 SIGBUS .* saw 0"):
            w.wait_for(1, 0.3)  # stopped: the worker cannot fault yet
        os.kill(c.pid, signal.SIGCONT)
        (rec,) = w.wait_for(1, 20)
        status = w.wait_exit(20)
        rc, events = c.finish()
    assert rec.tid == _worker_tid(events) and rec.si_addr == c.ready["addr"]
    assert os.WEXITSTATUS(status) == HANDLER_EXIT and rc == HANDLER_EXIT
    assert signal.SIGSTOP in {sig for _tid, sig in w.other_signals}


CALLER = """
import sys
from host_stack.witness import SigbusWitness
w = SigbusWitness(int(sys.argv[1]))
w.start()
print(w.tracer_pid, w._agent_stderr.name, flush=True)
import os
os._exit(0)  # die while witnessing (its temporary stderr file stays for the test to read)
"""
PR_SET_CHILD_SUBREAPER = 36


def _reap_within(pid: int, timeout: float) -> int:
    """waitpid with a deadline: a tracer that never detaches fails the test, never hangs it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"expected the orphaned tracer {pid} to detach and exit within {timeout}s; killed it")


def test_tracer_detaches_when_its_caller_dies() -> None:
    """A crashed caller must not leave its target traced; the orphaned tracer detaches."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0  # so we can reap the tracer
    try:
        with child("truncated", "thread", "handler") as c:
            out = subprocess.run(
                [sys.executable, "-c", CALLER, str(c.pid)],
                capture_output=True, text=True, check=True, timeout=30,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
            )  # fmt: skip
            agent_pid, stderr_name = out.stdout.split()
            stderr_path = Path(stderr_name)
            status = _reap_within(int(agent_pid), 30.0)  # reparented to us; exits after detaching
            agent_stderr = stderr_path.read_text(errors="replace")
            stderr_path.unlink()
            tids = [int(t) for t in os.listdir(f"/proc/{c.pid}/task")]
            assert [_tracer_pid(t) for t in tids] == [0] * len(tids)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (
                f"expected the orphaned tracer to exit 0 after detaching, got wait status {status:#x}; "
                f"its stderr: {agent_stderr!r}"
            )
            c.go()
            rc, events = c.finish()
        assert rc == HANDLER_EXIT and any(e["event"] == "sigbus" for e in events), events
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def test_a_crashing_tracer_fails_attach_with_its_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracer's stderr (its traceback) is kept in the error, not lost on a terminal."""
    tracer = tmp_path / "tracer.sh"
    tracer.write_text("#!/bin/sh\necho 'Traceback: ptrace exploded' >&2\nexit 1\n")
    tracer.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tracer))
    t0 = time.monotonic()
    with pytest.raises(WitnessError) as exc:
        SigbusWitness(os.getpid(), attach_timeout=5.0).start()
    assert "Traceback: ptrace exploded" in str(exc.value), str(exc.value)
    assert "exited with status 1" in str(exc.value)
    assert time.monotonic() - t0 < 5.0, "expected the tracer's death to be noticed before the attach timeout"


def test_a_caller_that_dies_right_after_attach_is_still_noticed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracer learns its caller before announcing the attach, not when its loop starts.

    Read at loop start, a caller that died in between (it exits as soon as it read "attached")
    was already replaced by the subreaper, and the tracer kept the target traced forever.
    """
    from host_stack import witness

    tracer = witness._Tracer(os.getpid(), lambda _event: None)  # the caller is known from here
    tracer.tids = {os.getpid()}
    detached: list[bool] = []
    monkeypatch.setattr(tracer, "detach_all", lambda: detached.append(True))
    # The caller died before loop() began: the tracer now sees its reaper as parent. Not
    # always pid 1: in the lab host's L1 this test's own parent *is* pid 1 (the L1 init).
    reaper = 1 if tracer.parent != 1 else tracer.parent + 1
    monkeypatch.setattr(os, "getppid", lambda: reaper)

    def no_children(*_args: object) -> NoReturn:
        raise ChildProcessError

    monkeypatch.setattr(os, "waitpid", no_children)
    tracer.loop()
    assert detached == [True], "expected the orphaned tracer to detach from its target"
