"""The seed's regression: poison behind a slot with a non-zero guest_memfd offset."""

from __future__ import annotations

from pathlib import Path

from avocado import Test

from gmemtest.avocado_support import HOST_TEST_TIMEOUT_S, cancel_unless_host_meets, judge
from host_stack.seed_regression import SEED_REQUIREMENTS, SeedCancelled, run_seed_regression


class SeedRegression(Test):  # type: ignore[misc]  # avocado is untyped
    """
    Poison one guest_memfd page, touch it from the guest and from userspace, judge the answer.

    CANCELs with the host's sentence when it cannot run (no guest_memfd MMAP|INIT_SHARED, no
    memory failure); a frame the clean-up could not unpoison makes it WARN.

    :avocado: tags=host,gmem,hwpoison,seed,kvm
    """

    timeout = HOST_TEST_TIMEOUT_S

    def test_poisoned_gmem_page(self) -> None:
        cancel_unless_host_meets(self, SEED_REQUIREMENTS)
        try:
            verdict = run_seed_regression()
        except SeedCancelled as exc:
            (Path(self.outputdir) / "cancel_reason.txt").write_text(exc.reason + "\n")
            self.cancel(exc.reason)
            return
        (Path(self.outputdir) / "seed_regression.json").write_text(verdict.to_json() + "\n")
        for warning in verdict.warnings:
            # self.log.warning on purpose: Avocado turns it into WARN, and a frame left
            # poisoned by the clean-up must not hide behind a PASS.
            self.log.warning("CLEANUP %s", warning)
        judge(self, verdict)
