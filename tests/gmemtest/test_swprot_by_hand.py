"""The README's by-hand conversion in a software-protected VM, run as written.

The README block is ``gmemtest labhost run --kvm sw-protected ... -- sh -c '<script>'``. This test
runs inside that very setting, the lab host's private-memory batch (``gmemtest.lab.batch``
``PRIVATE_PATHS``: L1 on its rebuilt KVM, the checkout as the working directory), and gives the
block's ``<script>`` to ``sh`` unchanged: the kvm-swprot row is judged and kept, QMP converts a
page and reads QEMU's record back, a bad request is refused by name, and Ctrl-C (SIGINT) leaves no
QEMU behind. On a host without VM type 1 it is skipped with the probed reason (the batch refuses
that skip inside L1).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from qmp_helpers import find_tagged_qemus

REPO = Path(__file__).resolve().parents[2]
MARKER = "<!-- by-hand: kvm-swprot"


def readme_block() -> tuple[list[str], str]:
    """(the host command's words before the script, the script) of the README's marked block."""
    text = (REPO / "README.md").read_text()
    after = text[text.index(MARKER):]
    block = re.search(r"```sh\n(.*?)```", after, re.DOTALL)
    assert block is not None, "no sh block after the by-hand marker in README.md"
    words = shlex.split(block.group(1))
    return words[:-1], words[-1]


def test_the_readme_block_is_a_labhost_run_on_the_sw_protected_kvm() -> None:
    host, script = readme_block()
    assert host[:4] == ["gmemtest", "labhost", "run", "--kvm"] and host[4] == "sw-protected", host
    assert host[-2:] == ["sh", "-c"] and "--qemu project" in script and "x-kvm-convert-memory" in script


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.host_requires("kvm", "kvm_boots_linux", "sw_protected_vm")
def test_the_readme_by_hand_conversion_runs_as_written() -> None:
    _host, script = readme_block()
    before = set(find_tagged_qemus())
    done = subprocess.run(["sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=280, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "private-srar-user-spin-4k: PASS" in out and "guest kept up" in out, out[-3000:]
    assert out.count('"return": {}') == 2, out[-3000:]
    assert '"gpa": 458752' in out and '"size": 4096' in out, out[-3000:]
    assert "gpa 0x70800 is not aligned to the page size 0x1000" in out, out[-3000:]
    assert set(find_tagged_qemus()) <= before, f"QEMU left running: {find_tagged_qemus()}"
