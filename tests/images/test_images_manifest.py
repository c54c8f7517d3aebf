"""Cache key and output verification: a changed input is a new key, a changed output is caught."""

from __future__ import annotations

import dataclasses
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from images.debs import PackagePin
from images.manifest import builder_source_hashes, cache_key, verify_outputs
from images.vmlinux import VmlinuxError, extract_vmlinux

PINS = (PackagePin("busybox-static", "1:1.35.0-4", "a" * 64, "busybox.deb"),
        PackagePin("libc6", "2.36-9", "b" * 64, "libc6.deb"))


def test_same_inputs_same_key() -> None:
    builder = builder_source_hashes()
    assert cache_key(PINS, builder, "c" * 64) == cache_key(tuple(reversed(PINS)), builder, "c" * 64)


@pytest.mark.parametrize("change", ["version", "deb_sha", "probe", "builder", "extra_pkg"])
def test_any_input_change_changes_key(change: str) -> None:
    builder = builder_source_hashes()
    base = cache_key(PINS, builder, "c" * 64)
    pins, probe, b2 = list(PINS), "c" * 64, dict(builder)
    if change == "version":
        pins[1] = dataclasses.replace(pins[1], version="2.36-9+deb12u1")
    elif change == "deb_sha":
        pins[0] = dataclasses.replace(pins[0], sha256="d" * 64)
    elif change == "probe":
        probe = "e" * 64
    elif change == "builder":
        b2["build.py"] = "f" * 64
    else:
        pins.append(PackagePin("zlib1g", "1", "0" * 64, "z.deb"))
    assert cache_key(pins, b2, probe) != base


def test_builder_hashes_cover_modules_and_files() -> None:
    hashes = builder_source_hashes()
    assert {"build.py", "initramfs.py", "files/rcS", "files/inittab"} <= set(hashes)
    assert "measure_boot.py" not in hashes  # a measuring tool does not shape the image


def test_verify_outputs_catches_change_and_loss(tmp_path: Path) -> None:
    (tmp_path / "kernel").write_bytes(b"k")
    (tmp_path / "initrd.img").write_bytes(b"i")
    import hashlib
    doc = {"outputs": {n: hashlib.sha256(v).hexdigest()
                       for n, v in (("kernel", b"k"), ("initrd.img", b"i"))}}
    assert verify_outputs(tmp_path, doc) == []
    (tmp_path / "kernel").write_bytes(b"K")
    (tmp_path / "initrd.img").unlink()
    problems = verify_outputs(tmp_path, doc)
    assert problems[0] == "initrd.img: missing"
    assert problems[1].startswith("kernel: sha256 ")


def test_extract_vmlinux_finds_the_xz_payload() -> None:
    payload = b"\x7fELF" + bytes(1000)
    image = b"MZ setup code \xfd7zXZ\x00 not a stream " + lzma.compress(payload) + b"tail"
    assert extract_vmlinux(image) == payload
    with pytest.raises(VmlinuxError, match="no XZ, gzip or zstd stream"):
        extract_vmlinux(b"MZ" + lzma.compress(b"not an elf"))


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd tool")
def test_extract_vmlinux_finds_a_zstd_payload_with_the_size_trailer() -> None:
    """Debian 7.x bzImages are zstd; the kernel appends the size after the frame."""
    payload = b"\x7fELF" + bytes(5000)
    frame = subprocess.run(["zstd", "-q", "-c"], input=payload, capture_output=True, check=True).stdout
    image = b"MZ setup \x28\xb5\x2f\xfd junk " + frame + len(payload).to_bytes(4, "little")
    assert extract_vmlinux(image) == payload
