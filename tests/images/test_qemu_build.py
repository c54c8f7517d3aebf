"""The project's QEMU: its patch series (read, named, held to QEMU's own rules) and, slow, the real build."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from images.build import BuildError
from images.qemu_build import BINARY, CONFIGURE, build_qemu, patch_series

SERIES = Path(__file__).resolve().parents[2] / "images" / "patches" / "qemu"


def test_the_series_lists_every_patch_in_order_and_names_itself_by_digest() -> None:
    series = patch_series()
    names = [p.name for p in series.patches]
    assert names == sorted(names) and names[0].startswith("0001-") and len(names) >= 2, names
    assert series.identity == f"gmemtest series {len(names)} patches {series.digest[:12]}"


@pytest.mark.parametrize("patch", sorted(SERIES.glob("*.patch")), ids=lambda p: p.name[:4])
def test_every_patch_says_its_licence_and_is_signed_off(patch: Path) -> None:
    text = patch.read_text()
    head, _, body = text.partition("\n---\n")
    assert "Signed-off-by: " in head and "GNU GPL, version 2 or later" in body.split("diff --git")[0], patch.name
    assert "/work/" not in text and "/root/" not in text and "/tmp/" not in text, "no machine path in a patch"


def test_a_patch_missing_from_the_list_or_from_the_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "0001-a.patch").write_text("x")
    (tmp_path / "0002-b.patch").write_text("y")
    (tmp_path / "series").write_text("# comment\n0001-a.patch\n0003-c.patch\n")
    with pytest.raises(BuildError, match=r"listed but missing \['0003-c.patch'\], present but unlisted "
                                         r"\['0002-b.patch'\]"):
        patch_series(tmp_path)


def test_the_series_digest_changes_with_any_patch(tmp_path: Path) -> None:
    (tmp_path / "0001-a.patch").write_text("x")
    (tmp_path / "series").write_text("0001-a.patch\n")
    before = patch_series(tmp_path).digest
    (tmp_path / "0001-a.patch").write_text("x\n")
    assert patch_series(tmp_path).digest != before


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_built_qemu_has_the_series_property_and_says_what_it_is() -> None:
    """The real recipe (cached after the first build): each patch passed checkpatch.pl and built on
    its own; the binary offers guest-memfd on memory-backend-memfd and names the series."""
    built = build_qemu()
    doc = json.loads(built.manifest.read_text())
    assert [step["patch"] for step in doc["patches"]] == list(built.series)
    assert all(step["builds"] and "0 errors, 0 warnings" in step["checkpatch"] for step in doc["patches"]), doc
    assert doc["configure"][:len(CONFIGURE)] == list(CONFIGURE) and built.binary == built.manifest.parent / BINARY
    version = subprocess.run([str(built.binary), "--version"], capture_output=True, text=True, check=True, timeout=30)
    assert built.pkgversion in version.stdout, version.stdout
    props = subprocess.run([str(built.binary), "-object", "memory-backend-memfd,help"], capture_output=True,
                           text=True, check=False, timeout=30)
    assert "guest-memfd=<OnOffAuto>" in props.stdout, props.stdout
