"""How a guest test gets its guest: a real boot, and a restore from a saved boot.

Every other guest test takes whichever its job's snapshot cache gives; these two make sure
each path is exercised and judged in every job (-p snapshot=off cancels the restore one).
"""

from __future__ import annotations

from avocado import Test

from gmemtest.avocado_support import GUEST_TEST_TIMEOUT_S, check_guest_boot


class GuestBoot(Test):  # type: ignore[misc]  # avocado is untyped
    """
    :avocado: tags=guest,tcg,boot
    """

    timeout = GUEST_TEST_TIMEOUT_S

    def test_real_boot(self) -> None:
        check_guest_boot(self, restore=False)

    def test_restore_from_snapshot(self) -> None:
        """:avocado: tags=snapshot"""
        check_guest_boot(self, restore=True)
