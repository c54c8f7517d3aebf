"""The newc writer against the system's cpio: what we write, GNU cpio reads back."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from images.cpio import CpioError, NewcWriter

CPIO = shutil.which("cpio")
pytestmark = pytest.mark.skipif(CPIO is None, reason="no cpio binary on PATH to read archives")


def _archive() -> bytes:
    buf = io.BytesIO()
    w = NewcWriter(buf)
    w.add_dir("etc")
    w.add_dir("bin", 0o700)
    w.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.add_file("bin/tool", bytes(range(256)) * 5 + b"odd", 0o755)  # length not a multiple of 4
    w.add_file("etc/empty", b"")
    w.add_symlink("bin/sh", "tool")
    w.add_chardev("console", 5, 1)
    w.close()
    return buf.getvalue()


def test_listing_matches_entries_in_order() -> None:
    data = _archive()
    assert len(data) % 4 == 0, f"archive length {len(data)} is not 4-byte aligned"
    out = subprocess.run([CPIO, "-t", "-v", "--quiet"], input=data, capture_output=True,
                         check=True).stdout.decode()
    lines = out.splitlines()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in lines]
    assert names == ["etc", "bin", "etc/passwd", "bin/tool", "etc/empty", "bin/sh", "console"]
    modes = [line.split()[0] for line in lines]
    assert modes[1] == "drwx------", f"bin mode: expected drwx------, got {modes[1]}"
    assert modes[3] == "-rwxr-xr-x", f"bin/tool mode: expected -rwxr-xr-x, got {modes[3]}"
    assert modes[5].startswith("l") and lines[5].endswith("bin/sh -> tool")
    assert modes[6].startswith("c"), f"console: expected a char device, got {lines[6]}"
    rdev = "".join(lines[6].split()[4:6])
    assert rdev == "5,1", f"console rdev: expected 5,1, got {rdev} in {lines[6]!r}"


def test_extract_round_trip(tmp_path: Path) -> None:
    # Device nodes are left out of the extraction (mknod needs privileges in some sandboxes).
    subprocess.run([CPIO, "-i", "-d", "--quiet", "--no-absolute-filenames", "bin", "bin/*",
                    "etc", "etc/*"],
                   input=_archive(), cwd=tmp_path, capture_output=True, check=True)
    assert (tmp_path / "etc/passwd").read_bytes() == b"root:x:0:0:root:/root:/bin/sh\n"
    assert (tmp_path / "bin/tool").read_bytes() == bytes(range(256)) * 5 + b"odd"
    assert (tmp_path / "etc/empty").read_bytes() == b""
    assert (tmp_path / "bin/sh").is_symlink()
    assert str((tmp_path / "bin/sh").readlink()) == "tool"
    assert (tmp_path / "bin/tool").stat().st_mode & 0o777 == 0o755


def test_same_entries_give_same_bytes() -> None:
    assert _archive() == _archive()


@pytest.mark.parametrize("name", ["/abs", "a/../b", "", "dup"])
def test_bad_names_are_refused(name: str) -> None:
    w = NewcWriter(io.BytesIO())
    w.add_dir("dup")
    with pytest.raises(CpioError, match=r"name|duplicate"):
        w.add_file(name, b"x")


def test_no_entry_after_close() -> None:
    w = NewcWriter(io.BytesIO())
    w.close()
    with pytest.raises(CpioError, match="closed"):
        w.add_dir("late")
