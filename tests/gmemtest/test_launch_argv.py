"""The argv a guest is really launched with: the profile's machine and firmware, once each.

QEMU keeps the last ``-bios`` and ``-machine`` it is given, so anything appended after a
profile silently replaces its firmware (an SNP or TDX guest would then never boot OVMF).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from gmemtest import guest_run
from guests.profiles import PROFILES, GuestProfile
from images.build import GuestImage


class _Launched(Exception):
    """Raised by the stand-in QemuMachine once it has the argv: nothing is started."""


class _CapturingMachine:
    argv: ClassVar[list[str]] = []

    def __init__(self, args: list[str], workdir: Path, **_: Any) -> None:
        type(self).argv = list(args)

    def __enter__(self) -> _CapturingMachine:
        raise _Launched

    def __exit__(self, *exc: object) -> None:  # pragma: no cover - never entered
        return None


def _values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]


@pytest.mark.parametrize("profile", list(PROFILES.values()), ids=list(PROFILES))
def test_launched_argv_carries_the_profiles_machine_and_firmware_once(
        profile: GuestProfile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = GuestImage(kernel=tmp_path / "kernel", initrd=tmp_path / "initrd", ssh_key=tmp_path / "key",
                       manifest=tmp_path / "manifest.json", kernel_release="0", cache_hit=True, packages=())
    monkeypatch.setattr(guest_run, "QemuMachine", _CapturingMachine)
    # snapshot=False: no key to compute from files that do not exist; a restore launches the same argv.
    with pytest.raises(_Launched), guest_run.booted_guest(image, tmp_path / "w", profile=profile, snapshot=False):
        pass
    argv = _CapturingMachine.argv
    expected_bios = [] if profile.firmware is None else [str(profile.firmware)]
    assert _values(argv, "-bios") == expected_bios, f"{profile.name}: -bios in {argv}"
    assert _values(argv, "-machine") == [profile.machine_arg()], f"{profile.name}: -machine in {argv}"
    assert _values(argv, "-accel") == [profile.accel]
    assert argv == guest_run.guest_argv(image, profile)


def test_confidential_profiles_keep_ovmf_and_plain_ones_boot_qboot() -> None:
    for name in ("kvm-sev-snp", "kvm-tdx"):
        firmware = PROFILES[name].firmware
        assert firmware is not None and "OVMF" in firmware.name, f"{name}: firmware {firmware}"
    for name in ("tcg-default", "tcg-smp2-broadcast", "kvm-default", "kvm-gmem"):
        firmware = PROFILES[name].firmware
        assert firmware is not None and firmware.name == "qboot.rom", f"{name}: firmware {firmware}"
