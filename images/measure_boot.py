"""Measures launch -> first SSH command of the default image under TCG.

``python -m images.measure_boot [--runs N] [--append ARGS] [--qemu-arg ARG ...] [--json]``

One guest at a time: it starts QEMU (argument list, no shell), waits for the
``GMEMTEST-READY`` console line, logs in with the image's key, runs ``uname -r``
and kills QEMU. Used to choose the values in :mod:`images.boot_params`.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import paramiko

from guests.profiles import BASE_KERNEL_ARGS
from images.boot_params import FAST_QEMU_ARGS
from images.build import GuestImage, build_default_image
from qmp_helpers import DEFAULT_QEMU

__all__ = ["BootTiming", "base_qemu_argv", "measure_once"]

READY_MARKER = b"GMEMTEST-READY"


@dataclass(frozen=True)
class BootTiming:
    ready_s: float  # launch -> marker on the console
    ssh_s: float  # launch -> first command's output received
    uname: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_qemu_argv(image: GuestImage, append: str, serial_log: Path, port: int,
                   extra: tuple[str, ...]) -> list[str]:
    """The QEMU shape the tests use (docs/architecture.md), plus ``extra``."""
    return [
        DEFAULT_QEMU, "-accel", "tcg", "-cpu", "max,vendor=GenuineIntel",
        "-smp", "1", "-m", "512", "-nodefaults", "-display", "none",
        "-device", "pvpanic", "-action", "panic=none",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
        "-chardev", f"file,id=ser0,path={serial_log}", "-serial", "chardev:ser0",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=n0",
        *extra,
    ]


def measure_once(image: GuestImage, append: str, extra: tuple[str, ...],
                 timeout_s: float = 60.0) -> BootTiming:
    with tempfile.TemporaryDirectory(prefix="gmemtest-boot-") as tmp:
        log = Path(tmp) / "serial.log"
        port = _free_port()
        argv = base_qemu_argv(image, append, log, port, extra)
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            while True:
                if log.is_file() and READY_MARKER in log.read_bytes():
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"QEMU exited {proc.returncode}: "
                                       f"{proc.stderr.read().decode() if proc.stderr else ''}")
                if time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"no {READY_MARKER!r} in {timeout_s} s; console:\n"
                                       f"{log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.005)
            ready = time.monotonic() - started
            key = paramiko.PKey.from_path(image.ssh_key)
            with paramiko.SSHClient() as client:
                client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
                client.connect("127.0.0.1", port=port, username="root", pkey=key,
                               allow_agent=False, look_for_keys=False, timeout=10,
                               banner_timeout=10, auth_timeout=10)
                _, stdout, _ = client.exec_command("uname -r", timeout=10)
                uname = stdout.read().decode().strip()
            return BootTiming(ready, time.monotonic() - started, uname)
        finally:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stderr:
                proc.stderr.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m images.measure_boot")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--append", default=" ".join(BASE_KERNEL_ARGS),
                        help="kernel command line (default: the profiles' guests.profiles.BASE_KERNEL_ARGS)")
    parser.add_argument("--no-fast", action="store_true", help="leave out FAST_QEMU_ARGS")
    parser.add_argument("--qemu-arg", action="append", default=[],
                        help="extra QEMU argument (repeatable; use --qemu-arg=-foo)")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    image = build_default_image(args.cache)
    extra = (*(() if args.no_fast else FAST_QEMU_ARGS), *args.qemu_arg)
    runs = [measure_once(image, args.append, extra) for _ in range(args.runs)]
    summary = {
        "append": args.append, "qemu_extra": list(extra),
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
