"""Tiny VMM scenarios: the guest confirms the gfn <-> guest_memfd index oracle."""

from __future__ import annotations

from avocado import Test

from gmemtest.avocado_support import HOST_TEST_TIMEOUT_S, run_host_check
from gmemtest.host_checks import BACKING_ITEM, MAPPING_ITEM, PUNCH_ITEM


class TinyVmm(Test):  # type: ignore[misc]  # avocado is untyped
    """
    A real-mode payload reads every gfn of a guest_memfd split across slots at non-zero offsets.

    The slots' userspace_addr are decoy buffers, so a read tells which source served it; where
    the host serves gmem slots from userspace_addr the oracle checks CANCEL as NOT MEANINGFUL.

    :avocado: tags=host,gmem,vmm,kvm
    """

    timeout = HOST_TEST_TIMEOUT_S

    def test_oracle_mapping(self) -> None:
        run_host_check(self, MAPPING_ITEM)

    def test_punch_hole(self) -> None:
        run_host_check(self, PUNCH_ITEM)

    def test_backing_source(self) -> None:
        """Which view serves the guest; a divergence is a finding, not a failure."""
        run_host_check(self, BACKING_ITEM)
