"""Preflight and requirement sentences against the real host and the real QEMU."""

from __future__ import annotations

import json

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
