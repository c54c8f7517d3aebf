"""Every guest scenario under each KVM lab profile (plain KVM, guest_memfd-backed RAM, RAM on the host's
2 MiB hugetlb pages, SEV-SNP, TDX).

On a host that cannot run them these CANCEL with the probed sentences (`gmemtest preflight`
prints the same ones); on a lab host each test runs every scenario of the TCG suite under its
profile, with the evidence of each in ``data/<scenario>/``.
"""

from __future__ import annotations

from avocado import Test

from gmemtest.avocado_support import GUEST_TEST_TIMEOUT_S, run_every_scenario_under
from gmemtest.scenarios import SCENARIOS


class KvmLabProfiles(Test):  # type: ignore[misc]  # avocado is untyped
    """
    :avocado: tags=guest,lab,kvm,mce,srao
    """

    timeout = GUEST_TEST_TIMEOUT_S * len(SCENARIOS)

    def test_kvm_default(self) -> None:
        """:avocado: tags=kvm-default"""
        run_every_scenario_under(self, "kvm-default")

    def test_kvm_gmem(self) -> None:
        """:avocado: tags=kvm-gmem,gmem"""
        run_every_scenario_under(self, "kvm-gmem")

    def test_kvm_hugetlb(self) -> None:
        """:avocado: tags=kvm-hugetlb,hugetlb"""
        run_every_scenario_under(self, "kvm-hugetlb")

    def test_kvm_sev_snp(self) -> None:
        """:avocado: tags=kvm-sev-snp,snp,confidential"""
        run_every_scenario_under(self, "kvm-sev-snp")

    def test_kvm_tdx(self) -> None:
        """:avocado: tags=kvm-tdx,tdx,confidential"""
        run_every_scenario_under(self, "kvm-tdx")
