"""Checks a guest kernel's build configuration against what the tests rely on.

A kernel without machine-check or memory-failure support does not fail loudly: the
guest panics on the first injection or the probe never sees a SIGBUS. Reading the
package's ``/boot/config-<release>`` at build time turns that into a build error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from images.errors import ImageError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

__all__ = [
    "BUILTIN_REQUIRED",
    "LABHOST_BUILTIN_REQUIRED",
    "LABHOST_MODULE_ALLOWED",
    "MODULE_ALLOWED",
    "KernelConfigError",
    "Requirement",
    "check_config",
    "check_labhost_config",
    "check_requirements",
    "parse_config",
    "read_config",
]

_LINE = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")


@dataclass(frozen=True)
class Requirement:
    """One option: ``alternatives`` are equivalent names (any one satisfies it)."""

    alternatives: tuple[str, ...]
    why: str
    module: str | None = None  # module file stem when =m is acceptable

    @property
    def name(self) -> str:
        return "|".join(self.alternatives)


# Options that must be built in (=y): they act before any module could be loaded,
# or they have no module form.
BUILTIN_REQUIRED: tuple[Requirement, ...] = (
    Requirement(("X86_MCE",), "machine-check handling; without it an injected MCE panics"),
    Requirement(("X86_MCE_INTEL",), "the Intel MCE path (the guest CPU is GenuineIntel)"),
    Requirement(("MEMORY_FAILURE",), "memory_failure(): poisons the page, sends SIGBUS"),
    Requirement(("HUGETLBFS",), "2 MiB hugetlb mappings for the probe"),
    Requirement(("TRANSPARENT_HUGEPAGE",), "THP mappings for the probe"),
    Requirement(("PROC_PAGE_MONITOR",), "/proc/self/pagemap and kpageflags (GPA, HWPOISON)"),
    Requirement(("DEVTMPFS",), "/dev in the initramfs without mknod"),
    Requirement(("TRACING", "FTRACE"), "tracefs and the mce:mce_record tracepoint"),
)

# Options that may be =y or =m; when =m, ``module`` goes into the initramfs.
MODULE_ALLOWED: tuple[Requirement, ...] = (
    Requirement(("VIRTIO_PCI",), "the virtio PCI transport for the NIC", "virtio_pci"),
    Requirement(("VIRTIO_NET",), "the guest NIC (SSH)", "virtio_net"),
    Requirement(("PVPANIC",), "pvpanic support (menu option)"),
    Requirement(("PVPANIC_MMIO",),
                "the ISA/ACPI pvpanic device behind QEMU's -device pvpanic; "
                "gives the GUEST_PANICKED event", "pvpanic-mmio"),
)

# The lab host (FACTS section 5): an L1 kernel that is itself a KVM host with memory
# failure. guest_memfd for ordinary VMs is CONFIG_KVM_GUEST_MEMFD since 6.18; the older
# name KVM_PRIVATE_MEM (6.12) only gives it to private-memory VM types, which no Debian
# kernel enables (KVM_SW_PROTECTED_VM is unset), so it does not count.
LABHOST_BUILTIN_REQUIRED: tuple[Requirement, ...] = (
    Requirement(("MEMORY_FAILURE",), "memory_failure(): the host-side poison path under test"),
    Requirement(("KVM_GUEST_MEMFD",),
                "guest_memfd for ordinary VMs (6.18+ name; KVM_PRIVATE_MEM of 6.12 "
                "serves only private-memory VM types)"),
    Requirement(("PROC_PAGE_MONITOR",), "/proc/PID/pagemap and kpageflags (PFN, HWPOISON)"),
    Requirement(("DEVTMPFS",), "/dev (and /dev/kvm) in the initramfs without mknod"),
    Requirement(("DEBUG_FS",), "debugfs: hwpoison/corrupt-pfn lives there"),
    Requirement(("TRACING", "FTRACE"), "tracefs for kvm and ras tracepoints"),
    Requirement(("SERIAL_8250",), "ttyS0 (console) before modules load"),
)
LABHOST_MODULE_ALLOWED: tuple[Requirement, ...] = (
    Requirement(("VIRTIO_PCI",), "the virtio PCI transport for the 9p shares", "virtio_pci"),
    Requirement(("VIRTIO_CONSOLE",), "hvc0, the virtio console that carries the command output",
                "virtio_console"),
    Requirement(("KVM",), "KVM itself: /dev/kvm", "kvm"),
    Requirement(("KVM_AMD",), "KVM on AMD SVM (QEMU TCG emulates SVM with NPT, not VMX)",
                "kvm_amd"),
    Requirement(("HWPOISON_INJECT",), "debugfs hwpoison/corrupt-pfn and unpoison-pfn",
                "hwpoison_inject"),
    Requirement(("NET_9P",), "the 9p protocol (the host's root and the results share)", "9pnet"),
    Requirement(("NET_9P_VIRTIO",), "9p over virtio (QEMU -virtfs)", "9pnet_virtio"),
    Requirement(("9P_FS",), "the 9p file system", "9p"),
)


class KernelConfigError(ImageError, RuntimeError):
    """A kernel (guest or lab host) lacks an option the tests rely on."""

    def __init__(self, option: str, package: str, found: str, wanted: str, why: str) -> None:
        self.option = option
        self.package = package
        self.found = found
        super().__init__(
            f"kernel package {package}: CONFIG_{option} must be {wanted} ({why}), "
            f"found {found}"
        )


def parse_config(text: str) -> dict[str, str]:
    """Map option name (without ``CONFIG_``) to its value; unset options map to ``n``."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if match := _LINE.match(line):
            values[match.group(1)] = match.group(2).strip('"')
        elif match := _UNSET.match(line):
            values[match.group(1)] = "n"
    return values


def _describe(values: Mapping[str, str], req: Requirement) -> str:
    found = [f"CONFIG_{alt}={values[alt]}" for alt in req.alternatives if alt in values]
    return ", ".join(found) if found else "absent"


def check_config(values: Mapping[str, str], package: str) -> tuple[str, ...]:
    """The guest kernel's check: see :func:`check_requirements`."""
    return check_requirements(values, package, BUILTIN_REQUIRED, MODULE_ALLOWED)


def check_labhost_config(values: Mapping[str, str], package: str) -> tuple[str, ...]:
    """The lab-host (L1) kernel's check: see :func:`check_requirements`."""
    return check_requirements(values, package, LABHOST_BUILTIN_REQUIRED, LABHOST_MODULE_ALLOWED)


def check_requirements(values: Mapping[str, str], package: str,
                       builtin: Sequence[Requirement],
                       modular: Sequence[Requirement]) -> tuple[str, ...]:
    """Raise :class:`KernelConfigError` on the first unmet requirement.

    Returns the module stems (in table order) whose options are ``=m`` and so
    must be loaded from the initramfs.
    """
    for req in builtin:
        if not any(values.get(alt) == "y" for alt in req.alternatives):
            raise KernelConfigError(req.name, package, _describe(values, req), "y", req.why)
    modules: list[str] = []
    for req in modular:
        states = [values.get(alt) for alt in req.alternatives]
        if "y" in states:
            continue
        if "m" in states and req.module is not None:
            modules.append(req.module)
            continue
        wanted = "y or m" if req.module is not None else "y"
        raise KernelConfigError(req.name, package, _describe(values, req), wanted, req.why)
    return tuple(modules)


def read_config(path: Path) -> dict[str, str]:
    return parse_config(path.read_text(encoding="utf-8", errors="replace"))
