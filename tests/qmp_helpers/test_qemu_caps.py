"""qemu_caps against the real binary."""

from __future__ import annotations

import re
import subprocess

import pytest
from qmp_test_support import BASE_ARGS, QEMU

from qmp_helpers import probe_qemu, validate_args

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(30)]


def test_probe_matches_binary() -> None:
    caps = probe_qemu(QEMU)
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True,
                         check=True).stdout
    match = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    assert match is not None, out
    assert caps.version == tuple(int(g) for g in match.groups())
    assert "tcg" in caps.accelerators
    assert set(caps.object_types) == {"sev-snp-guest", "tdx-guest"}
    types = subprocess.run([QEMU, "-object", "help"], capture_output=True, text=True,
                           check=True).stdout.split()
    for name, offered in caps.object_types.items():
        assert offered == (name in types), f"{name}: QMP says {offered}, -object help {types}"
    assert caps.to_dict()["version"] == ".".join(match.groups())


def test_validate_args() -> None:
    assert validate_args(QEMU, BASE_ARGS) is None
    error = validate_args(QEMU, [*BASE_ARGS, "-m", "not-a-size"])
    assert error is not None and "not-a-size" in error
    caps = probe_qemu(QEMU)
    if not caps.object_types["sev-snp-guest"]:
        pytest.skip(f"{QEMU} has no sev-snp-guest object type")
    snp = validate_args(QEMU, ["-machine", "q35,confidential-guest-support=sev0", "-object",
                               "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1",
                               "-accel", "tcg", "-nodefaults"])
    assert snp is not None and "sev-snp-guest" in snp, snp
