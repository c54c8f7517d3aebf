"""Guests restored from a snapshot, for real: their own QEMU, their own RNG and clock, no shared poison.

Each test uses a private snapshot cache (tmp_path), so the first guest is always a real boot
that saves, and every later one is a restore from that save.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gmemtest.guest_run import GuestRun, booted_guest
from gmemtest.observations import parse_hardware_corrupted_kb
from gmemtest.runner import run_scenario
from gmemtest.scenarios import get_scenario
from gmemtest.snapshots import SnapshotCache
from images.build import GuestImage, build_default_image
from qmp_helpers import find_tagged_qemus

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

KPF_HWPOISON = 19  # include/uapi/linux/kernel-page-flags.h


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_default_image()


@pytest.fixture
def cache(tmp_path: Path) -> SnapshotCache:
    return SnapshotCache(tmp_path / "cache")


def _random_hex(guest: GuestRun) -> str:
    return guest.guest_text("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'")


def _kpageflags(guest: GuestRun, pfn: int) -> int:
    word = guest.guest_text(f"dd if=/proc/kpageflags bs=8 skip={pfn} count=1 2>/dev/null | od -An -tx8").strip()
    return int(word, 16)


def test_restored_guests_are_their_own(image: GuestImage, cache: SnapshotCache, tmp_path: Path) -> None:
    with booted_guest(image, tmp_path / "g0", cache=cache) as g0:
        assert g0.boot.mode == "boot+save", g0.boot
        assert g0.boot.snapshot is not None and g0.boot.snapshot["size_bytes"] > 1 << 20
        saver_pid = g0.machine.pid
        saver_random = _random_hex(g0)
        boot_log = g0.guest_text("dmesg | head -5")
    seen: list[tuple[int, str, str]] = []
    for name in ("r1", "r2"):
        with booted_guest(image, tmp_path / name, cache=cache) as guest:
            record = json.loads((tmp_path / name / "boot.json").read_text())
            assert record["mode"] == "restore", record
            assert record["snapshot"]["key"] == g0.boot.snapshot["key"]
            assert record["snapshot"]["age_s"] >= 0
            refresh = record["refresh"]
            assert refresh["skew_before_s"] < 0, f"the snapshot's clock must lag the host: {refresh}"
            assert abs(refresh["skew_after_s"]) < 1.0, f"expected the clock stepped to within 1 s: {refresh}"
            assert refresh["entropy_bytes"] == 32
            seen.append((guest.machine.pid, guest.guest_text("dmesg | head -5"), _random_hex(guest)))
            assert guest.guest_text("uname -r").strip() == image.kernel_release
    pids = [pid for pid, _, _ in seen]
    assert len({saver_pid, *pids}) == 3, f"each guest must be its own QEMU process: {saver_pid}, {pids}"
    assert seen[0][1] == seen[1][1] == boot_log, "every restored guest is the saver's one boot (same boot log)"
    randoms = [saver_random, seen[0][2], seen[1][2]]
    assert len(set(randoms)) == 3, f"restored guests repeated random bytes: {randoms}"
    assert not (set(find_tagged_qemus()) & {saver_pid, *pids}), "a guest's QEMU outlived its context"


def test_poison_in_one_restored_guest_is_not_in_the_next(image: GuestImage, cache: SnapshotCache,
                                                         tmp_path: Path) -> None:
    with booted_guest(image, tmp_path / "prime", cache=cache) as prime:
        assert prime.boot.mode == "boot+save"
    spec = get_scenario("srao-early-kill-prctl-4k")
    with booted_guest(image, tmp_path / "poisoned", cache=cache) as first:
        assert first.boot.mode == "restore"
        result = run_scenario(spec, first, tmp_path / "poisoned")
        assert result.verdict.passed, result.verdict.summary()
        pfns = [line.pfn for line in result.observations.recovery_lines]
        assert pfns, "the scenario's guest recovered no page"
        assert (result.observations.hardware_corrupted_after_kb or 0) > 0
        assert all(_kpageflags(first, pfn) >> KPF_HWPOISON & 1 for pfn in pfns)
    with booted_guest(image, tmp_path / "next", cache=cache) as second:
        assert second.boot.mode == "restore"
        corrupted = parse_hardware_corrupted_kb(second.guest_text("cat /proc/meminfo"))
        assert corrupted == 0, f"expected HardwareCorrupted 0 kB in the next restored guest, got {corrupted}"
        flags = {pfn: _kpageflags(second, pfn) for pfn in pfns}
        assert not any(f >> KPF_HWPOISON & 1 for f in flags.values()), f"KPF_HWPOISON carried over: {flags}"


def test_a_changed_argv_is_a_miss(image: GuestImage, cache: SnapshotCache, tmp_path: Path) -> None:
    with booted_guest(image, tmp_path / "a", cache=cache) as first:
        assert first.boot.mode == "boot+save"
    with booted_guest(image, tmp_path / "b", cache=cache, extra_kernel_args=("gmemtest.variant=1",)) as other:
        assert other.boot.mode == "boot+save", "another kernel command line must not restore the first snapshot"
        assert "gmemtest.variant=1" in other.guest_text("cat /proc/cmdline")
    with booted_guest(image, tmp_path / "c", cache=cache, snapshot=False) as off:
        assert off.boot.mode == "boot" and off.boot.not_saved is not None
        assert "GMEMTEST-READY" in off.machine.console_text()
    assert len(cache.entries()) == 2


def test_a_corrupt_snapshot_falls_back_to_a_boot(image: GuestImage, cache: SnapshotCache, tmp_path: Path) -> None:
    with booted_guest(image, tmp_path / "a", cache=cache) as first:
        assert first.boot.mode == "boot+save" and first.boot.snapshot is not None
        state = Path(first.boot.snapshot["path"])
    size = state.stat().st_size
    with state.open("r+b") as fh:  # same size, so only QEMU's load can tell
        fh.write(os.urandom(4096))
    assert state.stat().st_size == size
    with booted_guest(image, tmp_path / "b", cache=cache) as guest:
        assert guest.boot.mode == "boot+save", guest.boot
        assert guest.boot.fallback is not None and "MigrationError" in guest.boot.fallback, guest.boot.fallback
        why = (tmp_path / "b" / "restore-failed" / "why.txt").read_text()
        assert "MigrationError" in why
        assert (tmp_path / "b" / "restore-failed" / "qemu-stderr.log").is_file()
        assert guest.guest_text("echo ok").strip() == "ok"
    with booted_guest(image, tmp_path / "c", cache=cache) as again:
        assert again.boot.mode == "restore", "the fallback's fresh save must be usable"
