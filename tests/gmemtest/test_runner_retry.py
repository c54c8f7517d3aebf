"""run_in_fresh_guest's retries, with the guest replaced by a stand-in (no QEMU).

The stand-in raises what a real boot raises when a nested guest's KVM stops at boot
(MachineStuck with state internal-error, seen under nested SVM in the lab host): the runner
must retry once, keep the stuck attempt's evidence, and give up on a second one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gmemtest import runner
from gmemtest.scenarios import get_scenario
from qmp_helpers import MachineStuck


def _stand_in(outcomes: list[str]) -> Any:
    @contextmanager
    def booted(image: object, outdir: Path, **_: object) -> Iterator[str]:
        outdir.mkdir(parents=True, exist_ok=True)
        (outdir / "console.log").write_text(f"attempt {len(outcomes)}\n")
        if outcomes.pop(0) == "stuck":
            raise MachineStuck("the VM stopped in state 'internal-error' (QEMU says: 'KVM internal error. "
                               "Suberror: 3')", state="internal-error")
        yield "guest"

    return booted


def test_a_stuck_vm_is_retried_once_and_its_evidence_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "booted_guest", _stand_in(["stuck", "ok"]))
    monkeypatch.setattr(runner, "run_scenario", lambda spec, guest, outdir: ("judged", guest))
    result = runner.run_in_fresh_guest(get_scenario("srao-late-touch-4k"), object(), tmp_path)  # type: ignore[arg-type]
    assert result == ("judged", "guest")
    kept = tmp_path / "stuck-attempt-1"
    assert "internal-error" in (kept / "why.txt").read_text()
    assert (kept / "console.log").read_text() == "attempt 2\n", "the stuck attempt's console moved aside"


def test_a_second_stuck_vm_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "booted_guest", _stand_in(["stuck", "stuck", "ok"]))
    monkeypatch.setattr(runner, "run_scenario", lambda spec, guest, outdir: ("judged", guest))
    with pytest.raises(MachineStuck) as caught:
        runner.run_in_fresh_guest(get_scenario("srao-late-touch-4k"), object(), tmp_path)  # type: ignore[arg-type]
    assert caught.value.state == "internal-error"
    assert (tmp_path / "stuck-attempt-1" / "why.txt").is_file()
