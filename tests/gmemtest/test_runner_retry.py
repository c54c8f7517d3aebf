"""run_in_fresh_guest's retries, with the guest replaced by a stand-in (no QEMU).

The stand-in raises what a real boot raises when a nested guest's KVM stops at boot
(MachineStuck with state internal-error, seen under nested SVM in the lab host): the runner
must retry once, keep the stuck attempt's evidence, and give up on a second one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gmemtest import runner
from gmemtest.scenarios import get_scenario
from guests.ssh import CommandTimeoutError
from qmp_helpers import MachineStuck, QmpEvent


def _stand_in(outcomes: list[str]) -> Any:
    @contextmanager
    def booted(image: object, outdir: Path, **_: object) -> Iterator[str]:
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / "console.log").write_text(f"attempt {len(outcomes)}\n")
        if outcomes.pop(0) == "stuck":
            raise MachineStuck("the VM stopped in state 'internal-error' (QEMU says: 'KVM internal error. "
                               "Suberror: 3')", state="internal-error")
        yield "guest"

    return booted


def test_a_stuck_vm_is_retried_once_and_its_evidence_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "booted_guest", _stand_in(["stuck", "ok"]))
    monkeypatch.setattr(runner, "run_scenario", lambda spec, guest, outdir: ("judged", guest))
    result = runner.run_in_fresh_guest(get_scenario("srao-late-touch-4k"), object(), tmp_path)  # type: ignore[arg-type]
    assert result == ("judged", "guest")
    kept = tmp_path / "stuck-attempt-1"
    assert "internal-error" in (kept / "why.txt").read_text()
    assert (kept / "console.log").read_text() == "attempt 2\n", "the stuck attempt's console moved aside"


def test_a_second_stuck_vm_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "booted_guest", _stand_in(["stuck", "stuck", "ok"]))
    monkeypatch.setattr(runner, "run_scenario", lambda spec, guest, outdir: ("judged", guest))
    with pytest.raises(MachineStuck) as caught:
        runner.run_in_fresh_guest(get_scenario("srao-late-touch-4k"), object(), tmp_path)  # type: ignore[arg-type]
    assert caught.value.state == "internal-error"
    assert (tmp_path / "stuck-attempt-1" / "why.txt").is_file()


class _Machine:
    """What guest_reset_itself reads of a machine: its QMP events, stderr and console."""

    def __init__(self, events: list[QmpEvent], stderr: str) -> None:
        self.events, self._stderr = events, stderr

    def stderr_since(self, mark: int) -> str:
        return self._stderr[mark:]

    def console_text(self) -> str:
        return "[   11.099640] MCE: Killing gmem-probe:114 due to hardware memory corruption fault at 7f5eafc56010\n"


class _Guest:
    def __init__(self, machine: _Machine) -> None:
        self.machine = machine


# Recorded inside the lab host (QEMU 11.1.3, L1 Debian 7.3.4, host-ao-reset-4k): the L2 triple-faulted
# about 2 s after the forwarded AO was recovered, while the runner read the guest's trace buffer.
SELF_RESET = _Machine([QmpEvent("MEMORY_FAILURE", {"recipient": "guest", "action": "inject"}, 1.0),
                       QmpEvent("RESET", {"guest": True, "reason": "guest-reset"}, 2.8)],
                      "kvm_run_exit cpu_index 0, reason 2\nkvm_run_exit cpu_index 0, reason 8\n")


def test_only_a_reset_of_the_guests_own_counts() -> None:
    why = runner.guest_reset_itself(_Guest(SELF_RESET))  # type: ignore[arg-type]
    assert why is not None and "QMP RESET reason 'guest-reset', 1 time(s)" in why
    assert "KVM_EXIT_SHUTDOWN (a triple fault) on vCPU 0" in why
    ours = _Machine([QmpEvent("RESET", {"guest": False, "reason": "host-qmp-system-reset"}, 2.0)], "")
    assert runner.guest_reset_itself(_Guest(ours)) is None  # type: ignore[arg-type]


def _resetting_row(resets: list[bool]) -> Any:
    def run(spec: object, guest: object, outdir: Path) -> object:
        if resets.pop(0):
            raise CommandTimeoutError("command 'cat /sys/kernel/tracing/trace' did not finish within 20.0s")
        return ("judged", guest)

    return run


@pytest.fixture
def self_resetting_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    @contextmanager
    def booted(image: object, outdir: Path, **_: object) -> Iterator[object]:
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / "console.log").write_text("boot\n")
        yield _Guest(SELF_RESET)

    monkeypatch.setattr(runner, "booted_guest", booted)


@pytest.mark.usefixtures("self_resetting_guest")
def test_a_guest_that_reset_itself_is_retried_once_with_its_evidence(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "run_scenario", _resetting_row([True, False]))
    result = runner.run_in_fresh_guest(get_scenario("srao-late-touch-4k"), object(), tmp_path)  # type: ignore[arg-type]
    assert result[0] == "judged"
    why = (tmp_path / "guest-reset-attempt-1" / "why.txt").read_text()
    assert "the guest reset on its own" in why and "then: CommandTimeoutError" in why


@pytest.mark.usefixtures("self_resetting_guest")
def test_a_second_self_reset_fails_the_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "run_scenario", _resetting_row([True, True, False]))
    with pytest.raises(runner.GuestResetItself, match="KVM_EXIT_SHUTDOWN"):
        runner.run_in_fresh_guest(get_scenario("srao-late-touch-4k"), object(), tmp_path)  # type: ignore[arg-type]


def test_an_error_without_a_self_reset_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    @contextmanager
    def booted(image: object, outdir: Path, **_: object) -> Iterator[object]:
        outdir.mkdir(parents=True, exist_ok=True)
        yield _Guest(_Machine([QmpEvent("RESET", {"guest": False, "reason": "host-qmp-system-reset"}, 2.0)], ""))

    monkeypatch.setattr(runner, "booted_guest", booted)
    monkeypatch.setattr(runner, "run_scenario", _resetting_row([True, False]))
    with pytest.raises(CommandTimeoutError):
        runner.run_in_fresh_guest(get_scenario("srao-late-touch-4k"), object(), tmp_path)  # type: ignore[arg-type]
    assert not list(tmp_path.glob("guest-reset-attempt-*"))
