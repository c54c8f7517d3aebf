"""Fixtures for qmp_helpers tests: real QEMU, TCG, no guest kernel."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from qmp_test_support import BASE_ARGS, QEMU, READY_MARKER, write_firmware

from qmp_helpers import QemuMachine


@pytest.fixture(scope="session", autouse=True)
def _need_qemu() -> None:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not on PATH: install QEMU (see README) to run these tests")


@pytest.fixture
def firmware(tmp_path: Path) -> Path:
    return write_firmware(tmp_path / "fw.bin")


@pytest.fixture
def machine(tmp_path: Path, firmware: Path) -> Iterator[QemuMachine]:
    """A running machine whose firmware sets CR4.MCE and reports #MC on the console."""
    with QemuMachine([*BASE_ARGS, "-bios", str(firmware)], tmp_path / "m") as m:
        m.wait_console(READY_MARKER, timeout=10)
        yield m
