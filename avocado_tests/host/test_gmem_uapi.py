"""guest_memfd uAPI cases (host_stack.gmem_uapi_cases) run for real on this host's KVM."""

from __future__ import annotations

import json
from pathlib import Path

from avocado import Test

from gmemtest.avocado_support import HOST_TEST_TIMEOUT_S, cancel_unless_host_meets, judge
from host_stack.gmem_uapi_cases import HOST_REQUIREMENTS, run_table


class GmemUapi(Test):  # type: ignore[misc]  # avocado is untyped
    """
    Every row of the guest_memfd uAPI table: creation, fallocate, file I/O, mmap, binding.

    A documented errno of another kernel is a finding, listed in the log and in
    ``uapi_findings.json``; an undocumented errno fails the test. A host without guest_memfd
    CANCELs with the probed capability (never from a case's errno: a host that claims
    guest_memfd and answers ENOTTY fails).

    :avocado: tags=host,gmem,uapi,kvm
    """

    timeout = HOST_TEST_TIMEOUT_S

    def test_cases(self) -> None:
        cancel_unless_host_meets(self, HOST_REQUIREMENTS)
        verdict = run_table()
        (Path(self.outputdir) / "uapi_cases.json").write_text(verdict.to_json() + "\n")
        for check in verdict.checks:
            self.log.info("%s", check.line())
        for case, why in verdict.evidence.get("did_not_run", {}).items():
            self.log.info("NOT RUN %s: %s", case, why)
        findings = [f.to_json() for f in verdict.findings]
        # A documented errno of another kernel: listed (and written out), not a failure.
        (Path(self.outputdir) / "uapi_findings.json").write_text(json.dumps(findings, indent=2))
        for finding in verdict.findings:
            self.log.info("FINDING %s: %s", finding.id, finding.text)
        judge(self, verdict)
