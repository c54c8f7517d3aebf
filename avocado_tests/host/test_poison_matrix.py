"""The shared-guest_memfd poison matrix (host_stack.poison_matrix) on this host's kernel."""

from __future__ import annotations

from avocado import Test

from gmemtest.avocado_support import HOST_TEST_TIMEOUT_S, run_host_check
from gmemtest.host_checks import MATRIX_ITEM


class PoisonMatrix(Test):  # type: ignore[misc]  # avocado is untyped
    """
    Poison a shared guest_memfd page per row (injector x kill policy x mapped x dirty) and
    judge who got which SIGBUS, KPF_HWPOISON, HardwareCorrupted and the vCPU's memory-fault
    exit against the documented contracts; the contract the host follows is a finding.

    CANCELs with the host's sentence without memory failure; a frame the clean-up could not
    unpoison makes it WARN.

    :avocado: tags=host,gmem,hwpoison,matrix,kvm
    """

    # 16 rows, each a child plus its SIGBUS tracer: ~40 s alone in the lab host's L1, 130 s
    # there when Avocado runs it beside the other host tests (measured).
    timeout = 3 * HOST_TEST_TIMEOUT_S

    def test_matrix(self) -> None:
        run_host_check(self, MATRIX_ITEM)
