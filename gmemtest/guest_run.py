"""Boot a guest from an image and a profile, and log into it: the shared first half of every run.

One place owns the order (launch, wait for the console marker, then SSH with retries) and the
timings of each step, so tests, the CLI and the benchmark measure the same thing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guests.profiles import GuestProfile, get_profile
from guests.ssh import SshSession
from images.boot_params import DEFAULT_KERNEL_ARGS
from images.build import GuestImage
from qmp_helpers import QemuMachine

LOG = logging.getLogger(__name__)

READY_MARKER = "GMEMTEST-READY"


@dataclass
class BootTimings:
    """Seconds from `launch()` to each milestone."""

    qmp_s: float = 0.0
    console_ready_s: float = 0.0
    first_ssh_command_s: float = 0.0


@dataclass
class GuestRun:
    machine: QemuMachine
    ssh: SshSession
    profile: GuestProfile
    image: GuestImage
    workdir: Path
    timings: BootTimings = field(default_factory=BootTimings)

    def guest_text(self, command: str, timeout: float = 20.0) -> str:
        return self.ssh.run_checked(command, timeout=timeout).stdout

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

    The profile owns machine, CPU and firmware; the image adds only its kernel arguments. Nothing
    is appended after the profile, because QEMU keeps the last ``-bios``/``-machine`` it is given.
    """
    return profile.qemu_args(image.kernel, image.initrd,
                             extra_kernel_args=[*DEFAULT_KERNEL_ARGS, *extra_kernel_args])


@contextmanager
def booted_guest(
    image: GuestImage,
    workdir: Path,
    *,
    profile: str | GuestProfile = "tcg-default",
    boot_timeout_s: float = 90.0,
    binary: str = "qemu-system-x86_64",
    extra_kernel_args: Sequence[str] = (),
    extra_qemu_args: Sequence[str] = (),
) -> Iterator[GuestRun]:
    """Launch QEMU, wait for the guest's ready marker, log in; tear everything down on exit.

    `extra_qemu_args` add devices after the profile (e.g. a second QMP monitor for a kept
    guest); they must not repeat what the profile owns (-machine, -bios, -cpu).
    """
    prof = get_profile(profile) if isinstance(profile, str) else profile
    workdir.mkdir(parents=True, exist_ok=True)
    args = [*guest_argv(image, prof, extra_kernel_args), *extra_qemu_args]
    with ExitStack() as stack:
        LOG.info("launching %s (%s)", prof.name, binary)
        t0 = time.monotonic()
        # Entering the machine's context launches QEMU and connects QMP.
        machine = stack.enter_context(
            QemuMachine(args, workdir, binary=binary, name=f"gmemtest-{prof.name}-{uuid.uuid4().hex[:8]}")
        )
        timings = BootTimings(qmp_s=time.monotonic() - t0)
        LOG.info("QMP up in %.2fs; waiting for %s on the console", timings.qmp_s, READY_MARKER)
        machine.wait_console(READY_MARKER, timeout=boot_timeout_s)
        timings.console_ready_s = time.monotonic() - t0
        LOG.info("console ready in %.2fs; logging in over SSH", timings.console_ready_s)
        remaining = max(5.0, boot_timeout_s - timings.console_ready_s)
        ssh = stack.enter_context(
            SshSession.connect("127.0.0.1", machine.ssh_port, image.ssh_key, deadline_s=remaining,
                               console_log=machine.console_log)
        )
        ssh.run_checked("true", timeout=remaining)
        timings.first_ssh_command_s = time.monotonic() - t0
        LOG.info("guest %s up: QMP %.2fs, console ready %.2fs, first SSH command %.2fs", prof.name,
                 timings.qmp_s, timings.console_ready_s, timings.first_ssh_command_s)
        yield GuestRun(machine, ssh, prof, image, workdir, timings)
