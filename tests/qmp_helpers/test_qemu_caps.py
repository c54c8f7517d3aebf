"""qemu_caps against the real binary."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

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
    assert set(caps.object_types) == {"sev-snp-guest", "tdx-guest", "x-sw-protected-vm"}
    assert caps.qmp_commands == {"x-kvm-convert-memory": False, "x-query-kvm-private-memory": False}
    assert caps.kvm_accel_properties == {"x-private-hwpoison-mce": False}
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


def test_the_projects_qemu_has_the_software_protected_vm_and_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    """The series' object and commands as QOM and QMP report them; on a KVM without VM type 1 the object is
    refused with KVM's reason, and a VM without private memory refuses a conversion by saying so."""
    from host_stack.capabilities import probe_host
    from images.qemu_build import built_in_cache
    from qmp_helpers import QemuMachine, QmpCommandError

    built = built_in_cache()
    if built is None:
        pytest.skip("the project's QEMU is not built here (python -m images qemu-build builds it)")
    caps = probe_qemu(str(built.binary))
    assert caps.object_types["x-sw-protected-vm"] and all(caps.qmp_commands.values()), caps
    assert caps.kvm_accel_properties == {"x-private-hwpoison-mce": True}, caps
    swprot = ["-accel", "kvm", "-machine", "q35,confidential-guest-support=swp0",
              "-object", "x-sw-protected-vm,id=swp0", "-m", "256", "-display", "none", "-nodefaults"]
    refusal = validate_args(str(built.binary), swprot)
    if probe_host().missing("sw_protected_vm") is not None:
        assert refusal is not None and "vm-type SW-PROTECTED not supported by KVM" in refusal, refusal
    else:
        assert refusal is None
    with QemuMachine(["-accel", "kvm", "-machine", "q35", "-m", "256", "-nodefaults", "-S"], tmp_path,
                     binary=str(built.binary), name="noprivate", ssh_forward_port=None) as machine:
        assert machine.qmp("x-query-kvm-private-memory") == []
        with pytest.raises(QmpCommandError, match="this VM has no private memory"):
            machine.qmp("x-kvm-convert-memory", gpa=0x100000, size=0x1000, private=True)
