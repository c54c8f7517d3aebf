"""The lab host and snapshots, for real: why a booted L1 cannot be saved, and that a held one can.

Both boot the real lab-host image under TCG (about 7 s to READY here).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gmemtest.lab.host import booted_labhost
from gmemtest.lab.snapshot import labhost_snapshot_trial
from images.labhost import LabhostImage, build_labhost_image
from qmp_helpers import MigrationError, find_tagged_qemus, save_state

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="module")
def labhost_image() -> LabhostImage:
    return build_labhost_image()


@pytest.mark.timeout(240)
def test_a_booted_lab_host_refuses_to_be_saved(tmp_path: Path, labhost_image: LabhostImage) -> None:
    with booted_labhost(labhost_image, tmp_path / "w", share_dir=tmp_path / "share") as run:
        with pytest.raises(MigrationError) as caught:
            save_state(run.machine, tmp_path / "l1.state")
        assert caught.value.status == "refused", caught.value
        assert "VirtFS" in caught.value.detail and "mounted" in caught.value.detail, caught.value.detail
        run.machine.qmp("cont")
        assert run.run(["true"], 60).returncode == 0, "L1 must go on after the refused save"


@pytest.mark.timeout(300)
def test_a_held_lab_host_restores_with_working_nested_kvm(tmp_path: Path, labhost_image: LabhostImage) -> None:
    trial = labhost_snapshot_trial(labhost_image, tmp_path / "t", restores=1, cwd=Path.cwd())
    assert trial["hold_line"].startswith("GMEMTEST-LABHOST-HOLD 1s"), trial
    assert trial["state_bytes"] > 1 << 20
    (restore,) = trial["restores"]
    assert restore["ready_line"].startswith("GMEMTEST-LABHOST-READY kvm=yes hwpoison_inject=yes"), restore
    assert restore["nested_check_rc"] == 0, restore
    assert restore["nested_check"][0].startswith("nested KVM_RUN: guest_memfd reads 14 mismatches 0"), restore
    assert not (tmp_path / "t" / "l1.state").exists(), "the trial's state file is removed"
    assert not [pid for pid in find_tagged_qemus() if str(tmp_path) in _cmdline(pid)], "a QEMU outlived the trial"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:  # gone while we looked: not ours to worry about
        return ""
