"""Every check table returns ``outcome.Verdict``: the uAPI cases, the tiny VMM, the seed
regression, the poison matrix, the conversions, and every guest and chain row of ``gmemtest.scenarios``.

Judged on recorded or empty observations, so it holds on every host: the shape is the point,
not the status (an empty observation of a guest row is a FAIL, and still a Verdict).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gmemtest.observations import HostObservations, Observations
from gmemtest.oracle import INTEL, MappingLayout, PageLayout, expect, expect_host, free_page_layout
from gmemtest.scenarios import SCENARIOS, ScenarioSpec, Source
from gmemtest.verdict import judge
from host_stack import conversion_cases as cc
from host_stack import gmem_uapi_cases as uapi
from host_stack import matrix_oracle as mo
from host_stack import seed_oracle as so
from host_stack import vmm
from host_stack.vmm import DEFAULT_LAYOUT
from outcome import STATUSES, Verdict
from qmp_helpers import mce_kind
from qmp_helpers.memslots import MemslotRegistration

EXP = so.SeedExpectation.from_layout(DEFAULT_LAYOUT, 9, {0: 0x7F0000000000, 1: 0x7F0000100000, 2: 0x7F0000200000},
                                     0x7F1000000000)
READS = [vmm.GuestRead(g, vmm.gmem_marker(i)) for s in DEFAULT_LAYOUT for i, g in
         zip(range(s.gmem_pgoff, s.gmem_pgoff + s.npages), range(s.base_gfn, s.gfn_end), strict=True)]

def _matrix() -> list[Verdict]:
    guest = so.GuestAccessObservation(133, 39, so.MemoryFaultSeen(EXP.gpa, 4096, 0), (), 7)
    rows = [mo.judge_row(row, EXP, mo.RowObservation(None, 0x1234, (), True, (0, 4), 16, guest, ()))
            for row in mo.ROWS if not row.mapped]
    return [*rows, mo.judge_matrix(rows)]


_VA = 0x7F0000200000
# One layout per page kind the scenario table names (a THP and a hugetlb page at a 2 MiB va).
LAYOUTS = {
    "anon4k": MappingLayout("anon4k", _VA, 0x4000, 0x1000, tuple(PageLayout(_VA + i * 0x1000, 0x2960 + i)
                                                                 for i in range(4))),
    "thp": MappingLayout("thp", _VA, 0x200000, 0x1000, tuple(PageLayout(_VA + i * 0x1000, 0x2A00 + i)
                                                             for i in range(512)), is_thp=True),
    "hugetlb2m": MappingLayout("hugetlb2m", _VA, 0x200000, 0x200000, (PageLayout(_VA, 0x12600),)),
    "free": free_page_layout(0x1EA00),
}


def _guest_row(spec: ScenarioSpec) -> Verdict:
    kind = mce_kind(spec.mce_kind)
    exp = expect(spec, LAYOUTS[spec.page_kind], vcpus=2 if spec.broadcast else 1, mce_status=kind.status,
                 mce_misc=kind.misc, mce_bank=9, vendor=INTEL)
    return judge(exp, Observations())


def _chain_row(spec: ScenarioSpec) -> Verdict:
    from gmemtest.host_poison import HostFrameLayout

    layout = LAYOUTS[spec.page_kind]
    gpa = layout.gpa_of(layout.base_va + spec.poison_offset)
    hva = 0x7F1C00000000 + (gpa & 0x1FFFFF)
    slot = MemslotRegistration(0, 3, 0, 0x100000, 0x1FF00000, hva - (gpa - 0x100000), -1, 0, 0)
    shift = 21 if spec.page_kind == "thp" else 12
    frame = HostFrameLayout(gpa=gpa, hva=hva, pfn=0x117961, qemu_pid=207, memslot=slot, host_page_shift=shift)
    exp, host = expect_host(spec, layout, frame, vendor=INTEL, mce_bank=9)
    return judge(exp, Observations(), (host, HostObservations()))


TABLES: dict[str, Callable[[], list[Verdict]]] = {
    "uAPI cases": lambda: [uapi.judge_outcome(case, uapi.Outcome(case.expected_errno)) for case in uapi.CASES],
    "tiny VMM": lambda: [vmm.judge_oracle_mapping(DEFAULT_LAYOUT, READS),
                         vmm.judge_punch_hole(DEFAULT_LAYOUT, 0x41, READS, READS)],
    "seed": lambda: [so.judge_guest_access(EXP, so.GuestAccessObservation(None, None, None)),
                     so.judge_user_touch(EXP, [])],
    "poison matrix": _matrix,
    "conversions": lambda: [cc.judge_case(case, cc.Seen(dict(case.expect()))) for case in cc.CASES],
    "guest rows": lambda: [_guest_row(s) for s in SCENARIOS if s.source is Source.QMP],
    "chain rows": lambda: [_chain_row(s) for s in SCENARIOS if s.source is Source.HOST],
}



@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_check_of_the_table_is_a_verdict(table: str) -> None:
    verdicts = TABLES[table]()
    assert verdicts, table
    for verdict in verdicts:
        assert isinstance(verdict, Verdict), (table, type(verdict))
        assert verdict.status in STATUSES
        assert Verdict.from_json(verdict.to_json()) == verdict



@pytest.mark.parametrize("table", ["guest rows", "chain rows"])
def test_every_scenario_row_is_judged_into_named_checks(table: str) -> None:
    """One verdict per row; nothing observed is a FAIL with named checks, never a PASS."""
    verdicts = TABLES[table]()
    source = Source.QMP if table == "guest rows" else Source.HOST
    assert len(verdicts) == sum(1 for s in SCENARIOS if s.source is source)
    for verdict in verdicts:
        assert verdict.checks and verdict.status == "FAIL", verdict.summary()
        assert len({c.name for c in verdict.checks}) == len(verdict.checks), verdict.summary()
