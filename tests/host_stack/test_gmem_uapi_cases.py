"""Every guest_memfd uAPI case of the table, for real on /dev/kvm."""

from __future__ import annotations

import errno

import pytest

from host_stack.gmem_uapi_cases import CASES, UapiCase, case_by_id, run_case
from host_stack.kvm import KvmSystem

pytestmark = pytest.mark.kvm


@pytest.mark.usefixtures("no_fd_leak")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(kvm_system: KvmSystem, case: UapiCase) -> None:
    result = run_case(case, kvm_system)
    if result.status == "not_applicable":
        pytest.skip(result.message)
    assert result.status == "pass", result.message


def test_a_wrong_expectation_fails_with_expected_and_actual(kvm_system: KvmSystem) -> None:
    # The runner must be able to fail: the same action with a wrong expected errno.
    real = case_by_id("create.size_unaligned")
    wrong = UapiCase(real.id, real.description, errno.EEXIST, "kernel", real.basis, real.action)
    result = run_case(wrong, kvm_system)
    assert result.status == "fail"
    assert "expected EEXIST" in result.message and "got EINVAL" in result.message


def test_unknown_case_id_lists_known_ids() -> None:
    with pytest.raises(KeyError, match=r"create\.ok"):
        case_by_id("nope")
