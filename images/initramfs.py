"""Assembles the guest's initramfs (newc cpio) from extracted packages.

Only what the guest contract needs goes in: busybox (static) with its applet
links, dropbear with exactly the shared objects its loader resolves, the probe,
the modules the config check asked for, and the set-up files from ``files/``.
Everything that boot would otherwise compute (applet links, host key) is done
here, at build time, because every instruction at boot runs under TCG.
"""

from __future__ import annotations

import logging
import re
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from images.cpio import NewcWriter
from images.errors import ImageError
from images.kmod import module_file_name, read_module

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["InitramfsError", "InitramfsInputs", "shared_objects", "write_initramfs"]

_log = logging.getLogger(__name__)

_LOADER = "lib64/ld-linux-x86-64.so.2"
_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
_GUEST_LIB_DIR = "lib/x86_64-linux-gnu"
_LIST_LINE = re.compile(r"^\s*(\S+) => (\S+) \(0x[0-9a-f]+\)$")
_DIRS = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "lib", _GUEST_LIB_DIR, "lib64",
         "lib/modules", "etc", "etc/dropbear", "etc/gmemtest", "root", "root/.ssh",
         "dev", "proc", "sys", "tmp", "run", "var", "var/log")
_DIR_MODES = {"root": 0o700, "root/.ssh": 0o700, "tmp": 0o1777}
_TEXT_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/shells": "/bin/sh\n",
    "etc/hostname": "gmemtest\n",
    # hosts: files only. dropbear looks up every client's name (svr_session); with glibc's
    # default "dns files" that is a DNS query to a nameserver the guest does not have.
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
    "etc/hosts": "127.0.0.1 localhost\n10.0.2.2 gmemtest-host\n",
}


class InitramfsError(ImageError, RuntimeError):
    """An input the initramfs needs is missing or unusable."""


@dataclass(frozen=True)
class InitramfsInputs:
    """Everything the archive is made of; paths point into extracted packages."""

    busybox: Path  # the static busybox binary
    userland: Path  # root of the extracted dropbear-bin + libraries
    modules: Sequence[Path]  # .ko files in insmod order
    probe: Path  # the static probe binary
    authorized_keys: str
    host_key: Path  # dropbear-format host key


def _run(argv: Sequence[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise InitramfsError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def busybox_applets(busybox: Path) -> list[str]:
    """The applet names this busybox build provides (it is static: runs on the host)."""
    return sorted(set(_run([str(busybox), "--list"]).split()) - {"busybox"})


def shared_objects(userland: Path, binary: Path) -> dict[str, Path]:
    """Soname -> file for every library ``binary`` needs, as the extracted loader sees it.

    Asking the package's own loader (``ld.so --list``) checks at build time that
    nothing is missing, instead of finding out in the guest.
    """
    loader = userland / _LOADER
    libs = ":".join(str(userland / d) for d in _LIB_DIRS)
    out = _run([str(loader), "--library-path", libs, "--list", str(binary)])
    found: dict[str, Path] = {}
    for line in out.splitlines():
        if "not found" in line:
            raise InitramfsError(f"{binary.name} needs a library no package provides: "
                                 f"{line.strip()}")
        if (match := _LIST_LINE.match(line)) and "/" not in match.group(1):
            found[match.group(1)] = Path(match.group(2)).resolve()
    if not found:
        raise InitramfsError(f"ld.so --list {binary} named no libraries:\n{out}")
    return found


def _files_text(name: str) -> bytes:
    return resources.files("images").joinpath("files", name).read_bytes()


def write_initramfs(inputs: InitramfsInputs, stream: BinaryIO) -> list[str]:
    """Write the archive to ``stream``; return the names of the libraries included."""
    dropbear = inputs.userland / "usr/sbin/dropbear"
    libs = shared_objects(inputs.userland, dropbear)
    cpio = NewcWriter(stream)
    for name in _DIRS:
        cpio.add_dir(name, _DIR_MODES.get(name, 0o755))
    cpio.add_chardev("dev/console", 5, 1)  # the kernel opens it before /init runs
    cpio.add_file("bin/busybox", inputs.busybox.read_bytes(), 0o755)
    for applet in busybox_applets(inputs.busybox):
        cpio.add_symlink(f"bin/{applet}", "busybox")
    cpio.add_symlink("init", "bin/busybox")
    cpio.add_symlink("sbin/init", "../bin/busybox")
    cpio.add_file("usr/sbin/dropbear", dropbear.read_bytes(), 0o755)
    for soname, path in sorted(libs.items()):
        cpio.add_file(f"{_GUEST_LIB_DIR}/{soname}", path.read_bytes(), 0o755)
    loader = (inputs.userland / _LOADER).resolve()
    cpio.add_file(_LOADER, loader.read_bytes(), 0o755)
    for name, text in sorted(_TEXT_FILES.items()):
        cpio.add_file(name, text.encode())
    cpio.add_file("etc/inittab", _files_text("inittab"))
    cpio.add_file("etc/rcS", _files_text("rcS"), 0o755)
    cpio.add_file("etc/dropbear/host_key", inputs.host_key.read_bytes(), 0o600)
    cpio.add_file("root/.ssh/authorized_keys", inputs.authorized_keys.encode(), 0o600)
    cpio.add_file("usr/bin/gmem-probe", inputs.probe.read_bytes(), 0o755)
    for ko in inputs.modules:
        cpio.add_file(f"lib/modules/{module_file_name(ko)}", read_module(ko))
    order = "".join(f"{module_file_name(ko)}\n" for ko in inputs.modules)
    cpio.add_file("etc/gmemtest/modules.order", order.encode())
    cpio.close()
    _log.debug("initramfs: %d modules, libraries %s", len(inputs.modules), sorted(libs))
    return sorted(libs)
