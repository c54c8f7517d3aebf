"""The seed's regression: poison behind a slot with a non-zero guest_memfd offset."""

from __future__ import annotations

from avocado import Test

from gmemtest.avocado_support import HOST_TEST_TIMEOUT_S, run_host_check
from gmemtest.host_checks import SEED_ITEM


class SeedRegression(Test):  # type: ignore[misc]  # avocado is untyped
    """
    Poison one guest_memfd page, touch it from the guest and from userspace, judge the answer.

    CANCELs with the host's sentence when it cannot run (no guest_memfd MMAP|INIT_SHARED, no
    memory failure); a frame the clean-up could not unpoison makes it WARN.

    :avocado: tags=host,gmem,hwpoison,seed,kvm
    """

    timeout = HOST_TEST_TIMEOUT_S

    def test_poisoned_gmem_page(self) -> None:
        run_host_check(self, SEED_ITEM)
