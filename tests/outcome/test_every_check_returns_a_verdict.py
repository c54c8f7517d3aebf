"""Every check table that has moved to the one outcome shape returns ``outcome.Verdict``.

Judged on recorded answers, so it holds on every host. The poison matrix still has its own row
and matrix results (the next step of the redesign); guest and chain rows are judged by
``gmemtest.verdict.judge``, which builds the same Verdict.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from host_stack import gmem_uapi_cases as uapi
from host_stack import poison_matrix as pm
from host_stack import seed_regression as sr
from host_stack import vmm
from host_stack.vmm import DEFAULT_LAYOUT
from outcome import STATUSES, Verdict

EXP = sr.SeedExpectation.from_layout(DEFAULT_LAYOUT, 9, {0: 0x7F0000000000, 1: 0x7F0000100000, 2: 0x7F0000200000},
                                     0x7F1000000000)
READS = [vmm.GuestRead(g, vmm.gmem_marker(i)) for s in DEFAULT_LAYOUT for i, g in
         zip(range(s.gmem_pgoff, s.gmem_pgoff + s.npages), range(s.base_gfn, s.gfn_end), strict=True)]

def _matrix() -> list[Verdict]:
    guest = sr.GuestAccessObservation(133, 39, sr.MemoryFaultSeen(EXP.gpa, 4096, 0), (), 7)
    rows = [pm.judge_row(row, EXP, pm.RowObservation(None, 0x1234, (), True, (0, 4), 16, guest, ()))
            for row in pm.ROWS if not row.mapped]
    return [*rows, pm.judge_matrix(rows)]


TABLES: dict[str, Callable[[], list[Verdict]]] = {
    "uAPI cases": lambda: [uapi.judge_outcome(case, uapi.Outcome(case.expected_errno)) for case in uapi.CASES],
    "tiny VMM": lambda: [vmm.judge_oracle_mapping(DEFAULT_LAYOUT, READS),
                         vmm.judge_punch_hole(DEFAULT_LAYOUT, 0x41, READS, READS)],
    "seed": lambda: [sr.judge_guest_access(EXP, sr.GuestAccessObservation(None, None, None)),
                     sr.judge_user_touch(EXP, [])],
    "poison matrix": _matrix,
}



@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_check_of_the_table_is_a_verdict(table: str) -> None:
    verdicts = TABLES[table]()
    assert verdicts, table
    for verdict in verdicts:
        assert isinstance(verdict, Verdict), (table, type(verdict))
        assert verdict.status in STATUSES
        assert Verdict.from_json(verdict.to_json()) == verdict

