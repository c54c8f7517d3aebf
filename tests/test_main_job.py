"""The README's main job, run as a user runs it, judged from Avocado's own results.json.

Guest scenarios and the host tests this machine supports must PASS; tests that need what the
host lacks must CANCEL with the host fact the plan (``gmemtest.plan``, what ``gmemtest preflight``
prints) predicts from this host's probes, and only those. A job where a guest test was skipped or
cancelled is a failure here, never a pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gmemtest.plan import plan_main_job
from gmemtest.scenarios import SCENARIOS, Source
from images.qemu_root import build_qemu_root

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# The guest tests judged here; KvmLabProfiles (tagged guest too) are judged by their cancel reasons.
GUEST_CLASSES = ("MachineChecks.", "GuestBoot.")
# The rows the TCG guest tests run (the host-poison rows run in the lab host, HostPoisonChain).
QMP_SCENARIOS = [s for s in SCENARIOS if s.source is Source.QMP and not s.private]


# The main job runs the lab host's shared L1 run (host checks and the chain under five variants)
# beside the TCG guest tests: about 7 minutes here.
@pytest.mark.timeout(1500)
def test_main_job_passes_every_guest_scenario(tmp_path: Path) -> None:
    avocado = str(Path(sys.executable).with_name("avocado"))
    plan = plan_main_job(newer_qemu=str(build_qemu_root().binary))
    assert not [p for p in plan if p.unknown], [p.to_json() for p in plan if p.unknown]
    planned = {p.test: p.cancel for p in plan}
    proc = subprocess.run([avocado, "run", "--max-parallel-tasks=2", "--job-results-dir", str(tmp_path),
                           "avocado_tests/"], cwd=REPO, capture_output=True, text=True, timeout=1400, check=False)
    results = json.loads((tmp_path / "latest" / "results.json").read_text())
    status = {t["name"].split(":", 1)[1]: (t["status"], t.get("fail_reason") or "") for t in results["tests"]}
    report = "\n".join(f"{name}: {st} {why}" for name, (st, why) in sorted(status.items()))

    guest = {n: s for n, s in status.items() if n.startswith(GUEST_CLASSES)}
    assert len(guest) >= len(QMP_SCENARIOS) + 2, \
        f"expected a guest test per scenario ({len(QMP_SCENARIOS)}) and 2 boot tests:\n{report}"

    # Fewer failures must never come from cancelling more: the job cancels exactly what the plan,
    # read from this host's probes, predicts, each with the predicted host fact in its reason,
    # and every other test PASSes.
    assert set(status) == set(planned), f"tests the plan does not know, or did not run:\n{report}"
    cancelled = {n for n, (st, _why) in status.items() if st == "CANCEL"}
    predicted = {n for n, cancel in planned.items() if cancel}
    assert cancelled == predicted, (f"CANCELled but not planned: {sorted(cancelled - predicted)}; "
                                    f"planned but not CANCELled: {sorted(predicted - cancelled)}\n{report}")
    for name, cancel in planned.items():
        st, why = status[name]
        if cancel is None:
            assert st == "PASS", report
        else:
            assert cancel in why, f"{name}: expected the planned host fact {cancel!r} in {why!r}"

    # The host half for real inside the lab host: every check PASSes there, none cancels for
    # missing hardware, and the backing-source finding of this host is absent there. The private-
    # memory checks ran under the rebuilt KVM: KVM alone reported the poisoned private gfn.
    labhost = {n: s for n, s in status.items() if n.startswith("LabhostHostChecks.")}
    assert len(labhost) == 10, f"expected 10 lab-host tests:\n{report}"
    assert all(st == "PASS" for st, _ in labhost.values()), report
    seed = next(t for t in results["tests"] if t["name"].endswith("LabhostHostChecks.test_private_seed_regression"))
    board = json.loads(seed["whiteboard"])
    assert board["evidence"]["observation"]["memory_fault"]["flags"] == 0x8 and not board.get("warnings"), board
    backing = next(t for t in results["tests"] if t["name"].endswith("LabhostHostChecks.test_tiny_vmm_backing_source"))
    board = json.loads(backing["whiteboard"])  # the verdict L1 judged, read back whole
    assert board["status"] == "PASS" and board["evidence"]["behaviour"] == "guest_memfd", board
    assert not any(f["id"] == "gmem-slot-served-from-userspace-addr" for f in board.get("findings", [])), board

    # The whole chain inside the lab host: every host-poison row PASSes at all three layers under
    # every variant, kvm-gmem (guest_memfd RAM) under the project's own QEMU, and the host's
    # checks include what the kernel sent QEMU with its address and order (kprobes).
    chain = {n: s for n, s in status.items() if n.startswith("HostPoisonChain.")}
    assert len(chain) == 17, f"expected 17 chain tests:\n{report}"
    assert all(st == "PASS" for st, _ in chain.values()), report
    _private_rows_hold_their_evidence({t["name"].rsplit(".", 1)[-1]: json.loads(t["whiteboard"])
                                       for t in results["tests"]
                                       if "HostPoisonChain." in t["name"] and t["name"].endswith("_kvm_swprot")})
    gmem = next(t for t in results["tests"] if t["name"].endswith("HostPoisonChain.test_ar_touch_kvm_gmem"))
    board = json.loads(gmem["whiteboard"])
    assert "gmemtest series" in board["setup"]["qemu"]["package"], board["setup"]
    sent = next(c for c in board["checks"] if c["name"].startswith("SIGBUS sent to QEMU"))
    assert sent["ok"] and "lsb 12 to the main thread" in sent["actual"], sent
    ar = next(t for t in results["tests"] if t["name"].endswith("HostPoisonChain.test_ar_touch_kvm_default"))
    layers = {check["layer"] for check in json.loads(ar["whiteboard"])["checks"]}
    assert layers == {"host", "qemu", "guest"}, ar["whiteboard"]
    assert proc.returncode == 0, proc.stdout[-2000:]


def _private_rows_hold_their_evidence(boards: dict[str, dict[str, Any]]) -> None:
    """The kvm-swprot rows inside the lab host: the conversions QEMU and KVM both traced, the vMCE at a
    private page, and the memory-fault exit of a poisoned private page with what each QEMU did."""
    checks = {name: {c["name"]: c for c in board["checks"]} for name, board in boards.items()}
    convert = checks["test_private_convert_kvm_swprot"]
    for step in ("step 1, shared -> private", "step 2, private -> shared"):
        assert convert[f"{step}: QEMU's trace (kvm_convert_memory)"]["ok"], convert
        assert convert[f"{step}: KVM's attributes (kvm_vm_set_mem_attributes)"]["ok"], convert
    assert boards["test_private_convert_kvm_swprot"]["evidence"]["round_trip_ms"], boards
    spin = checks["test_private_srar_user_spin_kvm_swprot"]
    assert spin["si_addr_lsb"]["actual"] == "12", spin
    assert spin["made private: QEMU's record (x-query-kvm-private-memory)"]["ok"], spin
    for row in ("test_private_host_poison_touch_kvm_swprot", "test_private_host_poison_mce_kvm_swprot"):
        exit_ = checks[row]["KVM's memory-fault exit, as QEMU read it (kvm_memory_fault)"]
        assert exit_["ok"] and "flags 0x8" in exit_["actual"], exit_
    findings = [f["id"] for f in boards["test_private_host_poison_touch_kvm_swprot"].get("findings", [])]
    assert findings == ["qemu-stops-the-vm-on-a-poisoned-private-page"], findings
    assert checks["test_private_host_poison_mce_kvm_swprot"]["the program's SIGBUS"]["ok"]


def _boot_modes(job: Path) -> dict[str, str]:
    """Test directory name -> the boot.json mode of every guest it started."""
    modes = {}
    for record in job.glob("test-results/*/data/**/boot.json"):
        modes[str(record.relative_to(job / "test-results"))] = json.loads(record.read_text())["mode"]
    return modes


def test_guest_tests_pass_with_snapshots_off(tmp_path: Path) -> None:
    """Held to the same verdicts without snapshots: every guest boots for real, and passes."""
    avocado = str(Path(sys.executable).with_name("avocado"))
    proc = subprocess.run([avocado, "run", "--max-parallel-tasks=2", "--job-results-dir", str(tmp_path),
                           "-t", "guest", "-p", "snapshot=off", "avocado_tests/"],
                          cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    job = (tmp_path / "latest").resolve()
    results = json.loads((job / "results.json").read_text())
    status = {t["name"].split(":", 1)[1]: (t["status"], t.get("fail_reason") or "") for t in results["tests"]}
    report = "\n".join(f"{name}: {st} {why}" for name, (st, why) in sorted(status.items()))
    guest = {n: s for n, s in status.items() if n.startswith(GUEST_CLASSES)}
    assert len(guest) >= len(QMP_SCENARIOS) + 2, report
    for name, (st, why) in guest.items():
        if name == "GuestBoot.test_restore_from_snapshot":
            assert st == "CANCEL" and "snapshots are off" in why, report
        else:
            assert st == "PASS", report
    assert proc.returncode == 0, proc.stdout[-2000:]
    modes = _boot_modes(job)
    assert len(modes) >= len(QMP_SCENARIOS) + 1, modes
    assert set(modes.values()) == {"boot"}, f"snapshot=off must boot every guest: {modes}"
