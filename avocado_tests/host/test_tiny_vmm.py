"""Tiny VMM scenarios: the guest confirms the gfn <-> guest_memfd index oracle."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from avocado import Test

from gmemtest.avocado_support import HOST_TEST_TIMEOUT_S, cancel_unless_host_meets
from host_stack import vmm
from host_stack.kvm import KvmSystem


class TinyVmm(Test):  # type: ignore[misc]  # avocado is untyped
    """
    A real-mode payload reads every gfn of a guest_memfd split across slots at non-zero offsets.

    The slots' userspace_addr are decoy buffers, so a read tells which source served it; where
    the host serves gmem slots from userspace_addr the oracle checks CANCEL with that reason.

    :avocado: tags=host,gmem,vmm,kvm
    """

    timeout = HOST_TEST_TIMEOUT_S

    def setUp(self) -> None:
        cancel_unless_host_meets(self, vmm.HOST_REQUIREMENTS)

    def _save(self, name: str, data: Any) -> None:
        (Path(self.outputdir) / name).write_text(json.dumps(data, indent=2))

    def _judge(self, result: vmm.OracleMappingResult | vmm.PunchHoleResult) -> None:
        if result.status == "not_meaningful":
            self.cancel(result.reason)
        if not result.ok:
            self.fail("; ".join(result.mismatches))

    def test_oracle_mapping(self) -> None:
        with KvmSystem() as system:
            try:
                result = vmm.run_oracle_mapping(system)
            except vmm.GmemUnsupported as exc:
                self.cancel(str(exc))
        self._save("oracle_mapping.json", result.to_json())
        self._judge(result)

    def test_punch_hole(self) -> None:
        with KvmSystem() as system:
            try:
                result = vmm.run_punch_hole(system, index=9)
            except vmm.GmemUnsupported as exc:
                self.cancel(str(exc))
        self._save("punch_hole.json", result.to_json())
        self._judge(result)

    def test_backing_source(self) -> None:
        """Which view serves the guest; a divergence is a finding, not a failure."""
        with KvmSystem() as system:
            try:
                result = vmm.run_backing_source(system)
            except vmm.GmemUnsupported as exc:
                self.cancel(str(exc))
        self._save("backing_source.json", result.to_json())
        findings = [result.finding.to_json()] if result.finding else []
        self._save("findings.json", findings)
        if result.finding is not None:
            # WARNING level in the test log, but not through self.log.warning: Avocado 113 turns
            # any self.log.warning call into a WARN status, and a finding must not change it.
            self.log.log(
                logging.WARNING,
                "FINDING %s (%s): %s",
                result.finding.id,
                result.finding.severity,
                result.finding.text,
            )
            self.whiteboard = json.dumps({"findings": findings})
        self.log.info("gmem slots are served from: %s", result.behaviour)
        if not result.ok:
            self.fail("; ".join(result.mismatches))
