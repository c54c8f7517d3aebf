"""The conversion table: judged on recorded answers everywhere, run for real on a KVM that
creates software-protected VMs (the lab host with the rebuilt KVM: the test command's private
batch, or ``gmemtest labhost test --kvm sw-protected tests/host_stack/test_conversion_cases.py``)."""

from __future__ import annotations

import pytest

from host_stack import conversion_cases as cc
from host_stack.kvm import KvmSystem
from outcome import Verdict


def test_a_case_that_saw_what_its_contract_says_passes_and_anything_else_fails_by_name() -> None:
    case = next(c for c in cc.CASES if c.id == "bad_requests")
    right = cc.judge_case(case, cc.Seen(dict(case.expect())))
    assert right.passed and len(right.checks) == len(case.expect())
    wrong = cc.judge_case(case, cc.Seen({**case.expect(), "size 0": "success"}))
    (failed,) = wrong.failures
    assert failed.name.endswith("size 0 [host]") and (failed.expected.split(" ")[0], failed.actual) == (
        "EINVAL", "success"), failed
    assert cc.judge_case(case, cc.Seen({})).failures[0].actual == "not observed"


def test_the_oracle_predicts_zeroed_private_pages_and_the_decoys_elsewhere() -> None:
    case = next(c for c in cc.CASES if c.id == "serving")
    after = case.expect()["after converting one gfn per slot"]
    assert "0x21=0x0" in after and "0x20=0x414e0002" in after, after  # slot 1 maps index 2 at gfn 0x20


@pytest.mark.host_requires("kvm", "sw_protected_vm")
@pytest.mark.parametrize("case", cc.CASES, ids=lambda c: c.id)
def test_every_conversion_case_holds_on_a_software_protected_vm(case: cc.ConversionCase) -> None:
    with KvmSystem() as system:
        verdict = cc.run_case(case, system)
    assert isinstance(verdict, Verdict) and verdict.passed, verdict.summary()
