"""Real builds from Debian packages: cold, warm (cache hit), damaged cache, concurrent builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from images.build import GuestImage, build_default_image
from images.manifest import read_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cold(image_cache: Path, tiny_probe: Path) -> GuestImage:
    return build_default_image(image_cache, probe_source=tiny_probe)


def _cpio_names(initrd: Path) -> set[str]:
    out = subprocess.run(["cpio", "-t", "--quiet"], stdin=initrd.open("rb"),
                         capture_output=True, check=True).stdout.decode()
    return set(out.split())


def test_cold_build_outputs_and_manifest(cold: GuestImage, tiny_probe: Path) -> None:
    assert not cold.cache_hit
    kernel_pkg = cold.packages[0].name
    assert kernel_pkg.endswith("-amd64-unsigned") and "cloud" not in kernel_pkg, kernel_pkg
    assert cold.kernel_release in kernel_pkg
    doc = read_manifest(cold.manifest)
    assert doc["kernel_release"] == cold.kernel_release
    assert doc["inputs"]["probe_source"]["name"] == tiny_probe.name
    assert set(doc["outputs"]) == {cold.kernel.name, cold.initrd.name, cold.ssh_key.name}
    assert doc["modules"][-1] == "pvpanic-mmio.ko"
    assert {"virtio_net.ko", "virtio_pci.ko", "virtio.ko"} <= set(doc["modules"])
    names = _cpio_names(cold.initrd)
    for needed in ("init", "usr/sbin/dropbear", "usr/bin/gmem-probe", "lib64/ld-linux-x86-64.so.2",
                   "root/.ssh/authorized_keys", "etc/dropbear/host_key", "dev/console",
                   "lib/modules/virtio_net.ko", "lib/x86_64-linux-gnu/libtomcrypt.so.1"):
        assert needed in names, f"{needed} missing from the initramfs"
    assert oct(cold.ssh_key.stat().st_mode & 0o777) == "0o600"
    assert (cold.kernel.read_bytes()[:4] == b"\x7fELF") == (doc["kernel_format"] == "pvh-elf")


def test_warm_rebuild_is_a_fast_cache_hit(cold: GuestImage, image_cache: Path,
                                          tiny_probe: Path) -> None:
    started = time.monotonic()
    warm = build_default_image(image_cache, probe_source=tiny_probe)
    elapsed = time.monotonic() - started
    assert warm.cache_hit
    assert (warm.kernel, warm.initrd, warm.ssh_key) == (cold.kernel, cold.initrd, cold.ssh_key)
    assert elapsed < 3.0, f"warm rebuild took {elapsed:.2f} s, target < 3 s"


def test_damaged_output_is_rebuilt_with_a_new_key(cold: GuestImage, image_cache: Path,
                                                  tiny_probe: Path) -> None:
    old_key = cold.ssh_key.read_bytes()
    with cold.initrd.open("ab") as stream:
        stream.write(b"damage")
    again = build_default_image(image_cache, probe_source=tiny_probe)
    assert not again.cache_hit
    assert again.ssh_key.read_bytes() != old_key
    assert build_default_image(image_cache, probe_source=tiny_probe).cache_hit


def test_changed_probe_source_is_a_new_image(cold: GuestImage, image_cache: Path,
                                             tmp_path: Path, tiny_probe: Path) -> None:
    other = tmp_path / "tiny_probe.c"
    other.write_text(tiny_probe.read_text() + "/* changed */\n")
    changed = build_default_image(image_cache, probe_source=other)
    assert not changed.cache_hit
    assert changed.kernel.parent != cold.kernel.parent
    shutil.rmtree(changed.kernel.parent)  # keep the session cache small


def test_concurrent_builds_share_one_result(image_cache: Path, tmp_path: Path,
                                            tiny_probe: Path) -> None:
    probe = tmp_path / "tiny_probe.c"
    probe.write_text(tiny_probe.read_text() + "/* concurrent */\n")
    code = ("import json, sys; from pathlib import Path; from images.build import "
            "build_default_image as b; print(json.dumps(b(Path(sys.argv[1]), "
            "probe_source=Path(sys.argv[2])).as_json()))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(image_cache), str(probe)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out))
    assert sorted(r["cache_hit"] for r in results) == [False, True]
    assert results[0]["initrd"] == results[1]["initrd"]
    assert not list((image_cache / "images").glob(".build-*")), "staging directory left behind"
    shutil.rmtree(Path(results[0]["initrd"]).parent)
