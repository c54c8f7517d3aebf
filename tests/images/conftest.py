"""A real default-image build shared by the slow image tests (one cold build per session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_PROBE = "#include <stdio.h>\nint main(void) { puts(\"tiny\"); return 0; }\n"


def _tools_missing() -> str | None:
    for tool in ("apt-cache", "apt-get", "dpkg-deb", "gcc"):
        if shutil.which(tool) is None:
            return f"{tool} not on PATH: the image builder needs apt, dpkg and gcc"
    return None


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _tools_missing()
    if reason:
        pytest.skip(reason)
    return tmp_path_factory.mktemp("image-cache")


@pytest.fixture(scope="session")
def tiny_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "tiny_probe.c"
    path.write_text(TINY_PROBE)
    return path
