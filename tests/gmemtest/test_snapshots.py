"""The snapshot cache's key and protocol, on real files (no QEMU needed).

What a key must cover: a changed argv word, a changed file the argv names, a changed image
manifest or a different QEMU binary is a miss; a different work directory, name or tag (the
per-run parts) is the same guest.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from gmemtest.snapshots import SNAPSHOT_POINT, SnapshotCache, SnapshotKey, snapshot_key
from qmp_helpers import QemuMachine


def _fake_qemu(path: Path, version: str) -> Path:
    path.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version}'\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"kernel-1")
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"key": "a"}\n')
    return {"kernel": kernel, "manifest": manifest, "qemu": _fake_qemu(tmp_path / "qemu", "10.0.2")}


def _key(inputs: dict[str, Path], tmp_path: Path, *extra: str, name: str = "g", incoming: bool = False,
         qemu: Path | None = None) -> SnapshotKey:
    args = ["-accel", "tcg", "-m", "512", "-kernel", str(inputs["kernel"]), *extra]
    machine = QemuMachine(args, tmp_path / f"work-{name}", binary=str(qemu or inputs["qemu"]), name=name,
                          incoming=incoming)
    return snapshot_key(machine.stable_argv(), inputs["manifest"])


def test_per_run_parts_do_not_change_the_key(inputs: dict[str, Path], tmp_path: Path) -> None:
    first = _key(inputs, tmp_path, name="one")
    assert _key(inputs, tmp_path, name="two").digest == first.digest
    assert _key(inputs, tmp_path, name="three", incoming=True).digest == first.digest
    assert first.inputs["snapshot_point"] == SNAPSHOT_POINT
    assert first.inputs["files"] == {str(inputs["kernel"]): hashlib.sha256(b"kernel-1").hexdigest()}
    assert "-incoming" not in first.inputs["argv"]


def test_every_input_is_in_the_key(inputs: dict[str, Path], tmp_path: Path) -> None:
    base = _key(inputs, tmp_path).digest
    assert _key(inputs, tmp_path, "-smp", "2").digest != base, "profile argv changed"
    inputs["kernel"].write_bytes(b"kernel-2")
    os.utime(inputs["kernel"], ns=(time.time_ns(), time.time_ns() + 1000))
    changed_kernel = _key(inputs, tmp_path).digest
    assert changed_kernel != base, "a file the argv names changed"
    inputs["manifest"].write_text('{"key": "b"}\n')
    changed_manifest = _key(inputs, tmp_path).digest
    assert changed_manifest != changed_kernel, "the image manifest changed"
    other = _fake_qemu(tmp_path / "qemu-other", "11.1.3")
    assert _key(inputs, tmp_path, qemu=other).digest != changed_manifest, "another QEMU binary"


def _writer(payload: bytes, delay: float = 0.0):  # type: ignore[no-untyped-def]
    def write(path: Path) -> float:
        time.sleep(delay)
        path.write_bytes(payload)
        return delay

    return write


def test_save_lookup_drop(inputs: dict[str, Path], tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "cache")
    key = _key(inputs, tmp_path)
    assert cache.lookup(key) is None
    snap = cache.save(key, _writer(b"x" * 100))
    assert snap is not None and snap.size_bytes == 100 and snap.key == key.digest
    found = cache.lookup(key)
    assert found is not None and found.state.read_bytes() == b"x" * 100 and found.age_s >= 0
    called = []
    assert cache.save(key, lambda p: called.append(p) or 0.0) is None, "a second saver must not write"
    assert called == []
    cache.drop(key, "test")
    assert cache.lookup(key) is None
    assert [p.name for p in cache.root.iterdir()] == []


def test_failed_save_leaves_nothing(inputs: dict[str, Path], tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "cache")
    key = _key(inputs, tmp_path)

    def broken(path: Path) -> float:
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cache.save(key, broken)
    assert cache.lookup(key) is None
    assert list(cache.root.iterdir()) == []


def test_incomplete_entry_is_a_miss_and_dropped(inputs: dict[str, Path], tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "cache")
    key = _key(inputs, tmp_path)
    snap = cache.save(key, _writer(b"y" * 64))
    assert snap is not None
    with snap.state.open("ab") as fh:  # a state file that is not what meta.json says
        fh.write(b"extra")
    assert cache.lookup(key) is None
    assert not snap.directory.exists()


def test_prune_keeps_the_most_recently_used(inputs: dict[str, Path], tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "cache", max_entries=2)
    keys = [_key(inputs, tmp_path, "-name-extra", str(i)) for i in range(3)]
    for i, key in enumerate(keys[:2]):
        assert cache.save(key, _writer(bytes([i]) * 8)) is not None
        os.utime(cache.root / key.short, (time.time() - 100 + i, time.time() - 100 + i))
    assert cache.lookup(keys[0]) is not None  # used now: keys[1] is the least recently used
    assert cache.save(keys[2], _writer(b"z" * 8)) is not None
    assert [cache.lookup(k) is not None for k in keys] == [True, False, True]
    assert cache.clear() == 2 and cache.entries() == []


def _save_in_child(root: str, digest: str, marker: str) -> None:
    cache = SnapshotCache(Path(root))
    key = SnapshotKey(digest, {"test": True})

    def write(path: Path) -> float:
        with open(marker, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        path.write_bytes(b"s" * 32)
        return 0.5

    cache.save(key, write)


def test_concurrent_savers_write_once(tmp_path: Path) -> None:
    digest = "ab" * 32
    marker = tmp_path / "writers.txt"
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_save_in_child, args=(str(tmp_path / "cache"), digest, str(marker)))
                for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert len(marker.read_text().split()) == 1, "exactly one saver may write a key"
    snap = SnapshotCache(tmp_path / "cache").lookup(SnapshotKey(digest, {}))
    assert snap is not None and snap.size_bytes == 32


def test_bad_max_entries_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_entries must be >= 1, got 0"):
        SnapshotCache(tmp_path, max_entries=0)


def test_prune_removes_what_a_killed_saver_left(inputs: dict[str, Path], tmp_path: Path) -> None:
    cache = SnapshotCache(tmp_path / "cache")
    cache.root.mkdir(parents=True)
    stale, fresh = cache.root / ".tmp-aaaa-1", cache.root / ".tmp-bbbb-2"
    for d in (stale, fresh):
        d.mkdir()
        (d / "state").write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    cache.prune()
    assert not stale.exists() and fresh.exists(), "only a leftover older than an hour may go"


def test_nic_options_are_guest_hardware_in_the_key(inputs: dict[str, Path], tmp_path: Path) -> None:
    args = ["-accel", "tcg", "-kernel", str(inputs["kernel"])]
    plain = QemuMachine(args, tmp_path / "a", binary=str(inputs["qemu"])).stable_argv()
    legacy = QemuMachine(args, tmp_path / "b", binary=str(inputs["qemu"]), nic_options=("disable-modern=on",))
    assert "virtio-net-pci,netdev=gmnet0,disable-modern=on" in legacy.stable_argv()
    key = snapshot_key(legacy.stable_argv(), inputs["manifest"])
    assert snapshot_key(plain, inputs["manifest"]).digest != key.digest
