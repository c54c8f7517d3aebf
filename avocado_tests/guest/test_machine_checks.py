"""Machine checks injected into a TCG guest through QMP, judged against the layout oracle.

Each test boots its own guest (the panic scenario ends it, and a poisoned page is never
returned), runs one row of gmemtest.scenarios and leaves the evidence in its outputdir:
console.log, qmp.jsonl, probe.jsonl, dmesg.txt, mce_record.trace, verdict.txt.
"""

from __future__ import annotations

from avocado import Test

from gmemtest.avocado_support import GUEST_TEST_TIMEOUT_S, run_guest_scenario


class SraoLateKill(Test):  # type: ignore[misc]  # avocado is untyped
    """
    Action-optional MCE with late kill: nothing happens until the program touches the page.

    :avocado: tags=guest,tcg,mce,srao,late
    """

    timeout = GUEST_TEST_TIMEOUT_S

    def test_anon_4k(self) -> None:
        """:avocado: tags=4k"""
        run_guest_scenario(self, "srao-late-touch-4k")

    def test_thp(self) -> None:
        """:avocado: tags=thp"""
        run_guest_scenario(self, "srao-late-touch-thp")

    def test_hugetlb_2m(self) -> None:
        """:avocado: tags=hugetlb"""
        run_guest_scenario(self, "srao-late-touch-hugetlb")

    def test_broadcast_smp2(self) -> None:
        """:avocado: tags=smp,broadcast"""
        run_guest_scenario(self, "srao-broadcast-smp2-4k")

    def test_two_pages_4k(self) -> None:
        """:avocado: tags=4k,two"""
        run_guest_scenario(self, "srao-late-touch-two-4k")


class SraoFreePage(Test):  # type: ignore[misc]
    """
    Action-optional MCE on a page nobody maps: the guest kernel recovers it alone.

    :avocado: tags=guest,tcg,mce,srao,free
    """

    timeout = GUEST_TEST_TIMEOUT_S

    def test_free_buddy_page(self) -> None:
        run_guest_scenario(self, "srao-free-page")


class SraoEarlyKill(Test):  # type: ignore[misc]
    """
    Action-optional MCE with early kill: BUS_MCEERR_AO arrives without a touch.

    :avocado: tags=guest,tcg,mce,srao,early
    """

    timeout = GUEST_TEST_TIMEOUT_S

    def test_prctl(self) -> None:
        """:avocado: tags=prctl"""
        run_guest_scenario(self, "srao-early-kill-prctl-4k")

    def test_sysctl(self) -> None:
        """:avocado: tags=sysctl"""
        run_guest_scenario(self, "srao-early-kill-sysctl-4k")


class SrarActionRequired(Test):  # type: ignore[misc]
    """
    Action-required MCE: recoverable in user mode, fatal in the kernel.

    :avocado: tags=guest,tcg,mce,srar
    """

    timeout = GUEST_TEST_TIMEOUT_S

    def test_user_mode(self) -> None:
        """:avocado: tags=user"""
        run_guest_scenario(self, "srar-user-spin-4k")

    def test_kernel_mode_panics(self) -> None:
        """:avocado: tags=kernel,panic"""
        run_guest_scenario(self, "srar-kernel-panic")
