"""QEMU's encoding of a forwarded host SIGBUS, and its stderr line, as the oracle reads them."""

from __future__ import annotations

import pytest

from qmp_helpers.mce import MCE_KINDS, forwarded_mce, parse_forwarded_lines


def test_intel_encoding_is_the_one_qmp_injects() -> None:
    """QEMU forwards with the very values of the SRAO/SRAR kinds the guest-side rows inject."""
    ao, ar = forwarded_mce("BUS_MCEERR_AO", amd=False), forwarded_mce("BUS_MCEERR_AR", amd=False)
    assert (ao.status, ao.mcg_status, ao.misc) == (MCE_KINDS["SRAO"].status, MCE_KINDS["SRAO"].mcg_status, 0x8C)
    assert (ar.status, ar.mcg_status) == (MCE_KINDS["SRAR"].status, MCE_KINDS["SRAR"].mcg_status)
    assert ao.raises_mc and ar.raises_mc and ar.action_required and not ao.action_required


def test_amd_encoding_defers_the_ao_and_marks_poison() -> None:
    ao, ar = forwarded_mce("BUS_MCEERR_AO", amd=True), forwarded_mce("BUS_MCEERR_AR", amd=True)
    assert ao.status == 0x9C00180000000000 and not ao.raises_mc  # VAL|EN|MISCV|ADDRV|DEFERRED|POISON
    assert ar.status == 0xBC00080000000000 and ar.raises_mc and ar.mcg_status == 0x7  # + UC, no AR bit
    assert not ar.action_required  # so QEMU's MEMORY_FAILURE says action-required false (measured)
    with pytest.raises(ValueError, match="valid: BUS_MCEERR_AO, BUS_MCEERR_AR"):
        forwarded_mce("BUS_MCEERR_XX", amd=True)


def test_parse_forwarded_lines_of_a_real_stderr() -> None:
    stderr = ("qemu-system-x86_64: warning: Guest MCE Memory Error at QEMU addr 0x7f8692761000 and GUEST addr "
              "0x2961000 of type BUS_MCEERR_AO injected\n"
              "qemu-system-x86_64: Guest MCE Memory Error at QEMU addr 0x7f8692761000 and GUEST addr 0x2961000 of "
              "type BUS_MCEERR_AR injected\nsomething else\n")
    got = parse_forwarded_lines(stderr)
    assert [(f.code, f.hva, f.gpa) for f in got] == [("BUS_MCEERR_AO", 0x7F8692761000, 0x2961000),
                                                     ("BUS_MCEERR_AR", 0x7F8692761000, 0x2961000)]
