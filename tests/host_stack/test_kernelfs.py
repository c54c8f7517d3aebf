"""kernelfs.mounted(): a mount shared by parallel jobs survives until its last user leaves.

The mount path is always exercised with a scratch tmpfs at a temporary mount point and a
temporary lock directory, whether or not debugfs/tracefs happen to be mounted right now. The
second user is a separate process, as a parallel Avocado job would be.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_stack.kernelfs import _mount, _umount, find_mount, mounted

REPO = Path(__file__).resolve().parents[2]
MS_RDONLY = 1  # include/uapi/linux/mount.h
MS_REMOUNT = 32
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

_USER = """
import sys
from pathlib import Path
from host_stack.kernelfs import mounted
with mounted(("tmpfs", Path(sys.argv[1])), lock_dir=Path(sys.argv[2]), anywhere=False) as where:
    print("in", where, flush=True)
    sys.stdin.readline()
print("out", flush=True)
"""


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[tuple[tuple[str, Path], Path]]:
    target = tmp_path / "mnt"
    target.mkdir()
    locks = tmp_path / "locks"
    yield ("tmpfs", target), locks
    while find_mount("tmpfs", target) is not None:  # never leave a mount, even on failure
        _umount(target)


class _OtherJob:
    """A second process holding the scratch mount until told to leave."""

    def __init__(self, fs: tuple[str, Path], locks: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _USER, str(fs[1]), str(locks)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.split() == ["in", str(fs[1])], f"expected 'in {fs[1]}', got {line!r}"

    def leave(self) -> None:
        _out, err = self.proc.communicate("\n", timeout=30)
        assert self.proc.returncode == 0, f"expected the other job to exit 0, got {self.proc.returncode}: {err}"


def test_second_users_mount_survives_the_first_users_exit(scratch: tuple[tuple[str, Path], Path]) -> None:
    fs, locks = scratch
    assert find_mount("tmpfs", fs[1]) is None
    with mounted(fs, lock_dir=locks, anywhere=False) as where:
        assert where == fs[1]
        other = _OtherJob(fs, locks)  # joins the mount this job made
    assert find_mount("tmpfs", fs[1]) == fs[1], "expected the mount to stay while the other job uses it"
    other.leave()
    assert find_mount("tmpfs", fs[1]) is None, "expected the last user to unmount what gmemtest mounted"
    assert not (locks / "tmpfs.mounted").exists()


def test_first_job_mounts_and_the_last_one_out_unmounts(scratch: tuple[tuple[str, Path], Path]) -> None:
    fs, locks = scratch
    other = _OtherJob(fs, locks)  # the other process mounts it
    with mounted(fs, lock_dir=locks, anywhere=False) as where:
        assert where == fs[1]
        other.leave()
        assert find_mount("tmpfs", fs[1]) == fs[1], "expected the mount to stay while this job uses it"
    assert find_mount("tmpfs", fs[1]) is None


def test_a_mount_not_made_by_gmemtest_is_never_unmounted(scratch: tuple[tuple[str, Path], Path]) -> None:
    fs, locks = scratch
    _mount(*fs)
    with mounted(fs, lock_dir=locks, anywhere=False) as where:
        assert where == fs[1]
    assert find_mount("tmpfs", fs[1]) == fs[1], "expected somebody else's mount to stay"


def test_a_killed_runs_mount_is_cleaned_up_by_the_next_user(scratch: tuple[tuple[str, Path], Path]) -> None:
    fs, locks = scratch
    other = _OtherJob(fs, locks)
    other.proc.kill()  # SIGKILL: no clean-up ran; the kernel dropped its flocks
    other.proc.communicate(timeout=30)
    assert find_mount("tmpfs", fs[1]) == fs[1] and (locks / "tmpfs.mounted").exists()
    with mounted(fs, lock_dir=locks, anywhere=False) as where:
        assert where == fs[1]
    assert find_mount("tmpfs", fs[1]) is None and not (locks / "tmpfs.mounted").exists()


def test_a_stale_marker_without_a_mount_is_removed(scratch: tuple[tuple[str, Path], Path]) -> None:
    fs, locks = scratch
    locks.mkdir()
    (locks / "tmpfs.mounted").write_text("/nonexistent/mount\n")
    with mounted(fs, lock_dir=locks, anywhere=False) as where:
        assert where == fs[1]
        assert (locks / "tmpfs.mounted").read_text().strip() == str(fs[1])
    assert find_mount("tmpfs", fs[1]) is None


def test_a_job_that_may_not_create_lock_files_gets_what_is_mounted_without_error(
    scratch: tuple[tuple[str, Path], Path], tmp_path: Path
) -> None:
    """As for a non-root job: the lock directory exists but no lock file can be created.

    (Root bypasses permission bits, so a read-only file system stands in for them.)
    """
    fs, _locks = scratch
    ro = tmp_path / "ro"
    ro.mkdir()
    _mount("tmpfs", ro)
    try:
        (ro / "gmemtest").mkdir()
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mount(b"nodev", os.fsencode(ro), b"tmpfs", MS_REMOUNT | MS_RDONLY, None) == 0, ctypes.get_errno()
        with mounted(fs, lock_dir=ro / "gmemtest", anywhere=False) as where:
            assert where is None, f"expected no mount without lock files, got {where}"
        assert find_mount("tmpfs", fs[1]) is None
    finally:
        _umount(ro)
