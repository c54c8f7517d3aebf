"""The conversion row's judge: the expected view of every layer, and each wrong one named."""

from __future__ import annotations

import dataclasses

import pytest

from gmemtest.conversion_oracle import BadRequest, ConversionRecord, Wedge, judge_conversions, step_checks
from gmemtest.private_page import Liveness, PageViews, describe_bytes, refused_range
from guests.probe_client import fill_page
from host_stack.attribute_trace import AttributeChange
from qmp_helpers.conversions import Conversion, TracedConversion

GPA = 0x1F8FF000
ALIVE = Liveness(True, "running", "the probe answered in 9 ms", 0.009)


def _conversion(to_private: bool, gpa: int = GPA) -> Conversion:
    return Conversion(gpa, 0x1000, to_private, None, 9.0, (TracedConversion(gpa, 0x1000, to_private),), 10.0)


def _step(n: int, seed: int) -> PageViews:
    private = n % 2 == 0
    return PageViews(f"step {n + 1}", _conversion(private),
                     (AttributeChange(170, "qemu-system-x86", GPA >> 12, (GPA >> 12) + 1, 0x8 if private else 0),),
                     ((GPA, 0x1000),) if private else (), "zeros", seed, f"the fill of seed {seed}",
                     "zeros" if private else f"the fill of seed {seed}",
                     "zeros" if private else f"the fill of seed {seed}", ALIVE)


def _record(**changes: object) -> ConversionRecord:
    refused = Conversion(GPA + 0x800, 0x1000, True, f"gpa {GPA + 0x800:#x} is not aligned to the page size 0x1000",
                         1.0, (), None)
    bad = BadRequest("unaligned gpa", f"{GPA + 0x800:#x}", refused, (), (), ALIVE)
    wedge = Wedge("vCPU 0's GDT", 0x1EE0B000, _conversion(True, 0x1EE0B000),
                  Liveness(False, "running", "the probe did not answer within 5 s; QMP events: RESET", 5.0),
                  "it reset itself", (AttributeChange(168, "qemu-system-x86", 0xC0, 0x20000, 0),), (), "")
    record = ConversionRecord(GPA, tuple(_step(n, s) for n, s in enumerate((0x5A, 0xA5, 0x3C, 0xC3))), (bad,), wedge)
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def _failed(record: ConversionRecord) -> list[str]:
    return [c.name for c in judge_conversions(record) if not c.ok]


def test_every_layer_as_expected_passes_every_check() -> None:
    checks = judge_conversions(_record())
    assert len(checks) == 4 * 9 + 4 + 5 and all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
    assert {c.layer for c in checks} == {"qemu", "host", "guest"}


def test_a_private_fill_visible_to_the_host_fails_both_host_views() -> None:
    leaky = dataclasses.replace(_step(0, 0x5A), qemu_bytes="the fill of seed 90", hva_bytes="the fill of seed 90")
    failed = [c for c in step_checks(GPA, leaky) if not c.ok]
    assert [c.layer for c in failed] == ["qemu", "host"]
    assert all("must not be visible" in c.expected for c in failed)


@pytest.mark.parametrize(("field", "value", "named"), [
    ("kvm_changes", (), "KVM's attributes"),
    ("qemu_private", (), "QEMU's record"),
    ("guest_before_fill", "the fill of seed 195", "reads the page right after"),
    ("conversion", Conversion(GPA, 0x1000, True, None, 1.0, (), None), "QEMU's trace"),
])
def test_each_wrong_layer_is_named(field: str, value: object, named: str) -> None:
    step = dataclasses.replace(_step(0, 0x5A), **{field: value})  # type: ignore[arg-type]
    failed = [c.name for c in step_checks(GPA, step) if not c.ok]
    assert len(failed) == 1 and named in failed[0], failed


def test_a_bad_request_qemu_carried_out_fails_and_says_so() -> None:
    record = _record()
    converted = dataclasses.replace(record.bad[0], conversion=_conversion(True, GPA + 0x800))
    assert _failed(dataclasses.replace(record, bad=(converted,))) == [
        "bad request (unaligned gpa): QEMU refuses it by name"]


def test_a_guest_that_kept_answering_means_the_wedge_was_not_seen() -> None:
    record = _record()
    assert record.wedge is not None
    unnoticed = dataclasses.replace(record.wedge, alive=ALIVE)
    assert _failed(dataclasses.replace(record, wedge=unnoticed)) == [
        "a page the guest needs (vCPU 0's GDT): the row notices the guest stopped"]


def test_a_reset_that_left_a_page_private_fails_at_qemu_and_kvm() -> None:
    record = _record()
    assert record.wedge is not None
    kept = dataclasses.replace(record.wedge, reset_changes=(), private_after_reset=((0x1EE0B000, 0x1000),))
    assert _failed(dataclasses.replace(record, wedge=kept)) == [
        "after the reset: QEMU's record", "after the reset: KVM made the pages shared"]


def test_refused_range_reads_the_image_qemu_names() -> None:
    error = ("0x1000000+0x1000 overlaps ROM '/c/kernel ELF program header segment 0' at 0x1000000+0x1e01d32")
    assert refused_range(error) == ("ROM '/c/kernel ELF program header segment 0'", 0x1000000, 0x1E01D32)
    assert refused_range("gpa 0x2800 is not aligned to the page size 0x1000") is None


def test_describe_bytes_names_zeros_a_fill_or_neither() -> None:
    assert describe_bytes(bytes(4096)) == "zeros"
    assert describe_bytes(fill_page(0x5A), (0xA5, 0x5A)) == "the fill of seed 90"
    assert describe_bytes(b"\x01" + bytes(4095), (0x5A,)).startswith("other bytes (1 of 4096 non-zero")


def test_gmemtest_qmp_takes_json_or_name_value_words_and_names_a_bad_one() -> None:
    from gmemtest.cli import qmp_arguments

    assert qmp_arguments(['{"command-line": "info mtree"}']) == {"command-line": "info mtree"}
    assert qmp_arguments(["gpa=0x70000", "size=4096", "private=true", "name=swp0"]) == {
        "gpa": 0x70000, "size": 4096, "private": True, "name": "swp0"}
    assert qmp_arguments([]) == {}
    with pytest.raises(ValueError, match="argument 'gpa' is neither a JSON object nor NAME=VALUE"):
        qmp_arguments(["gpa"])
    with pytest.raises(ValueError, match="not JSON"):
        qmp_arguments(['{"gpa": }'])
