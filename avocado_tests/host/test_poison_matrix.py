"""The shared-guest_memfd poison matrix (host_stack.poison_matrix) on this host's kernel."""

from __future__ import annotations

from pathlib import Path

from avocado import Test

from gmemtest.avocado_support import HOST_TEST_TIMEOUT_S, cancel_unless_host_meets, judge
from host_stack.poison_matrix import MATRIX_REQUIREMENTS, MatrixCancelled, run_poison_matrix


class PoisonMatrix(Test):  # type: ignore[misc]  # avocado is untyped
    """
    Poison a shared guest_memfd page per row (injector x kill policy x mapped x dirty) and
    judge who got which SIGBUS, KPF_HWPOISON, HardwareCorrupted and the vCPU's memory-fault
    exit against the documented contracts; the contract the host follows is a finding.

    CANCELs with the host's sentence without memory failure; a frame the clean-up could not
    unpoison makes it WARN.

    :avocado: tags=host,gmem,hwpoison,matrix,kvm
    """

    # 16 rows, each a child plus its SIGBUS tracer: ~40 s alone in the lab host's L1, 130 s
    # there when Avocado runs it beside the other host tests (measured).
    timeout = 3 * HOST_TEST_TIMEOUT_S

    def test_matrix(self) -> None:
        cancel_unless_host_meets(self, MATRIX_REQUIREMENTS)
        try:
            result = run_poison_matrix()
        except MatrixCancelled as exc:
            (Path(self.outputdir) / "cancel_reason.txt").write_text(exc.reason + "\n")
            self.cancel(exc.reason)
            return
        (Path(self.outputdir) / "poison_matrix.json").write_text(result.to_json() + "\n")
        for row in result.evidence.get("table", []):
            self.log.info("%s %s: matches %s", row["status"], row["row"], "/".join(row.get("matches", [])) or "-")
        for finding in result.findings:
            self.log.info("FINDING %s: %s", finding.id, finding.text)
        for warning in result.warnings:
            # self.log.warning on purpose: Avocado turns it into WARN, and a frame left
            # poisoned by the clean-up must not hide behind a PASS.
            self.log.warning("CLEANUP %s", warning)
        judge(self, result)
