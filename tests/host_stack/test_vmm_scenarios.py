"""The tiny VMM: payload encoding (pure) and the scenarios on real KVM."""

from __future__ import annotations

import pytest

from host_stack import gmem_layout as gl
from host_stack import vmm
from host_stack.kvm import KvmSystem


def test_payload_encodes_each_gfn_segment_and_ends_in_hlt() -> None:
    code = vmm.build_read_payload([0x41])
    assert code[:3] == bytes([0xB8, 0x41, 0x00])  # mov ax, gfn
    assert code[7:12] == bytes([0xB8, 0x00, 0x41, 0x8E, 0xD8])  # mov ax, 0x4100; mov ds, ax
    assert code[-3:] == bytes([0xF4, 0xEB, 0xFE])
    assert len(vmm.build_read_payload([1, 2, 3])) == 3 * 21 + 3


def test_payload_refuses_gfns_beyond_real_mode() -> None:
    with pytest.raises(ValueError, match="real-mode reach"):
        vmm.build_read_payload([0x100])


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


@pytest.mark.kvm
@pytest.mark.usefixtures("no_fd_leak")
def test_every_slot_maps_the_index_the_oracle_predicts(kvm_system: KvmSystem) -> None:
    result = vmm.run_oracle_mapping(kvm_system)
    assert result.ok, result.mismatches
    assert len(result.reads) == sum(s.npages for s in LAYOUT)


@pytest.mark.kvm
@pytest.mark.usefixtures("no_fd_leak")
@pytest.mark.parametrize("index", [2, 9, 21])
def test_punch_hole_seen_at_exactly_the_oracle_gfn(kvm_system: KvmSystem, index: int) -> None:
    result = vmm.run_punch_hole(kvm_system, index)
    assert result.ok, result.mismatches
    zeros = [r.gfn for r in result.after if r.value == 0]
    assert zeros == [gl.gfn_for_index(LAYOUT, index)]


@pytest.mark.kvm
@pytest.mark.usefixtures("no_fd_leak")
def test_backing_source_is_an_understood_behaviour(kvm_system: KvmSystem) -> None:
    result = vmm.run_backing_source(kvm_system)
    assert result.ok, result.mismatches
    if result.behaviour == "userspace_addr":
        assert result.finding is not None
        assert result.finding.severity == "divergence"
        assert result.finding.evidence["reads"]
    else:
        assert result.finding is None


@pytest.mark.kvm
def test_punch_hole_refuses_an_unbound_index(kvm_system: KvmSystem) -> None:
    with pytest.raises(ValueError, match="bound to no slot"):
        vmm.run_punch_hole(kvm_system, 0)
