"""Preflight and requirement sentences against the real host and the real QEMU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gmemtest.cli import main as cli_main
from gmemtest.requirements import host_report, qemu_report, unmet_requirements
from guests.profiles import PROFILES, get_profile


def test_tcg_default_is_runnable_here() -> None:
    # The guest-side chain needs only QEMU with TCG: nothing of the host's KVM.
    assert unmet_requirements(get_profile("tcg-default").requirements, accel="tcg") == []


def test_unknown_accelerator_and_requirement_are_named() -> None:
    (sentence,) = unmet_requirements((), accel="hax9000")
    assert "no hax9000 accelerator" in sentence and "tcg" in sentence
    with pytest.raises(ValueError, match="unknown QEMU requirement 'qemu:warp-drive'; valid: accel-<name>"):
        unmet_requirements(["qemu:warp-drive"])


def test_lab_profile_cancel_reason_is_the_probed_sentence() -> None:
    profile = get_profile("kvm-sev-snp")
    unmet = unmet_requirements(profile.requirements, accel=profile.accel)
    host = host_report()
    for requirement in profile.requirements:
        if requirement.startswith("qemu:"):
            continue
        sentence = host.missing(requirement)
        assert (sentence in unmet) if sentence else all(requirement not in u for u in unmet)


def test_missing_qemu_binary_is_a_sentence_not_a_crash() -> None:
    (sentence,) = unmet_requirements((), binary="qemu-system-nonexistent")
    assert "qemu-system-nonexistent" in sentence and "could not be probed" in sentence
    assert isinstance(qemu_report("qemu-system-nonexistent"), str)


def test_cli_preflight_json_covers_every_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["preflight", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["profiles"]) == set(PROFILES)
    for name, entry in report["profiles"].items():
        assert entry["runnable"] == (not entry["unmet"]), name
    assert report["host"]["kernel_release"]


def test_a_qemu_that_aborts_under_kvm_is_a_reason_not_an_assertion(tmp_path: Path) -> None:
    """The AMD/PVM abort, reproduced by a wrapper: every KVM profile CANNOT RUN with its text."""
    import shutil

    from gmemtest.preflight import preflight_report, render_table
    from gmemtest.requirements import kvm_start_report

    real = shutil.which("qemu-system-x86_64")
    if real is None:
        pytest.skip("qemu-system-x86_64 not installed")
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" -accel kvm "*)\n'
        "  echo 'qemu-system-x86_64: error: failed to set MSR 0x10a to 0xc000069' >&2\n"
        "  echo 'kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs'\"'\"' failed.' >&2\n"
        "  exit 134;;\n"
        f'esac\nexec {real} "$@"\n')
    fake.chmod(0o755)
    refusal = kvm_start_report(str(fake))
    assert refusal is not None and "failed to set MSR 0x10a" in refusal, refusal
    report = preflight_report(str(fake))
    for name in ("kvm-default", "kvm-gmem", "kvm-sev-snp", "kvm-tdx"):
        assert report["profiles"][name]["runnable"] is False
        assert refusal in report["profiles"][name]["unmet"], report["profiles"][name]
    for name in ("tcg-default", "tcg-smp2-broadcast"):
        assert not any("KVM guest" in u for u in report["profiles"][name]["unmet"]), report["profiles"][name]
    assert "failed to set MSR 0x10a" in render_table(report)
