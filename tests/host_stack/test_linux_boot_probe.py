"""The long-mode boot probe gives each vCPU a CPUID (KVM_SET_CPUID2) before KVM_SET_SREGS.

Upstream KVM refuses EFER.LME in KVM_SET_SREGS (EINVAL) until the vCPU's CPUID has LM; this
machine's PVM accepts it without, so the order is checked on the ioctls actually issued, and
the probe is run for real.
"""

from __future__ import annotations

import pytest

from host_stack import kvm
from host_stack import kvm_uapi as u
from host_stack.kvm import KvmSystem
from host_stack.linux_boot_probe import probe_linux_boot


def test_cpuid_structs_match_the_header_and_ioctl_numbers() -> None:
    assert u.ioc_size(u.KVM_SET_CPUID2) == 8 == u.ioc_size(u.KVM_GET_SUPPORTED_CPUID)
    assert (u.KVM_SET_CPUID2, u.KVM_GET_SUPPORTED_CPUID) == (0x4008AE90, 0xC008AE05)
    buf = u.kvm_cpuid2(3)
    assert type(buf).entries.offset == 8 and len(bytes(buf)) == 8 + 3 * 40


@pytest.mark.kvm
@pytest.mark.usefixtures("no_fd_leak")
def test_set_cpuid2_precedes_set_sregs_and_the_probe_runs(
    kvm_system: KvmSystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued: list[str] = []
    real_ioctl = kvm._ioctl

    def recording(fd: int, request: int, arg: object = 0, args: dict[str, int] | None = None) -> int:
        issued.append(u.IOCTL_NAMES.get(request, hex(request)))
        return real_ioctl(fd, request, arg, args)  # type: ignore[arg-type]

    monkeypatch.setattr(kvm, "_ioctl", recording)
    result = probe_linux_boot(kvm_system)
    assert result.control == "HLT", f"expected the long-mode control payload to reach HLT, got {result.control}"
    sregs_at = [i for i, name in enumerate(issued) if name == "KVM_SET_SREGS"]
    cpuid_at = [i for i, name in enumerate(issued) if name == "KVM_SET_CPUID2"]
    assert sregs_at, f"expected KVM_SET_SREGS calls, got {issued}"
    assert len(cpuid_at) == len(sregs_at), f"expected one KVM_SET_CPUID2 per vCPU, got {issued}"
    assert all(c < s for c, s in zip(cpuid_at, sregs_at, strict=True)), (
        f"expected KVM_SET_CPUID2 before each KVM_SET_SREGS, got {issued}"
    )


@pytest.mark.kvm
def test_supported_cpuid_offers_long_mode(kvm_system: KvmSystem) -> None:
    cpuid = kvm_system.supported_cpuid()
    ext = [e for e in cpuid if e.function == u.CPUID_EXT_FEATURES]
    assert ext and ext[0].edx & u.CPUID_EXT_EDX_LM, f"expected leaf 0x80000001 with LM, got {[hex(e.edx) for e in ext]}"
