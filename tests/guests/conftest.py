"""Fixtures for the guests package: the probe built for this host, a real local SSH server.

Tests skip with the probed reason when gcc, dropbear or mount namespaces are missing.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from guests_testlib import CFLAGS, Dropbear, make_key, wait_listening

from guests import probe_source_path


@pytest.fixture(scope="session")
def probe_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found on PATH: cannot build the probe")
    out = tmp_path_factory.mktemp("probe") / "gmem-probe"
    result = subprocess.run(["gcc", *CFLAGS, "-o", str(out), str(probe_source_path())],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"probe build failed (expected exit 0):\n{result.stderr}"
    return out


@pytest.fixture(scope="session")
def dropbear_ok() -> None:
    if shutil.which("dropbear") is None or shutil.which("dropbearkey") is None:
        pytest.skip("dropbear not installed (apt-get install dropbear-bin): no local SSH server")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a private mount namespace for the test SSH server: "
                    f"{probe.stderr.strip()}")


@pytest.fixture
def dropbear_factory(dropbear_ok: None, tmp_path: Path) -> Iterator[Callable[[], Dropbear]]:
    """Make (not start) dropbear servers; every one is stopped at teardown."""
    made: list[Dropbear] = []
    client = make_key(tmp_path / "client_ed25519")

    def make() -> Dropbear:
        index = len(made)
        home = tmp_path / f"root{index}"
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        home.chmod(0o700)
        auth = home / ".ssh" / "authorized_keys"
        auth.write_text(client.public_line + "\n")
        auth.chmod(0o600)
        host_key = tmp_path / f"host{index}_ed25519"
        subprocess.run(["dropbearkey", "-t", "ed25519", "-f", str(host_key)],
                       capture_output=True, check=True)
        server = Dropbear(home, host_key, client)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def dropbear(dropbear_factory: Callable[[], Dropbear]) -> Dropbear:
    server = dropbear_factory()
    server.start()
    wait_listening(server.port)
    return server


@pytest.fixture(scope="session")
def default_image() -> object:
    """The default guest image (cached build); skipped with the builder's reason if it fails."""
    from images.build import BuildError, build_default_image

    try:
        return build_default_image()
    except (BuildError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"default guest image cannot be built here: {exc}")
