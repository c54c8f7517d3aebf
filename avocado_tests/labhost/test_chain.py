"""The whole chain, inside the lab host: the host poisons the frame behind a guest page.

L1 (Debian 7.x, kvm_amd, memory failure) runs QEMU guests under KVM; each row poisons, with
hwpoison-inject, the L1 frame behind the guest program's page (found through gpa2hva and QEMU's
pagemap, proven by QEMU's own bytes there) and judges every layer: the L1 kernel (KPF_HWPOISON,
HardwareCorrupted, its recovery line, which QEMU thread it signalled with which si_code), QEMU
(the SIGBUS siginfo its vCPU thread got, its "Guest MCE Memory Error" line, MEMORY_FAILURE) and
the guest (MCE record, recovery, the program's siginfo). One shared L1 run per job serves these
tests and the other lab-host tests. A profile L1 cannot run CANCELs with the reason it probed.

Variants: kvm-default under L1's QEMU (the host's) and under Debian's newest QEMU (unpacked into
its own root by images.qemu_root); kvm-hugetlb (guest RAM on L1's 2 MiB hugetlb pages, its own
row); kvm-gmem under the newest QEMU.
"""

from __future__ import annotations

from avocado import Test

from gmemtest.avocado_support import LABHOST_TEST_TIMEOUT_S, run_chain_item


class HostPoisonChain(Test):  # type: ignore[misc]  # avocado is untyped
    """
    :avocado: tags=chain,labhost,host,kvm,nested,hwpoison,mce
    """

    timeout = LABHOST_TEST_TIMEOUT_S

    def test_ao_late_touch_kvm_default(self) -> None:
        """QEMU forwards the AO, the guest recovers the page, the touch gives AR in the guest.

        :avocado: tags=ao,kvm-default
        """
        run_chain_item(self, "host-ao-late-touch-4k", "kvm-default")

    def test_ao_early_kill_kvm_default(self) -> None:
        """:avocado: tags=ao,early,kvm-default"""
        run_chain_item(self, "host-ao-early-kill-4k", "kvm-default")

    def test_ao_reset_kvm_default(self) -> None:
        """The poisoned page across system_reset: QEMU replaces it, the rebooted guest reads it.

        :avocado: tags=ao,reset,kvm-default
        """
        run_chain_item(self, "host-ao-reset-4k", "kvm-default")

    def test_ar_touch_kvm_default(self) -> None:
        """The touch makes KVM signal QEMU's vCPU thread (AR), QEMU injects an SRAR.

        :avocado: tags=ar,kvm-default
        """
        run_chain_item(self, "host-ar-touch-4k", "kvm-default")

    def test_ao_late_touch_kvm_default_newer_qemu(self) -> None:
        """:avocado: tags=ao,kvm-default,newer-qemu"""
        run_chain_item(self, "host-ao-late-touch-4k", "kvm-default+newer-qemu")

    def test_ao_early_kill_kvm_default_newer_qemu(self) -> None:
        """:avocado: tags=ao,early,kvm-default,newer-qemu"""
        run_chain_item(self, "host-ao-early-kill-4k", "kvm-default+newer-qemu")

    def test_ao_reset_kvm_default_newer_qemu(self) -> None:
        """The poisoned page across system_reset: QEMU replaces it, the rebooted guest reads it.

        :avocado: tags=ao,reset,kvm-default,newer-qemu
        """
        run_chain_item(self, "host-ao-reset-4k", "kvm-default+newer-qemu")

    def test_ar_touch_kvm_default_newer_qemu(self) -> None:
        """:avocado: tags=ar,kvm-default,newer-qemu"""
        run_chain_item(self, "host-ar-touch-4k", "kvm-default+newer-qemu")

    def test_ao_hugetlb_thp_kvm_hugetlb(self) -> None:
        """Guest RAM on 2 MiB host pages: 2 MiB lost on the host, 4 KiB forwarded, the next touch is an AR.

        :avocado: tags=ao,ar,hugetlb,kvm-hugetlb
        """
        run_chain_item(self, "host-ao-hugetlb-thp", "kvm-hugetlb")

    def test_ao_late_touch_kvm_gmem(self) -> None:
        """:avocado: tags=ao,kvm-gmem,gmem"""
        run_chain_item(self, "host-ao-late-touch-4k", "kvm-gmem")

    def test_ao_early_kill_kvm_gmem(self) -> None:
        """:avocado: tags=ao,early,kvm-gmem,gmem"""
        run_chain_item(self, "host-ao-early-kill-4k", "kvm-gmem")

    def test_ao_reset_kvm_gmem(self) -> None:
        """The poisoned page across system_reset: QEMU replaces it, the rebooted guest reads it.

        :avocado: tags=ao,reset,kvm-gmem,gmem
        """
        run_chain_item(self, "host-ao-reset-4k", "kvm-gmem")

    def test_ar_touch_kvm_gmem(self) -> None:
        """:avocado: tags=ar,kvm-gmem,gmem"""
        run_chain_item(self, "host-ar-touch-4k", "kvm-gmem")
