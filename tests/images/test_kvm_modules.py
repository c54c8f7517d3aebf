"""The lab host's rebuilt KVM: the ABI gate, naming the source, and (slow) the real build."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gmemtest.lab.kvm import STOCK, kvm_command
from images.build import BuildError
from images.kvm_modules import abi_gate, config_symbols, recorded_symbols, source_package_for, stale_builds

DEBIAN = '#define CONFIG_KVM 1\n#define CONFIG_SCHED_CLASS_EXT 1\n#define CONFIG_GCC_VERSION 140200\n' \
         '#define CONFIG_CC_HAS_ASM_GOTO 1\n'


def test_the_gate_allows_the_option_and_compiler_capabilities_only() -> None:
    rebuilt = DEBIAN.replace("140200", "120200").replace("CONFIG_CC_HAS_ASM_GOTO 1\n", "") \
        + "#define CONFIG_KVM_SW_PROTECTED_VM 1\n"
    used = {"KVM", "SCHED_CLASS_EXT", "GCC_VERSION", "CC_HAS_ASM_GOTO", "KVM_SW_PROTECTED_VM"}
    assert abi_gate(config_symbols(DEBIAN), config_symbols(rebuilt), used) == []


def test_the_gate_names_a_dropped_symbol_kvm_depends_on() -> None:
    """The trap of FACTS 6: no pahole, no BTF, no SCHED_CLASS_EXT, another struct task_struct."""
    rebuilt = DEBIAN.replace("#define CONFIG_SCHED_CLASS_EXT 1\n", "")
    assert abi_gate(config_symbols(DEBIAN), config_symbols(rebuilt), {"SCHED_CLASS_EXT", "KVM"}) == [
        "SCHED_CLASS_EXT: Debian 1, rebuilt unset"]
    # A symbol kvm's objects never looked at may differ: it cannot change their ABI.
    assert abi_gate(config_symbols(DEBIAN), config_symbols(rebuilt), {"KVM"}) == []


def test_fixdep_records_are_read_as_config_symbols() -> None:
    cmd = "deps_arch/x86/kvm/x86.o := \\\n  $(wildcard include/config/KVM_SW_PROTECTED_VM) \\\n" \
          "  $(wildcard include/config/SCHED_CLASS_EXT) \\\n  include/linux/kvm_host.h \\\n"
    assert recorded_symbols([cmd]) == {"KVM_SW_PROTECTED_VM", "SCHED_CLASS_EXT"}


def test_the_source_package_is_named_from_the_release_or_refused() -> None:
    assert source_package_for("7.3.4+deb13-amd64") == "linux-source-7.3"
    with pytest.raises(BuildError, match=r"'6.1.0-28-amd64' is not a Debian generic amd64 release"):
        source_package_for("6.1.0-28-amd64")


def test_stock_kvm_leaves_the_command_alone_and_a_bad_choice_is_named() -> None:
    assert kvm_command(STOCK, ["true"], "7.3.4+deb13-amd64") == ["true"]
    with pytest.raises(ValueError, match="KVM choice 'rebuilt' is not one of stock, sw-protected"):
        kvm_command("rebuilt", ["true"], "7.3.4+deb13-amd64")


def test_a_cached_rebuild_for_another_kernel_is_named_stale(tmp_path: Path) -> None:
    from images import manifest

    for name, release in (("a", "7.3.4+deb13-amd64"), ("b", "7.2.12+deb13-amd64"), ("c", None)):
        (tmp_path / "images" / name).mkdir(parents=True)
        doc = {"schema": manifest.SCHEMA, "key": name, "outputs": {}}
        if release is not None:
            doc |= {"option": "KVM_SW_PROTECTED_VM", "kernel_release": release}
        manifest.write_manifest(tmp_path / "images" / name / manifest.MANIFEST_NAME, doc)
    (notice,) = stale_builds(tmp_path, "7.3.4+deb13-amd64")
    assert "rebuilt for 7.2.12+deb13-amd64; the lab kernel is now 7.3.4+deb13-amd64" in notice, notice


def test_a_fresh_package_index_is_not_fetched_again_and_a_missing_one_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from images import debs
    from images.build import indexed_apt

    updates: list[str] = []
    monkeypatch.setattr(debs, "update", lambda apt: updates.append(apt.label))
    (tmp_path / "lists").mkdir(parents=True)
    listed = tmp_path / "lists" / "x_sid_main_binary-amd64_Packages"
    listed.write_text("")
    os.utime(listed, (0, 0))  # the suite last changed long ago: apt keeps that mtime on "not modified"
    indexed_apt(tmp_path, "sid", fresh_for_s=3600)
    assert updates == ["private apt (sid)"], "never read here before: read now"
    indexed_apt(tmp_path, "sid", fresh_for_s=3600)
    assert updates == ["private apt (sid)"], "read a moment ago: fresh, whatever the lists' mtime"
    indexed_apt(tmp_path, "sid")
    assert updates == ["private apt (sid)"] * 2

    def offline(apt: debs.AptConfig) -> None:
        raise debs.PackageError("no network")

    monkeypatch.setattr(debs, "update", offline)
    with pytest.raises(BuildError, match="cannot read the sid index: no network"):
        indexed_apt(tmp_path / "empty", "sid")
