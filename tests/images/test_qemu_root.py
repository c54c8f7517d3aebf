"""Debian's newest QEMU in a root of its own: resolved by apt, unpacked, run through its own loader."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from images import debs
from images.build import default_cache_root
from images.qemu_root import QEMU_SUITE, build_qemu_root


def test_private_apt_with_a_base_suite_pins_the_suite_above_it(tmp_path: Path) -> None:
    apt = debs.private_apt(tmp_path / "apt", "trixie-backports", uri="http://mirror.invalid/debian", base=("trixie",))
    lines = (tmp_path / "apt" / "etc" / "sources.list").read_text().splitlines()
    assert [line.split()[3] for line in lines] == ["trixie-backports", "trixie"]
    # Backports' Release says Suite: stable-backports; the pin must use the codename (n=).
    preferences = (tmp_path / "apt" / "etc" / "preferences").read_text()
    assert "Pin: release n=trixie-backports\nPin-Priority: 990" in preferences
    assert f"Dir::Etc::Preferences={tmp_path / 'apt' / 'etc' / 'preferences'}" in apt.options
    with pytest.raises(debs.PackageError, match="suite 'trixie;x' is not a Debian suite"):
        debs.private_apt(tmp_path / "bad", "trixie-backports", base=("trixie;x",))
    with pytest.raises(debs.PackageError, match="against a private apt configuration"):
        debs.install_closure(["qemu-system-x86"], debs.SYSTEM_APT)


def test_the_newest_qemu_runs_from_its_own_root() -> None:
    """The test command builds it first (ci/run-tests.sh); here it must be a cache hit that runs."""
    root = build_qemu_root()
    doc = json.loads(root.manifest.read_text())
    banner = subprocess.run([str(root.binary), "--version"], capture_output=True, text=True, timeout=30,
                            check=True).stdout.splitlines()[0]
    assert banner == doc["qemu_version_banner"] and root.suite == QEMU_SUITE
    assert root.version.split(":")[-1].split("+")[0] in banner  # 1:11.1.3+ds-... -> "11.1.3"
    assert root.binary.is_relative_to(default_cache_root())
    libc = next(p for p in doc["packages"] if p["name"] == "libc6")
    host_libc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libc6"], capture_output=True, text=True,
                               check=False).stdout
    assert libc["version"] != host_libc, "the root brings its own libc; the host's stays as it is"
