"""Can the lab host in a box be saved and restored? A measured trial, not (yet) a cache.

A booted L1 cannot be saved: its virtio-9p shares are mounted, and QEMU refuses to migrate while
a 9p export is mounted ("Migration is disabled when VirtFS export path ... is mounted").
``gmemtest.hold=N`` makes L1's init stop for N seconds after kvm_amd and hwpoison_inject are
loaded and before it mounts anything over 9p; there L1 can be saved. The trial saves it once,
restores it ``restores`` times into fresh QEMUs with the same argv, waits for the ready marker
(the restored L1 sleeps out the rest of its hold, mounts the shares, prints it), and runs a real
nested KVM_RUN there (the tiny VMM on guest_memfd slots) to prove SVM state survived.

Why a trial and not booted_labhost's default: the hold is a fixed sleep in every booted L1 (no
input channel tells L1 it was restored), and the shares' paths are per run. Both are solvable;
the figures here say whether it is worth it.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from gmemtest.lab.host import STATE_RE, LabhostRun, LabhostTimings, fresh_ctl, labhost_qemu_args
from guests.profiles import GuestProfile, get_profile
from images.labhost import LabhostImage
from qmp_helpers import DEFAULT_QEMU, QemuMachine, load_state, save_state

__all__ = ["HOLD_MARKER", "labhost_snapshot_trial"]

LOG = logging.getLogger(__name__)

HOLD_MARKER = "GMEMTEST-LABHOST-HOLD"
# A real KVM_RUN in the restored L1: three guest_memfd slots, a payload reading every gfn.
_NESTED_CHECK = ("from host_stack import vmm\nfrom host_stack.kvm import KvmSystem\n"
                 "with KvmSystem() as system:\n    r = vmm.run_backing_source(system)\n"
                 "print('nested KVM_RUN:', r.evidence['behaviour'], 'reads', len(r.evidence['reads']), "
                 "'mismatches', len(r.failures))")


def labhost_snapshot_trial(image: LabhostImage, workdir: Path, *, restores: int = 3, hold_s: int = 1,
                           cwd: Path | None = None, binary: str = DEFAULT_QEMU,
                           profile: str | GuestProfile = "labhost-svm") -> dict[str, Any]:
    """Boot L1 with a hold, save it there, restore it ``restores`` times; every figure in seconds."""
    if restores < 1 or hold_s < 1:
        raise ValueError(f"restores and hold_s must be >= 1, got {restores} and {hold_s}")
    prof = get_profile(profile) if isinstance(profile, str) else profile
    workdir = workdir.absolute()
    share, ctl, output = workdir / "results", workdir / "ctl", workdir / "output.log"
    share.mkdir(parents=True, exist_ok=True)
    work = fresh_ctl(ctl, output, cwd or Path.cwd())
    args = labhost_qemu_args(prof, image, share_dir=share, ctl_dir=ctl, output_log=output, work_dir=work,
                             extra_kernel_args=(f"gmemtest.hold={hold_s}",))
    state = workdir / "l1.state"
    t0 = time.monotonic()
    with QemuMachine(args, workdir / "boot", binary=binary, name="gmemtest-labhost-save",
                     ssh_forward_port=None) as source:
        held = source.wait_console(HOLD_MARKER + r"[^\n]*", timeout=120)
        hold_at = time.monotonic() - t0
        saved = save_state(source, state, timeout=120)
    result: dict[str, Any] = {"hold_s": hold_s, "launch_to_hold_s": round(hold_at, 3), "hold_line": held.group(0),
                              "save_s": saved.seconds, "state_bytes": saved.size_bytes, "restores": []}
    for i in range(restores):
        fresh_ctl(ctl, output, work)
        t0 = time.monotonic()
        rundir = workdir / f"restore-{i}"
        with QemuMachine(args, rundir, binary=binary, name=f"gmemtest-labhost-restore-{i}",
                         ssh_forward_port=None, incoming=True) as machine:
            load_state(machine, state, timeout=120)
            loaded = time.monotonic() - t0
            ready = machine.wait_console(STATE_RE, timeout=120)
            ready_s = time.monotonic() - t0
            run = LabhostRun(machine, image, workdir=rundir, share_dir=share, ctl_dir=ctl, output_log=output,
                             profile=prof, cwd=work, timings=LabhostTimings(ready_s=round(ready_s, 3)),
                             ready_line=ready.group(0).strip())
            check = run.run([sys.executable, "-c", _NESTED_CHECK], 180)
            result["restores"].append({
                "state_loaded_s": round(loaded, 3), "ready_s": round(ready_s, 3),
                "ready_line": ready.group(0).strip(), "nested_check_rc": check.returncode,
                "nested_check": check.output.strip().splitlines()[-1:] or [""],
                "nested_check_s": round(check.seconds, 3)})
            LOG.info("L1 restore %d: loaded %.2f s, ready %.2f s (includes up to %d s of hold), nested check rc %d",
                     i, loaded, ready_s, hold_s, check.returncode)
            run.power_off(30)
    state.unlink(missing_ok=True)
    return result
