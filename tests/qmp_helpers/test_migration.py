"""save_state / load_state against a real QEMU running the tiny firmware.

The firmware writes its ready line once and halts; a state loaded into a fresh QEMU must come
back running with that console behind it (the new console file stays empty: the line was
printed before the save), and a broken file must leave a QEMU that answers with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from qmp_test_support import BASE_ARGS, READY_MARKER

from qmp_helpers import MachineStateError, MigrationError, QemuMachine, load_state, save_state


@pytest.fixture
def saved(tmp_path: Path, firmware: Path) -> tuple[list[str], Path]:
    args = [*BASE_ARGS, "-bios", str(firmware)]
    state = tmp_path / "state"
    with QemuMachine(args, tmp_path / "src", ssh_forward_port=None) as src:
        src.wait_console(READY_MARKER, timeout=10)
        record = save_state(src, state)
        assert record.size_bytes == state.stat().st_size > 0
        assert src.status() == "postmigrate", "the source stays paused after the save"
        src.qmp("cont")
        assert src.status() == "running", "a saved source can be resumed"
    return args, state


def test_a_saved_state_loads_into_a_fresh_qemu(saved: tuple[list[str], Path], tmp_path: Path) -> None:
    args, state = saved
    with QemuMachine(args, tmp_path / "dst", ssh_forward_port=None, incoming=True) as dst:
        assert dst.status() == "inmigrate"
        assert "-incoming" in dst.args and "-incoming" not in dst.stable_argv()
        record = load_state(dst, state)
        assert record.seconds > 0
        assert dst.status() == "running"
        assert READY_MARKER not in dst.console_text(), "the firmware ran before the save, not again"


def test_a_corrupt_state_is_refused_and_qemu_says_why(saved: tuple[list[str], Path], tmp_path: Path) -> None:
    args, state = saved
    with state.open("r+b") as fh:
        fh.write(os.urandom(64))
    with QemuMachine(args, tmp_path / "dst", ssh_forward_port=None, incoming=True) as dst:
        with pytest.raises(MigrationError) as caught:
            load_state(dst, state, timeout=20)
        assert caught.value.status == "failed" and caught.value.detail, caught.value
        assert dst.running(), "exit-on-error=false keeps QEMU up to answer"


def test_bad_requests_are_named(saved: tuple[list[str], Path], tmp_path: Path) -> None:
    args, state = saved
    with QemuMachine(args, tmp_path / "plain", ssh_forward_port=None) as plain:
        with pytest.raises(MachineStateError, match="not launched with incoming=True"):
            load_state(plain, state)
        with pytest.raises(ValueError, match="free of commas"):
            save_state(plain, tmp_path / "a,b")
    with (QemuMachine(args, tmp_path / "dst", ssh_forward_port=None, incoming=True) as dst,
          pytest.raises(MigrationError, match="does not exist")):
        load_state(dst, tmp_path / "missing")
