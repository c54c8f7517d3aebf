"""The default image (real probe) boots under TCG to SSH, with the generated key."""

from __future__ import annotations

import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest

from images.build import build_default_image
from images.measure_boot import measure_once

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def _qemu_processes(marker: str) -> set[str]:
    """QEMU processes whose arguments name ``marker`` (this session's private initrd)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True,
                         check=True).stdout
    return {line.split(None, 1)[0] for line in out.splitlines()
            if "qemu-system" in line and marker in line}


def test_boot_to_ssh_uname_matches_release(image_cache: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not on PATH")
    image = build_default_image(image_cache)
    timing = measure_once(image, "tcg-default", timeout_s=90)
    assert timing.uname == image.kernel_release, (
        f"guest uname -r: expected {image.kernel_release}, got {timing.uname!r}")
    assert timing.ready_s <= timing.ssh_s
    leaked = _qemu_processes(str(image.initrd))
    assert not leaked, f"QEMU processes left running: {leaked}"
