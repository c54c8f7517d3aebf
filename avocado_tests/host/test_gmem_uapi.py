"""guest_memfd uAPI cases (host_stack.gmem_uapi_cases) run for real on this host's KVM."""

from __future__ import annotations

from avocado import Test

from gmemtest.avocado_support import HOST_TEST_TIMEOUT_S, run_host_check
from gmemtest.host_checks import UAPI_ITEM


class GmemUapi(Test):  # type: ignore[misc]  # avocado is untyped
    """
    Every row of the guest_memfd uAPI table: creation, fallocate, file I/O, mmap, binding.

    A documented errno of another kernel passes with a finding (in the log and in
    ``uapi_cases.json``); an undocumented errno fails the test. A host without guest_memfd
    CANCELs with the probed capability (never from a case's errno: a host that claims
    guest_memfd and answers ENOTTY fails).

    :avocado: tags=host,gmem,uapi,kvm
    """

    timeout = HOST_TEST_TIMEOUT_S

    def test_cases(self) -> None:
        run_host_check(self, UAPI_ITEM)
