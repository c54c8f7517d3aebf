"""Guest profiles: the arguments the brief fixes, and the lab profiles checked by real QEMU."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from guests.profiles import (
    BASE_KERNEL_ARGS,
    DEFAULT_OVMF,
    PROFILES,
    GuestProfile,
    get_profile,
    kvm_sev_snp_profile,
    kvm_tdx_profile,
)

QEMU = "qemu-system-x86_64"
KERNEL, INITRD = Path("/boot/k"), Path("/boot/i")


def opt(args: list[str], name: str) -> list[str]:
    """Every value given to option ``name``."""
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]


def test_tcg_default_is_the_recoverable_configuration() -> None:
    args = get_profile("tcg-default").qemu_args(KERNEL, INITRD)
    assert opt(args, "-accel") == ["tcg"]
    assert opt(args, "-cpu") == ["max,vendor=GenuineIntel"]
    assert opt(args, "-smp") == ["1"] and opt(args, "-m") == ["512"]
    assert opt(args, "-device") == ["pvpanic"] and opt(args, "-action") == ["panic=none"]
    assert opt(args, "-kernel") == [str(KERNEL)] and opt(args, "-initrd") == [str(INITRD)]
    # The profile owns every kernel argument: the MCE contract first, then the fast-boot ones.
    assert opt(args, "-append") == [" ".join(BASE_KERNEL_ARGS)]
    assert BASE_KERNEL_ARGS[:4] == ("console=ttyS0", "panic=0", "hugepages=16", "transparent_hugepage=madvise")
    for owned_by_machine in ("-qmp", "-serial", "-netdev", "-chardev"):
        assert owned_by_machine not in args


def test_extra_kernel_args_are_appended_without_duplicates() -> None:
    prof = get_profile("tcg-default")
    as_tuple = prof.qemu_args(KERNEL, INITRD, extra_kernel_args=("console=ttyS0", "gmemtest.hold=5", "quiet"))
    as_str = prof.qemu_args(KERNEL, INITRD, extra_kernel_args="console=ttyS0 gmemtest.hold=5 quiet")
    expected = " ".join((*BASE_KERNEL_ARGS, "gmemtest.hold=5"))
    assert opt(as_tuple, "-append") == opt(as_str, "-append") == [expected]


def test_smp2_broadcast_needs_intel_model_14_or_later() -> None:
    prof = get_profile("tcg-smp2-broadcast")
    assert prof.smp == 2 and prof.accel == "tcg"
    fields = dict(item.split("=", 1) for item in prof.cpu.split(",")[1:])
    assert fields["vendor"] == "GenuineIntel" and int(fields["family"]) == 6
    assert int(fields["model"]) >= 14


def test_unknown_profile_names_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        get_profile("tcg-fast")
    text = str(info.value)
    assert "'tcg-fast'" in text
    names = {"tcg-default", "tcg-smp2-broadcast", "kvm-default", "kvm-gmem", "kvm-swprot", "kvm-hugetlb",
             "kvm-sev-snp", "kvm-tdx", "labhost-svm"}
    assert all(name in text for name in names)
    assert set(PROFILES) == names


def test_labhost_profile_is_an_amd_tcg_host_with_two_vcpus() -> None:
    lab = get_profile("labhost-svm")
    args = lab.qemu_args(KERNEL, INITRD)
    assert (opt(args, "-accel"), opt(args, "-cpu"), opt(args, "-smp"), opt(args, "-m")) == (
        ["tcg"], ["max"], ["2"], ["3072"])
    assert "-nodefaults" in args and "-no-reboot" in args
    # hugepages=256: the 2 MiB pages of one kvm-hugetlb guest (512 MiB), reserved at boot
    assert opt(args, "-append") == ["console=ttyS0 panic=-1 loglevel=4 hugepages=256"]


def test_bad_profile_values_are_refused() -> None:
    with pytest.raises(ValueError, match="accel must be 'tcg' or 'kvm', got 'hvf'"):
        GuestProfile("x", "hvf", "q35", "max", 1, 512, ())
    with pytest.raises(ValueError, match="smp must be >= 1, got 0"):
        GuestProfile("x", "tcg", "q35", "max", 0, 512, ())


def test_lab_profiles_declare_what_they_need() -> None:
    assert get_profile("kvm-default").requirements == ("kvm_boots_linux",)
    gmem = get_profile("kvm-gmem")
    assert "qemu:guest-memfd" in gmem.requirements
    gargs = gmem.qemu_args(KERNEL, INITRD)
    assert "memory-backend-memfd,id=ram0,size=1024M,share=on,guest-memfd=on" in opt(gargs, "-object")
    assert opt(gargs, "-machine") == ["q35,memory-backend=ram0"] and opt(gargs, "-m") == ["1024"]
    snp = get_profile("kvm-sev-snp")
    assert {"sev_snp_host", "qemu:sev-snp-guest"} <= set(snp.requirements)
    sargs = snp.qemu_args(KERNEL, INITRD)
    assert opt(sargs, "-bios") == [str(DEFAULT_OVMF)] == ["/usr/share/ovmf/OVMF.fd"]
    assert opt(sargs, "-machine") == ["q35,confidential-guest-support=sev0,memory-backend=ram0"]
    assert any(o.startswith("sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,policy=0x30000")
               for o in opt(sargs, "-object"))
    fw = Path("/lab/snp/OVMF.fd")
    assert opt(kvm_sev_snp_profile(firmware=fw).qemu_args(KERNEL, INITRD), "-bios") == [str(fw)]
    tdx = kvm_tdx_profile(firmware=fw).qemu_args(KERNEL, INITRD)
    assert opt(tdx, "-object") == ["tdx-guest,id=tdx0"]
    assert opt(tdx, "-machine") == ["q35,kernel-irqchip=split,confidential-guest-support=tdx0"]


# -- validated by the real QEMU binary ------------------------------------------------------

SYNTAX_ERRORS = re.compile(r"Invalid parameter|does not accept value|not found|Unexpected|"
                           r"invalid option|unknown option|Could not", re.IGNORECASE)


@pytest.fixture(scope="module")
def qemu_caps() -> Any:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed")
    from qmp_helpers import probe_qemu

    return probe_qemu(QEMU)


def validate(args: list[str]) -> str | None:
    from qmp_helpers import validate_args

    return validate_args(QEMU, [*args, "-display", "none"])


@pytest.mark.qemu
@pytest.mark.parametrize("name", ["tcg-default", "tcg-smp2-broadcast"])
def test_tcg_profiles_are_accepted_by_qemu(name: str, default_image: Any, qemu_caps: Any) -> None:
    args = get_profile(name).qemu_args(default_image.kernel, default_image.initrd)
    assert validate(args) is None


@pytest.mark.qemu
def test_kvm_default_is_accepted_or_refused_for_kvm(default_image: Any, qemu_caps: Any) -> None:
    """Whether QEMU can start a KVM guest here is probed: the profile follows the probe, either way.

    On machines of this kind with an AMD CPU, QEMU aborts under -accel kvm on the PVM KVM; on
    Intel ones it starts. Neither is a test failure: the refusal must be the sentence a KVM
    profile cancels with, and a host error rather than a syntax error.
    """
    from gmemtest.requirements import kvm_start_report, unmet_requirements

    refusal = kvm_start_report(QEMU)
    error = validate(get_profile("kvm-default").qemu_args(default_image.kernel, default_image.initrd))
    unmet = unmet_requirements(get_profile("kvm-default").requirements, binary=QEMU, accel="kvm")
    if refusal is None:
        assert error is None, f"QEMU starts a KVM guest here, yet refused kvm-default: {error!r}"
        assert not any("cannot start a KVM guest" in u for u in unmet), unmet
    else:
        assert error is not None, f"the KVM start probe said {refusal!r}, yet kvm-default was accepted"
        assert not SYNTAX_ERRORS.search(error), f"expected a host error, got a syntax error: {error!r}"
        assert refusal in unmet, f"kvm-default must cancel with the probed sentence; unmet: {unmet}"


@pytest.mark.qemu
def test_kvm_gmem_matches_the_binary_guest_memfd_support(qemu_caps: Any, tmp_path: Path) -> None:
    error = validate(get_profile("kvm-gmem").qemu_args(tmp_path / "k", tmp_path / "i"))
    if not qemu_caps.guest_memfd_property["memory-backend-memfd"]:
        # This QEMU lacks the posted series: the one rejected thing must be that property.
        assert error is not None and re.search(r"Invalid parameter 'guest-memfd'", error), error
    else:
        assert error is None or "guest-memfd" not in error, error


@pytest.mark.qemu
def test_kvm_sev_snp_fails_for_the_host_not_the_syntax(qemu_caps: Any, tmp_path: Path) -> None:
    assert qemu_caps.object_types["sev-snp-guest"], f"{qemu_caps.version_text} lacks sev-snp-guest"
    fw = tmp_path / "OVMF.fd"
    fw.write_bytes(b"\0" * (2 << 20))
    error = validate(kvm_sev_snp_profile(firmware=fw).qemu_args(tmp_path / "k", tmp_path / "i"))
    assert error is not None, "no SEV-SNP host here, yet QEMU accepted an SNP guest"
    assert re.search(r"SEV|sev|/dev/kvm|KVM", error), f"expected a needs-KVM/SEV error, got {error!r}"
    assert not SYNTAX_ERRORS.search(error), f"expected a host error, got a syntax error: {error!r}"


@pytest.mark.qemu
def test_kvm_tdx_matches_the_binary_tdx_support(qemu_caps: Any, tmp_path: Path) -> None:
    fw = tmp_path / "OVMF.fd"
    fw.write_bytes(b"\0" * (2 << 20))
    error = validate(kvm_tdx_profile(firmware=fw).qemu_args(tmp_path / "k", tmp_path / "i"))
    assert error is not None, "no TDX host here, yet QEMU accepted a TDX guest"
    if not qemu_caps.object_types["tdx-guest"]:
        assert "does not accept value 'tdx-guest'" in error, error
    else:
        assert not SYNTAX_ERRORS.search(error), f"expected a host error, got {error!r}"


def test_kvm_guests_get_the_legacy_nic_and_tcg_guests_keep_theirs() -> None:
    from guests.profiles import KVM_NIC_OPTIONS, PROFILES

    assert KVM_NIC_OPTIONS == ("disable-modern=on",)
    assert PROFILES["kvm-default"].nic_options == KVM_NIC_OPTIONS == PROFILES["kvm-gmem"].nic_options
    assert PROFILES["tcg-default"].nic_options == () == PROFILES["tcg-smp2-broadcast"].nic_options
