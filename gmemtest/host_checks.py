"""The host checks a qualification runs, as data: one row each, every one returning a Verdict.

A row names the report item, the host requirements it needs (the check's own tuple, asked before
anything runs), how to run it, and how to say its result in one line. ``HostCheck.verdict`` is
the one way to run a row: ``gmemtest.qualify`` walks the table with it, the host Avocado tests
(``avocado_support.run_host_check``) run one row each, and the lab host's Avocado tests pick
their items by these names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from gmemtest.requirements import host_unmet
from host_stack import conversion_cases, gmem_uapi_cases, vmm
from host_stack.capabilities import HostReport
from host_stack.kvm import KvmSystem
from host_stack.live_child import ChildCancelled
from host_stack.poison_matrix import MATRIX_REQUIREMENTS, run_poison_matrix
from host_stack.private_oracle import PRIVATE_SEED_NAME
from host_stack.private_poison import PRIVATE_REQUIREMENTS, run_private_matrix, run_private_seed
from host_stack.seed_regression import SEED_REQUIREMENTS, run_seed_regression
from outcome import Verdict

__all__ = ["BACKING_ITEM", "CONVERSION_ITEM", "HOST_CHECK_TABLE", "MAPPING_ITEM", "MATRIX_ITEM", "MEMORY_KINDS",
           "NOT_MEANINGFUL_ON_DECOY", "PRIVATE_MATRIX_ITEM", "PRIVATE_SEED_ITEM", "PUNCH_ITEM", "SEED_ITEM",
           "UAPI_ITEM", "HostCheck", "host_check", "host_checks_of"]

UAPI_ITEM: Final = "guest_memfd uAPI cases"
MAPPING_ITEM: Final = "tiny VMM: slots map the oracle's indexes"
PUNCH_ITEM: Final = "tiny VMM: punch hole seen at the oracle's gfn"
BACKING_ITEM: Final = "tiny VMM: memory serving gmem slots"
SEED_ITEM: Final = "seed regression: poison behind a slot with pgoff > 0"
MATRIX_ITEM: Final = "poison matrix: shared guest_memfd page (injector x kill policy x mapped x dirty)"
CONVERSION_ITEM: Final = "private/shared conversions of a software-protected VM"
PRIVATE_SEED_ITEM: Final = f"{PRIVATE_SEED_NAME}: poison behind a private gfn of a slot with pgoff > 0"
PRIVATE_MATRIX_ITEM: Final = "poison matrix: private guest_memfd page (injector x kill policy)"
# Which host checks a qualification runs: of shared guest_memfd memory (any KVM), of private
# memory (a KVM that creates software-protected VMs), or all.
MEMORY_KINDS: Final = ("all", "shared", "private")
PUNCH_INDEX: Final = vmm.DEFAULT_LAYOUT[1].gmem_pgoff + 1  # file index 9 -> gfn 0x41
# The oracle checks that prove nothing where gmem slots are served from userspace_addr (vmm's
# NOT MEANINGFUL): the main job's plan predicts their CANCEL from the backing-source finding.
NOT_MEANINGFUL_ON_DECOY: Final = (MAPPING_ITEM, PUNCH_ITEM)


@dataclass(frozen=True)
class HostCheck:
    """One host check of the qualification. ``run`` may raise ``ChildCancelled`` (CANNOT RUN)."""

    name: str
    requirements: tuple[str, ...]
    run: Callable[[HostReport | None], Verdict]
    summary: Callable[[Verdict], str]
    evidence: str  # the file the whole verdict is written to (beside the report, in the test's outputdir)
    all_checks: bool = False  # list every check in the item's details, not only the failed ones
    lines: Callable[[Verdict], list[str]] | None = None  # more detail lines (the matrix's rows)
    key: str = ""  # its Avocado test method: test_<key> (gmemtest.avocado_files)
    tags: tuple[str, ...] = ()  # its Avocado tags besides its class's
    private: bool = False  # it needs private memory: the lab host runs it under the rebuilt KVM

    def verdict(self, report: HostReport | None = None) -> Verdict:
        """Gate, then run. CANNOT RUN with the unmet requirement before anything runs (``report``:
        default this host's, probed), or with the child's own sentence when it finds what the
        probe did not (``ChildCancelled``, from the seed's or the matrix's child)."""
        reason = host_unmet(self.requirements, report)
        if reason is not None:
            return Verdict.did_not_run(self.name, "CANNOT RUN", reason)
        try:
            return self.run(report)
        except ChildCancelled as exc:
            return Verdict.did_not_run(self.name, "CANNOT RUN", exc.reason)

    def describe(self, verdict: Verdict) -> str:
        """The verdict in one line: the row's summary of what ran, or why it did not."""
        return verdict.reason if verdict.reason is not None else self.summary(verdict)


def _on_kvm(check: Callable[[KvmSystem], Verdict]) -> Callable[[HostReport | None], Verdict]:
    def run(_report: HostReport | None) -> Verdict:
        with KvmSystem() as system:
            return check(system)

    return run


def _uapi_summary(verdict: Verdict) -> str:
    ran = {c.name.split(":", 1)[0] for c in verdict.checks}
    failed = {c.name.split(":", 1)[0] for c in verdict.failures}
    found = len(verdict.findings)
    idle = len(verdict.evidence.get("did_not_run", {}))
    return (f"{len(ran) - len(failed) - found} passed, {found} documented alternatives (findings), "
            f"{len(failed)} failed, {idle} not applicable")


def _seed_summary(verdict: Verdict) -> str:
    contract = verdict.evidence.get("contract_of_guest_access") or "none"
    warned = f"; {len(verdict.warnings)} clean-up warning(s)" if verdict.warnings else ""
    return f"guest access ({contract}) and userspace touch judged, {len(verdict.checks)} checks{warned}"


def _matrix_summary(verdict: Verdict) -> str:
    rows = len(verdict.evidence.get("table", []))
    return f"{rows} rows, contract followed: {verdict.evidence.get('contract') or 'none'}"


def _matrix_rows(verdict: Verdict) -> list[str]:
    """One line a row: the contracts it matched, or why it did not run."""
    idle = verdict.evidence.get("did_not_run", {})
    lines = []
    for row in verdict.evidence.get("table", []):
        why = (f" (matches {'/'.join(row['matches'])})" if row.get("matches")
               else f" ({idle[row['row']]})" if row["row"] in idle else "")
        lines.append(f"{row['row']}: {row['status']}{why}")
    return lines


def _private_seed_summary(verdict: Verdict) -> str:
    mf = (verdict.evidence.get("observation") or {}).get("memory_fault") or {}
    exit_text = (f"memory-fault exit at gpa {mf['gpa']:#x} flags {mf['flags']:#x}" if mf else "no memory-fault exit")
    warned = f"; {len(verdict.warnings)} clean-up warning(s)" if verdict.warnings else ""
    return f"{exit_text}, {len(verdict.checks)} checks, {len(verdict.findings)} findings{warned}"


HOST_CHECK_TABLE: Final[tuple[HostCheck, ...]] = (
    HostCheck(UAPI_ITEM, gmem_uapi_cases.HOST_REQUIREMENTS, _on_kvm(gmem_uapi_cases.run_table), _uapi_summary,
              "uapi_cases.json", key="gmem_uapi", tags=("gmem", "uapi")),
    HostCheck(MAPPING_ITEM, vmm.HOST_REQUIREMENTS, _on_kvm(vmm.run_oracle_mapping),
              lambda v: f"{len(v.checks)} gfns read over {len(v.evidence['layout'])} slots", "oracle_mapping.json",
              key="tiny_vmm_oracle_mapping", tags=("gmem", "vmm")),
    HostCheck(PUNCH_ITEM, vmm.HOST_REQUIREMENTS, _on_kvm(lambda system: vmm.run_punch_hole(system, PUNCH_INDEX)),
              lambda v: f"file index {PUNCH_INDEX} -> gfn {v.evidence['expected_gfn']:#x}", "punch_hole.json",
              key="tiny_vmm_punch_hole", tags=("gmem", "vmm")),
    HostCheck(BACKING_ITEM, vmm.HOST_REQUIREMENTS, _on_kvm(vmm.run_backing_source),
              lambda v: f"served from {v.evidence['behaviour']}", "backing_source.json",
              key="tiny_vmm_backing_source", tags=("gmem", "vmm")),
    # The whole record: the memory-fault exit's gpa/size/flags, the userspace SIGBUS, expectations.
    HostCheck(SEED_ITEM, SEED_REQUIREMENTS, lambda report: run_seed_regression(report=report), _seed_summary,
              "seed_regression.json", all_checks=True, key="seed_regression", tags=("gmem", "hwpoison", "seed")),
    HostCheck(MATRIX_ITEM, MATRIX_REQUIREMENTS, lambda report: run_poison_matrix(report=report), _matrix_summary,
              "poison_matrix.json", lines=_matrix_rows, key="poison_matrix", tags=("gmem", "hwpoison", "matrix")),
    HostCheck(CONVERSION_ITEM, conversion_cases.HOST_REQUIREMENTS, _on_kvm(conversion_cases.run_table),
              lambda v: f"{len(v.checks)} values over {len(conversion_cases.CASES)} cases", "conversion_cases.json",
              all_checks=True, key="conversion_table", tags=("gmem", "private", "conversion"), private=True),
    HostCheck(PRIVATE_SEED_ITEM, PRIVATE_REQUIREMENTS, lambda report: run_private_seed(report=report),
              _private_seed_summary, "private_seed_regression.json", all_checks=True, key="private_seed_regression",
              tags=("gmem", "private", "hwpoison", "seed"), private=True),
    HostCheck(PRIVATE_MATRIX_ITEM, PRIVATE_REQUIREMENTS, lambda report: run_private_matrix(report=report),
              _matrix_summary, "private_poison_matrix.json", lines=_matrix_rows, key="private_poison_matrix",
              tags=("gmem", "private", "hwpoison", "matrix"), private=True),
)


def host_checks_of(memory: str) -> tuple[HostCheck, ...]:
    """The rows of ``memory`` (one of ``MEMORY_KINDS``); a ValueError names the valid kinds."""
    if memory not in MEMORY_KINDS:
        raise ValueError(f"memory kind {memory!r} is not one of {', '.join(MEMORY_KINDS)}")
    return tuple(c for c in HOST_CHECK_TABLE if memory == "all" or c.private == (memory == "private"))


def host_check(name: str) -> HostCheck:
    """The row named ``name``; a KeyError lists the names there are."""
    for check in HOST_CHECK_TABLE:
        if check.name == name:
            return check
    raise KeyError(f"no host check {name!r}; the table has: {', '.join(c.name for c in HOST_CHECK_TABLE)}")
