"""The tiny VMM: payload encoding (pure) and the scenarios on real KVM."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from host_stack import gmem_layout as gl
from host_stack import kvm_uapi as u
from host_stack import vmm
from host_stack.capabilities import HostReport, first_unmet
from host_stack.kvm import KvmSystem


def test_payload_encodes_each_gfn_segment_and_ends_in_hlt() -> None:
    code = vmm.build_payload([(0x41, None)])
    assert code[:3] == bytes([0xB8, 0x41, 0x00])  # mov ax, gfn
    assert code[7:12] == bytes([0xB8, 0x00, 0x41, 0x8E, 0xD8])  # mov ax, 0x4100; mov ds, ax
    assert code[-3:] == bytes([0xF4, 0xEB, 0xFE])
    assert len(vmm.build_payload([(1, None), (2, None), (3, None)])) == 3 * 21 + 3


def test_payload_refuses_gfns_beyond_real_mode() -> None:
    with pytest.raises(ValueError, match="real-mode reach"):
        vmm.build_payload([(0x100, None)])


def _reads(values: dict[int, int]) -> list[vmm.GuestRead]:
    return [vmm.GuestRead(g, v) for g, v in values.items()]


LAYOUT = vmm.DEFAULT_LAYOUT


def test_classify_backing_recognises_both_understood_behaviours() -> None:
    gfns = [g for s in LAYOUT for g in range(s.base_gfn, s.gfn_end)]
    idx = {g: gl.index_for_gfn(LAYOUT, g) or 0 for g in gfns}
    gm = _reads({g: vmm.gmem_marker(idx[g]) for g in gfns})
    an = _reads({g: vmm.anon_marker(idx[g]) for g in gfns})
    assert vmm.classify_backing(LAYOUT, gm) == ("guest_memfd", [])
    assert vmm.classify_backing(LAYOUT, an) == ("userspace_addr", [])


def test_classify_backing_fails_on_wrong_gfn_mixed_or_garbage() -> None:
    # The seed's translation: gfn 0x41 shows file index 0x41's marker instead of index 9.
    behaviour, problems = vmm.classify_backing(LAYOUT, _reads({0x41: vmm.gmem_marker(0x41)}))
    assert behaviour == "unexpected"
    assert "expected 0x474d0009" in problems[0] and "got 0x474d0041" in problems[0]
    mixed = _reads({0x20: vmm.gmem_marker(2), 0x21: vmm.anon_marker(3)})
    assert vmm.classify_backing(LAYOUT, mixed)[0] == "unexpected"
    assert vmm.classify_backing(LAYOUT, _reads({0x20: 0xDEAD}))[0] == "unexpected"


def _all(values: Callable[[int, int], int]) -> list[vmm.GuestRead]:
    return [
        vmm.GuestRead(g, values(g, gl.index_for_gfn(LAYOUT, g) or 0))
        for s in LAYOUT
        for g in range(s.base_gfn, s.gfn_end)
    ]


def test_oracle_check_is_not_meaningful_when_userspace_addr_serves() -> None:
    """Decoy markers at every gfn: the gfn -> index translation was never used, so no PASS."""
    verdict = vmm.judge_oracle_mapping(LAYOUT, _all(lambda g, i: vmm.anon_marker(i)))
    assert (verdict.status, verdict.checks) == ("NOT MEANINGFUL", ())
    assert "served from each slot's userspace_addr" in str(verdict.reason) and vmm.FINDING_ID in str(verdict.reason)
    assert len(verdict.evidence["reads"]) == sum(s.npages for s in LAYOUT)


def test_oracle_check_passes_only_on_the_guest_memfd_markers_of_the_oracle() -> None:
    good = vmm.judge_oracle_mapping(LAYOUT, _all(lambda g, i: vmm.gmem_marker(i)))
    assert good.status == "PASS" and len(good.checks) == sum(s.npages for s in LAYOUT)
    seed = vmm.judge_oracle_mapping(LAYOUT, _all(lambda g, i: vmm.gmem_marker(g)))  # seed: index = gfn
    assert seed.status == "FAIL"
    assert seed.failures[0].line() == ("FAIL gfn 0x20: expected 0x474d0002 (index 2), "
                                       "actual 0x474d0020 (guest_memfd marker of index 32)")
    assert vmm.judge_oracle_mapping(LAYOUT, []).status == "FAIL"


def test_punch_hole_judgement_distinguishes_the_three_outcomes() -> None:
    hole = gl.gfn_for_index(LAYOUT, 9)
    assert hole == 0x41
    gm = _all(lambda g, i: vmm.gmem_marker(i))
    punched = _all(lambda g, i: 0 if g == hole else vmm.gmem_marker(i))
    anon = _all(lambda g, i: vmm.anon_marker(i))
    assert vmm.judge_punch_hole(LAYOUT, hole, gm, punched).status == "PASS"
    idle = vmm.judge_punch_hole(LAYOUT, hole, anon, anon)
    assert idle.status == "NOT MEANINGFUL" and "punch-hole check" in str(idle.reason)
    # the hole falls back to the decoy view: a failure naming what was read
    fallback = _all(lambda g, i: vmm.anon_marker(i) if g == hole else vmm.gmem_marker(i))
    failed = vmm.judge_punch_hole(LAYOUT, hole, gm, fallback)
    (check,) = failed.failures
    assert check.name == "after punch: gfn 0x41" and check.expected == "0x00000000 (zero (punched))"
    assert check.actual.startswith("0x414e0009 (userspace_addr"), check.line()


@pytest.mark.kvm
@pytest.mark.host_requires(*vmm.HOST_REQUIREMENTS)
@pytest.mark.usefixtures("no_fd_leak")
def test_oracle_and_punch_checks_pass_only_where_guest_memfd_serves(kvm_system: KvmSystem) -> None:
    """Where the slots are served from userspace_addr (a PVM host) both checks must say so, not PASS."""
    backing = vmm.run_backing_source(kvm_system)
    mapping = vmm.run_oracle_mapping(kvm_system)
    hole = vmm.run_punch_hole(kvm_system, 9)
    assert len(mapping.evidence["reads"]) == sum(s.npages for s in LAYOUT)
    expected = {"guest_memfd": "PASS", "userspace_addr": "NOT MEANINGFUL"}[backing.evidence["behaviour"]]
    assert (mapping.status, hole.status) == (expected, expected), (mapping.summary(), hole.summary())
    if expected == "NOT MEANINGFUL":
        assert [f.id for f in backing.findings] == [vmm.FINDING_ID]
        assert vmm.FINDING_ID in str(mapping.reason) and vmm.FINDING_ID in str(hole.reason)
    else:
        assert [r["gfn"] for r in hole.evidence["after"] if r["value"] == 0] == [0x41]
        assert hole.evidence["index"] == 9


def test_host_requirements_cancel_without_mmap_init_shared() -> None:
    flags_0 = HostReport(
        kernel_release="7.3.4-amd64", kvm_device=True, kvm_reason=None, kvm_vendor_module="kvm_amd",
        kvm_api_version=12, cap_guest_memfd=1, guest_memfd_flags=0,
    )  # fmt: skip
    name, sentence = first_unmet(flags_0, vmm.HOST_REQUIREMENTS) or ("", "")
    assert name == "guest_memfd_mmap"
    assert sentence == "host KVM cannot mmap guest_memfd: KVM_CAP_GUEST_MEMFD_FLAGS 0x0 lacks GUEST_MEMFD_FLAG_MMAP"
    mmap_only = dataclasses.replace(flags_0, guest_memfd_flags=u.GUEST_MEMFD_FLAG_MMAP)
    assert "lacks GUEST_MEMFD_FLAG_INIT_SHARED" in str(first_unmet(mmap_only, vmm.HOST_REQUIREMENTS))
    both = dataclasses.replace(flags_0, guest_memfd_flags=u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED)
    assert first_unmet(both, vmm.HOST_REQUIREMENTS) is None


@pytest.mark.kvm
@pytest.mark.host_requires(*vmm.HOST_REQUIREMENTS)
@pytest.mark.usefixtures("no_fd_leak")
def test_backing_source_is_an_understood_behaviour(kvm_system: KvmSystem) -> None:
    verdict = vmm.run_backing_source(kvm_system)
    assert verdict.status == "PASS", verdict.summary()
    if verdict.evidence["behaviour"] == "userspace_addr":
        (finding,) = verdict.findings
        assert finding.severity == "divergence" and finding.evidence["reads"]
    else:
        assert verdict.findings == ()


@pytest.mark.kvm
@pytest.mark.host_requires(*vmm.HOST_REQUIREMENTS)
def test_punch_hole_refuses_an_unbound_index(kvm_system: KvmSystem) -> None:
    with pytest.raises(ValueError, match="bound to no slot"):
        vmm.run_punch_hole(kvm_system, 0)


@pytest.mark.kvm
@pytest.mark.host_requires(*vmm.HOST_REQUIREMENTS)
def test_without_markers_no_guest_memfd_page_is_allocated(kvm_system: KvmSystem) -> None:
    """The poison matrix decides per page whether it is mapped, clean or dirty: none is touched."""
    from host_stack.pagemap import read_pagemap

    with vmm.TinyVm(kvm_system, backing="decoy", markers=False) as tvm:
        present = [i for i in range(tvm.gmem_pages) if read_pagemap(tvm.gmem_map.addr + i * gl.PAGE_SIZE).present]
        assert present == [], f"expected no guest_memfd page present, got indexes {present}"
