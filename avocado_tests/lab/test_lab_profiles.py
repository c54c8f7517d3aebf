"""The guest scenarios under KVM lab profiles (plain KVM, guest_memfd-backed RAM, SEV-SNP, TDX).

On a host that cannot run them these CANCEL with the probed sentences (`gmemtest preflight`
prints the same ones); on a lab host they run the very scenarios of the TCG suite.
"""

from __future__ import annotations

from avocado import Test

from gmemtest.avocado_support import GUEST_TEST_TIMEOUT_S, run_guest_scenario


class KvmLabProfiles(Test):  # type: ignore[misc]  # avocado is untyped
    """
    :avocado: tags=guest,lab,kvm,mce,srao
    """

    timeout = GUEST_TEST_TIMEOUT_S

    def test_kvm_default(self) -> None:
        """:avocado: tags=kvm-default"""
        run_guest_scenario(self, "srao-late-touch-4k", profile="kvm-default")

    def test_kvm_gmem(self) -> None:
        """:avocado: tags=kvm-gmem,gmem"""
        run_guest_scenario(self, "srao-late-touch-4k", profile="kvm-gmem")

    def test_kvm_sev_snp(self) -> None:
        """:avocado: tags=kvm-sev-snp,snp,confidential"""
        run_guest_scenario(self, "srao-late-touch-4k", profile="kvm-sev-snp")

    def test_kvm_tdx(self) -> None:
        """:avocado: tags=kvm-tdx,tdx,confidential"""
        run_guest_scenario(self, "srao-late-touch-4k", profile="kvm-tdx")
