"""Swap KVM's modules in the running kernel, without kmod: ``delete_module`` and ``finit_module``.

The lab host's userland has no kmod, and the swap is two syscalls a pair: unload the vendor
module and kvm (users first), load the new kvm and vendor module from their files. It is how L1
changes from Debian's KVM to the one rebuilt with ``CONFIG_KVM_SW_PROTECTED_VM`` (about 0.7 s).
Unsigned modules load only on a kernel that is not locked down; they taint it (O and E).

``python -m host_stack.kernel_modules swap KVM_KO VENDOR_KO`` prints what it did as one JSON line.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from host_stack import mm_uapi as m
from host_stack.errors import HostStackError

__all__ = ["ModuleSwap", "ModuleSwapError", "kernel_taint", "loaded", "module_taint", "swap_kvm"]

_SYS_MODULE = Path("/sys/module")
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long


class ModuleSwapError(HostStackError, OSError):
    """A module could not be unloaded or loaded; the message names it and the errno."""


@dataclass(frozen=True)
class ModuleSwap:
    """What a swap did: the modules that went and came, the taints after, how long it took."""

    unloaded: tuple[str, ...]
    loaded: tuple[str, ...]
    kvm_taint: str
    kernel_taint_before: int
    kernel_taint_after: int
    seconds: float


def loaded(name: str) -> bool:
    """Whether module ``name`` (underscores, as /sys/module names it) is live in the kernel."""
    try:
        return (_SYS_MODULE / name / "initstate").read_text().strip() == "live"
    except OSError:
        return False


def module_taint(name: str) -> str:
    """The taint letters of module ``name`` (/sys/module/NAME/taint): "" for a signed, in-tree module
    (or one not loaded), e.g. "OE" for one built out of tree and unsigned."""
    try:
        return (_SYS_MODULE / name / "taint").read_text().strip()
    except OSError:
        return ""


def kernel_taint() -> int:
    """The kernel's taint mask (/proc/sys/kernel/tainted; 0 if unreadable)."""
    try:
        return int(Path("/proc/sys/kernel/tainted").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _unload(name: str) -> None:
    if _LIBC.syscall(m.SYS_DELETE_MODULE, name.encode(), m.O_NONBLOCK) != 0:
        err = ctypes.get_errno()
        busy = " (a VM or another module still uses it)" if err in (errno.EWOULDBLOCK, errno.EBUSY) else ""
        raise ModuleSwapError(err, f"delete_module({name}) failed: {os.strerror(err)}{busy}")


def _load(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _LIBC.syscall(m.SYS_FINIT_MODULE, fd, b"", 0) != 0:
            err = ctypes.get_errno()
            why = " (the kernel refuses unsigned modules: it is locked down)" if err == errno.EPERM else ""
            raise ModuleSwapError(err, f"finit_module({path}) failed: {os.strerror(err)}{why}")
    finally:
        os.close(fd)


def swap_kvm(kvm_ko: Path, vendor_ko: Path) -> ModuleSwap:
    """Replace the loaded kvm and vendor module (kvm_amd or kvm_intel) with the given files."""
    for path in (kvm_ko, vendor_ko):
        if not path.is_file():
            raise ModuleSwapError(errno.ENOENT, f"module file {path} does not exist")
    vendor = vendor_ko.name.removesuffix(".ko").replace("-", "_")
    if vendor not in ("kvm_amd", "kvm_intel"):
        raise ModuleSwapError(errno.EINVAL, f"{vendor_ko.name} is not a KVM vendor module (kvm-amd.ko or kvm-intel.ko)")
    t0 = time.monotonic()
    before = kernel_taint()
    gone = tuple(name for name in (vendor, "kvm") if loaded(name))
    for name in gone:
        _unload(name)
    _load(kvm_ko)
    _load(vendor_ko)
    return ModuleSwap(unloaded=gone, loaded=("kvm", vendor), kvm_taint=module_taint("kvm"), kernel_taint_before=before,
                      kernel_taint_after=kernel_taint(), seconds=round(time.monotonic() - t0, 3))


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "swap":
        print("usage: python -m host_stack.kernel_modules swap KVM_KO VENDOR_KO", file=sys.stderr)
        return 2
    try:
        swap = swap_kvm(Path(argv[1]), Path(argv[2]))
    except ModuleSwapError as exc:
        print(f"kernel_modules: {exc.strerror}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(swap)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
