"""The host half for real: every host check, run inside the lab host (an L1 KVM host under TCG).

The lab host runs Debian's 7.x kernel with kvm_amd, memory failure and hwpoison_inject, so what
this machine's PVM KVM cannot do (memory failure, the seed regression, gmem slots served from
guest_memfd) runs here for real. One L1 run serves the whole class; each check is a test of its
own with its own status and evidence.
"""

from __future__ import annotations

from avocado import Test

from gmemtest.avocado_support import LABHOST_PREFLIGHT, LABHOST_TEST_TIMEOUT_S, run_labhost_item
from gmemtest.host_checks import BACKING_ITEM, MAPPING_ITEM, MATRIX_ITEM, PUNCH_ITEM, SEED_ITEM, UAPI_ITEM


class LabhostHostChecks(Test):  # type: ignore[misc]  # avocado is untyped
    """
    :avocado: tags=labhost,host,kvm,nested
    """

    timeout = LABHOST_TEST_TIMEOUT_S

    def test_preflight(self) -> None:
        """hwpoison proven, KVM boots Linux, guest_memfd flags 0x3: L1 is the host it claims to be."""
        run_labhost_item(self, LABHOST_PREFLIGHT)

    def test_gmem_uapi(self) -> None:
        """:avocado: tags=gmem,uapi"""
        run_labhost_item(self, UAPI_ITEM)

    def test_tiny_vmm_oracle_mapping(self) -> None:
        """:avocado: tags=gmem,vmm"""
        run_labhost_item(self, MAPPING_ITEM)

    def test_tiny_vmm_punch_hole(self) -> None:
        """:avocado: tags=gmem,vmm"""
        run_labhost_item(self, PUNCH_ITEM)

    def test_tiny_vmm_backing_source(self) -> None:
        """Served from guest_memfd here: the divergence finding of the PVM host must not appear.

        :avocado: tags=gmem,vmm
        """
        run_labhost_item(self, BACKING_ITEM)

    def test_seed_regression(self) -> None:
        """Memory-fault exit at the oracle's gpa, and BUS_MCEERR_AR lsb 12 to userspace.

        :avocado: tags=gmem,hwpoison,seed
        """
        run_labhost_item(self, SEED_ITEM)

    def test_poison_matrix(self) -> None:
        """Which contract the kernel follows for a poisoned shared guest_memfd page, row by row.

        :avocado: tags=gmem,hwpoison,matrix
        """
        run_labhost_item(self, MATRIX_ITEM)
