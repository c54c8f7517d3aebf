"""Measures launch -> first SSH command of the default image under a guest profile.

``python -m images.measure_boot [--runs N] [--profile NAME] [--append ARGS] [--qemu-arg ARG ...] [--json]``

One guest at a time, launched the way every test launches one: ``QemuMachine`` with the
profile's QEMU and kernel arguments (``--append`` replaces the kernel's, ``--qemu-arg`` adds to
QEMU's), the image's ``READY_MARKER`` on the console, then ``SshSession`` with the image's key
runs ``uname -r``; QEMU is torn down by its owner. Used to choose the values in
the profiles' firmware, machine and ``BASE_KERNEL_ARGS`` (``guests.profiles``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from guests.profiles import get_profile
from guests.ssh import SshSession
from images.build import READY_MARKER, GuestImage, build_default_image
from qmp_helpers import DEFAULT_QEMU, QemuMachine

__all__ = ["BootTiming", "measure_once"]


@dataclass(frozen=True)
class BootTiming:
    ready_s: float  # launch -> marker on the console
    ssh_s: float  # launch -> first command's output received
    uname: str


def measure_once(image: GuestImage, profile: str = "tcg-default", *, append: str | None = None,
                 extra: Sequence[str] = (), binary: str = DEFAULT_QEMU, timeout_s: float = 60.0) -> BootTiming:
    """One boot of ``image`` under ``profile`` to its first SSH command."""
    prof = get_profile(profile)
    if append is not None:
        prof = dataclasses.replace(prof, kernel_args=tuple(append.split()))
    args = [*prof.qemu_args(image.kernel, image.initrd), *extra]
    with tempfile.TemporaryDirectory(prefix="gmemtest-boot-") as tmp:
        started = time.monotonic()
        with QemuMachine(args, Path(tmp), binary=binary, name="measure-boot", nic_options=prof.nic_options) as machine:
            machine.wait_console(READY_MARKER, timeout=timeout_s)
            ready = time.monotonic() - started
            with SshSession.connect("127.0.0.1", machine.ssh_port, image.ssh_key, deadline_s=timeout_s,
                                    console_log=machine.console_log) as ssh:
                uname = ssh.run_checked("uname -r", timeout=10).stdout.strip()
            return BootTiming(ready, time.monotonic() - started, uname)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m images.measure_boot")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", default="tcg-default", help="guest profile to boot (default tcg-default)")
    parser.add_argument("--append", default=None,
                        help="kernel command line instead of the profile's (guests.profiles.BASE_KERNEL_ARGS)")
    parser.add_argument("--qemu-arg", action="append", default=[],
                        help="extra QEMU argument (repeatable; use --qemu-arg=-foo)")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    image = build_default_image(args.cache)
    extra = tuple(args.qemu_arg)
    runs = [measure_once(image, args.profile, append=args.append, extra=extra) for _ in range(args.runs)]
    summary = {
        "profile": args.profile, "append": args.append or get_profile(args.profile).kernel_cmdline(),
        "qemu_extra": list(extra),
        "runs": [asdict(r) for r in runs],
        "median_ready_s": round(statistics.median(r.ready_s for r in runs), 3),
        "median_ssh_s": round(statistics.median(r.ssh_s for r in runs), 3),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for r in runs:
            print(f"ready {r.ready_s:6.2f} s  ssh {r.ssh_s:6.2f} s  {r.uname}")
        print(f"median: ready {summary['median_ready_s']} s, ssh {summary['median_ssh_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
