"""Boot (or restore) a guest from an image and a profile, and log into it: the first half of every run.

One place owns the order (launch, wait for the console marker, then SSH with retries) and the
timings of each step, so tests, the CLI and the benchmark measure the same thing.

With snapshots on (the default), the first guest of a key is booted, saved at the snapshot
point (``gmemtest.snapshots``) and resumed; every later guest of that key is its own QEMU
process restored from the saved state, with its clock stepped and its RNG reseeded
(``guests.refresh``). ``boot.json`` in the work directory says which happened and why.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmemtest.errors import GmemtestError
from gmemtest.evidence import set_aside
from gmemtest.snapshots import Snapshot, SnapshotCache, SnapshotKey, snapshot_key
from guests.profiles import GuestProfile, get_profile
from guests.refresh import GuestRefresh, RefreshError, refresh_guest
from guests.ssh import SshError, SshSession
from images.build import READY_MARKER, GuestImage
from polling import poll_until
from qmp_helpers import DEFAULT_QEMU, STUCK_RUN_STATES, MigrationError, QemuError, QemuMachine, load_state, save_state
from qmp_helpers.memslots import MEMSLOT_TRACE_ARGS

LOG = logging.getLogger(__name__)

# A booting guest prints its first console line within seconds (about 5 s for a KVM guest in the
# lab host, 25 s under full load); one that has printed nothing for this long runs but does not
# progress (seen once in the lab host, its next boot fine): MachineStuck, retried once.
SILENT_BOOT_S = 45.0


@dataclass
class BootTimings:
    """Seconds from `launch()` to each milestone; None where the path has no such milestone.

    A restored guest prints no ready marker (its boot happened before the snapshot), so it has
    ``state_loaded_s`` (state loaded and ``cont`` done) instead of ``console_ready_s``; its first
    SSH command is the refresh.
    """

    qmp_s: float = 0.0
    console_ready_s: float | None = None
    state_loaded_s: float | None = None
    first_ssh_command_s: float = 0.0
    save_s: float | None = None


@dataclass
class BootRecord:
    """How this guest came to be: ``boot``, ``boot+save`` or ``restore``, and why not otherwise."""

    mode: str
    snapshot: dict[str, Any] | None = None
    key_inputs: dict[str, Any] | None = None
    not_saved: str | None = None
    fallback: str | None = None
    refresh: dict[str, Any] | None = None

    def as_json(self, timings: BootTimings) -> dict[str, Any]:
        return {"mode": self.mode, "snapshot": self.snapshot, "not_saved": self.not_saved,
                "restore_fallback": self.fallback, "refresh": self.refresh,
                "timings": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(timings).items()},
                "key_inputs": self.key_inputs}


@dataclass
class GuestRun:
    machine: QemuMachine
    ssh: SshSession
    profile: GuestProfile
    image: GuestImage
    workdir: Path
    timings: BootTimings = field(default_factory=BootTimings)
    boot: BootRecord = field(default_factory=lambda: BootRecord("boot"))

    def guest_text(self, command: str, timeout: float = 20.0) -> str:
        return self.ssh.run_checked(command, timeout=timeout).stdout

    def reboot(self, timeout: float = 90.0) -> float:
        """QMP ``system_reset``, then wait for the ready marker again and log in anew.

        Returns the seconds from the reset to the first SSH command. The old session is closed
        first (its TCP connection dies with the guest's kernel); the new one replaces it.
        """
        t0 = time.monotonic()
        self.ssh.close()
        self.machine.qmp("system_reset")
        return self.rejoin(timeout, started=t0)

    def rejoin(self, timeout: float = 90.0, *, started: float | None = None) -> float:
        """The guest is booting again (a reset it did itself, or :meth:`reboot`'s): wait for its next
        ready marker and log in anew. Returns the seconds from ``started`` (default: now) to the first
        SSH command."""
        t0 = time.monotonic() if started is None else started
        self.ssh.close()
        self.machine.wait_console(READY_MARKER, timeout=timeout, stuck_states=STUCK_RUN_STATES)
        self.ssh = _connect(self.machine, self.image, max(5.0, timeout - (time.monotonic() - t0)))
        self.ssh.run_checked("true", timeout=timeout)
        return time.monotonic() - t0

    def launch_record(self) -> dict[str, Any]:
        """What was really under test, read from the launched machine, not from the request.

        The binary is argv[0] as launched (resolved), its version is what the running QEMU
        answers over QMP, and firmware, kernel and initrd are the paths in the argv: a lab that
        passed ``-p qemu=...`` can see in the verdict that this binary ran.
        """
        argv = list(self.machine.args)
        version = self.machine.qmp("query-version")
        qemu = version.get("qemu", {}) if isinstance(version, dict) else {}

        def value(option: str) -> str | None:
            return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option), None)

        return {
            "qemu": {"binary": argv[0] if argv else self.machine.binary,
                     "version": ".".join(str(qemu.get(k, "?")) for k in ("major", "minor", "micro")),
                     "package": version.get("package", "") if isinstance(version, dict) else ""},
            "profile": {"name": self.profile.name, "accel": self.profile.accel, "cpu": self.profile.cpu,
                        "smp": self.profile.smp, "machine": self.profile.machine_arg()},
            "firmware": value("-bios"),
            "image": {"kernel": value("-kernel"), "initrd": value("-initrd"),
                      "kernel_release": self.image.kernel_release, "manifest": str(self.image.manifest)},
            "argv": argv,
        }


def guest_argv(image: GuestImage, profile: GuestProfile, extra_kernel_args: Sequence[str] = ()) -> list[str]:
    """The QEMU arguments a guest of ``profile`` is launched with (QMP, serial, netdev aside).

    The profile owns machine, CPU, firmware and every kernel argument. Nothing
    is appended after the profile, because QEMU keeps the last ``-bios``/``-machine`` it is given.
    A KVM guest traces its memslot registrations from the start (``QemuMachine.memslots``): they
    happen before QMP exists.
    """
    trace = list(MEMSLOT_TRACE_ARGS) if profile.accel == "kvm" else []
    return [*trace, *profile.qemu_args(image.kernel, image.initrd,
                                       extra_kernel_args=extra_kernel_args)]


@dataclass(frozen=True)
class _Launch:
    """What one guest is launched with, whichever path (boot or restore) it takes."""

    args: tuple[str, ...]
    workdir: Path
    binary: str
    name: str
    profile: GuestProfile
    image: GuestImage

    def machine(self, *, incoming: bool = False) -> QemuMachine:
        return QemuMachine(self.args, self.workdir, binary=self.binary, name=self.name, incoming=incoming,
                           nic_options=self.profile.nic_options)


class RestoreFailed(GmemtestError):
    """A restore from a snapshot did not give a usable guest; the caller boots instead."""


_USERNET_GUEST_TCP = re.compile(r"TCP\[(?!HOST_FORWARD)(?P<state>[A-Z_0-9]+)\].*\s(?P<gport>\d+)\s+\d+\s+\d+\s*$",
                                re.MULTILINE)


# slirp's side of a connection the guest has closed too (both FINs seen).
_CLOSED_TCP_STATES = frozenset({"TIME_WAIT", "CLOSED"})


def _wait_no_guest_connection(machine: QemuMachine, port: int, timeout: float = 5.0) -> None:
    """Wait until slirp holds no TCP connection to the guest's ``port`` (the SSH session is gone).

    Saving while dropbear still serves a connection would restore a guest with a session
    whose peer is gone; ``info usernet`` lists slirp's connections with their TCP state.
    """
    open_: list[str] = []

    def closed() -> bool:
        text = machine.hmp("info usernet")
        open_[:] = [m.group(0).strip() for m in _USERNET_GUEST_TCP.finditer(text)
                    if int(m["gport"]) == port and m["state"] not in _CLOSED_TCP_STATES]
        return not open_

    if not poll_until(closed, timeout=timeout, interval=0.02):
        raise MigrationError(f"expected no TCP connection to guest port {port} before saving, "
                             f"still open after {timeout:.1f} s: {open_}", status="not-started")


def _connect(machine: QemuMachine, image: GuestImage, deadline_s: float) -> SshSession:
    return SshSession.connect("127.0.0.1", machine.ssh_port, image.ssh_key, deadline_s=deadline_s,
                              console_log=machine.console_log)


# What one QEMU run leaves in its work directory (QemuMachine's files).
QEMU_EVIDENCE = ("console.log", "qmp.jsonl", "qemu-stderr.log")


def _restore(stack: ExitStack, snap: Snapshot, launch: _Launch, timeout_s: float
             ) -> tuple[QemuMachine, SshSession, BootTimings, GuestRefresh]:
    t0 = time.monotonic()
    with ExitStack() as attempt:
        try:
            machine = attempt.enter_context(launch.machine(incoming=True))
            timings = BootTimings(qmp_s=time.monotonic() - t0)
            load_state(machine, snap.state, timeout=timeout_s)
            timings.state_loaded_s = time.monotonic() - t0
            ssh = attempt.enter_context(_connect(machine, launch.image, deadline_s=timeout_s))
            # The refresh is the first SSH command: nothing of the test may run on the
            # snapshot's clock and RNG state, and a separate "true" would cost a round trip.
            refresh = refresh_guest(ssh, timeout=timeout_s)
            timings.first_ssh_command_s = time.monotonic() - t0
        except (MigrationError, QemuError, SshError, RefreshError) as exc:
            raise RestoreFailed(f"{type(exc).__name__}: {exc}") from exc
        stack.push(attempt.pop_all())
    return machine, ssh, timings, refresh


def _save(machine: QemuMachine, cache: SnapshotCache, key: SnapshotKey) -> tuple[Snapshot | None, str | None]:
    """Save the paused-for-it guest into the cache, then resume it; (snapshot, why not saved)."""
    try:
        _wait_no_guest_connection(machine, machine.ssh_forward_port or 22)
        snap = cache.save(key, lambda path: save_state(machine, path).seconds)
    except (MigrationError, QemuError, OSError) as exc:
        LOG.warning("%s: not saved as a snapshot: %s", machine.name, exc)
        return None, f"save failed: {type(exc).__name__}: {exc}"
    finally:
        if machine.running() and machine.status() != "running":
            machine.qmp("cont")
    return snap, None if snap is not None else "another job saved this key first"


@contextmanager
def booted_guest(
    image: GuestImage,
    workdir: Path,
    *,
    profile: str | GuestProfile = "tcg-default",
    boot_timeout_s: float = 90.0,
    binary: str = DEFAULT_QEMU,
    extra_kernel_args: Sequence[str] = (),
    extra_qemu_args: Sequence[str] = (),
    snapshot: bool = True,
    cache: SnapshotCache | None = None,
    restore_timeout_s: float = 20.0,
) -> Iterator[GuestRun]:
    """A logged-in guest of ``profile``, booted or restored; torn down on exit.

    ``snapshot=False`` (``--no-snapshot``, Avocado ``snapshot=off``) always boots and saves
    nothing. A restore that fails for any reason (QEMU refuses the state, the guest does not
    answer after ``cont``, the refresh fails) drops that snapshot, keeps the attempt's evidence
    in ``restore-failed/`` and boots instead.

    `extra_qemu_args` add devices after the profile (e.g. a second QMP monitor for a kept
    guest); they must not repeat what the profile owns (-machine, -bios, -cpu), and they are
    part of the snapshot key, so a per-run path there means a caller should pass
    ``snapshot=False``.
    """
    prof = get_profile(profile) if isinstance(profile, str) else profile
    workdir.mkdir(parents=True, exist_ok=True)
    args = [*guest_argv(image, prof, extra_kernel_args), *extra_qemu_args]
    launch = _Launch(tuple(args), workdir, binary, f"gmemtest-{prof.name}-{uuid.uuid4().hex[:8]}", prof, image)
    record = BootRecord("boot")
    key: SnapshotKey | None = None
    if not snapshot:
        record.not_saved = "snapshots off (--no-snapshot / snapshot=off)"
    elif not prof.restorable:
        record.not_saved = f"profile {prof.name} is not restorable (GuestProfile.restorable)"
    else:
        cache = cache if cache is not None else SnapshotCache()
        key = snapshot_key(launch.machine().stable_argv(), image.manifest)
        record.key_inputs = key.inputs
    with ExitStack() as stack:
        run: GuestRun | None = None
        if cache is not None and key is not None and (snap := cache.lookup(key)) is not None:
            LOG.info("restoring %s from snapshot %s (%.0f s old)", prof.name, key.short, snap.age_s)
            try:
                machine, ssh, timings, refresh = _restore(stack, snap, launch, restore_timeout_s)
            except RestoreFailed as exc:
                record.fallback = str(exc)
                LOG.warning("restore of %s from %s failed, booting instead: %s", prof.name, key.short, exc)
                set_aside(workdir, "restore-failed", str(exc), only=QEMU_EVIDENCE)
                cache.drop(key, f"restore failed: {exc}")
            else:
                record.mode, record.snapshot, record.refresh = "restore", snap.record(), refresh.record()
                run = GuestRun(machine, ssh, prof, image, workdir, timings, record)
                LOG.info("guest %s restored: state loaded %.2fs, first SSH command (the refresh) %.2fs "
                         "(clock was %.1f s behind)", prof.name, timings.state_loaded_s,
                         timings.first_ssh_command_s, -refresh.skew_before_s)
        if run is None:
            run = _boot(stack, launch, boot_timeout_s, record, cache=cache, key=key)
        (workdir / "boot.json").write_text(json.dumps(run.boot.as_json(run.timings), indent=2) + "\n")
        try:
            yield run
        finally:
            run.ssh.close()  # the session of a reboot() is not the one the stack closes


def _boot(stack: ExitStack, launch: _Launch, boot_timeout_s: float, record: BootRecord, *,
          cache: SnapshotCache | None, key: SnapshotKey | None) -> GuestRun:
    prof, image = launch.profile, launch.image
    LOG.info("launching %s (%s)", prof.name, launch.binary)
    t0 = time.monotonic()
    # Entering the machine's context launches QEMU and connects QMP.
    machine = stack.enter_context(launch.machine())
    timings = BootTimings(qmp_s=time.monotonic() - t0)
    LOG.info("QMP up in %.2fs; waiting for %s on the console", timings.qmp_s, READY_MARKER)
    # A guest KVM stopped (internal error) never prints READY: say so now, with QEMU's words.
    machine.wait_console(READY_MARKER, timeout=boot_timeout_s, stuck_states=STUCK_RUN_STATES,
                         silent_after_s=SILENT_BOOT_S)
    timings.console_ready_s = ready = time.monotonic() - t0
    LOG.info("console ready in %.2fs; logging in over SSH", ready)
    remaining = max(5.0, boot_timeout_s - ready)
    ssh = _connect(machine, image, remaining)
    try:
        ssh.run_checked("true", timeout=remaining)
    except BaseException:
        ssh.close()
        raise
    timings.first_ssh_command_s = time.monotonic() - t0
    LOG.info("guest %s up: QMP %.2fs, console ready %.2fs, first SSH command %.2fs", prof.name,
             timings.qmp_s, ready, timings.first_ssh_command_s)
    if cache is not None and key is not None:
        ssh.close()
        saved_at = time.monotonic()
        snap, record.not_saved = _save(machine, cache, key)
        timings.save_s = time.monotonic() - saved_at
        if snap is not None:
            record.mode, record.snapshot = "boot+save", snap.record()
        ssh = _connect(machine, image, remaining)
    stack.enter_context(ssh)
    return GuestRun(machine, ssh, prof, image, launch.workdir, timings, record)
