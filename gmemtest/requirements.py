"""Turn a profile's requirement names into sentences about what this host lacks.

Names without a prefix are host capabilities (host_stack.capabilities); `hugepages_2m:N` asks
for N free 2 MiB huge pages on the host (read when asked: they come and go); `qemu:NAME` asks the
QEMU binary itself (an object type such as `qemu:sev-snp-guest`, `qemu:guest-memfd` for the
memory-backend property, `qemu:accel-tcg`, `qemu:kvm-start`: a real, paused KVM start). Every
KVM profile needs `qemu:kvm-start`. Each report is probed once per process.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from gmemtest.scenarios import ScenarioSpec, unsupported_under
from guests.profiles import GuestProfile
from host_stack.capabilities import HostReport, probe_host, unmet_line, unmet_reason
from host_stack.kvm import probe_vm_creation
from qmp_helpers import DEFAULT_QEMU, QemuCapabilities, QemuError, kvm_start_refusal, probe_qemu, resolve_binary


@functools.cache
def host_report() -> HostReport:
    return probe_host()


@functools.cache
def qemu_report(binary: str = DEFAULT_QEMU) -> QemuCapabilities | str:
    """The binary's capabilities, or the sentence saying why it could not be asked."""
    try:
        return probe_qemu(binary)
    except QemuError as exc:
        return f"QEMU binary {binary!r} could not be probed: {exc}"


def host_unmet(requirements: Iterable[str], report: HostReport | None = None) -> str | None:
    """Why a host check cannot run here (``unmet host requirement <name>: <sentence>``), or None.

    ``kvm`` is proven by creating a VM (not only by opening /dev/kvm); every other name is asked
    of ``report`` (default: this host's, probed once per process).
    """
    names = tuple(requirements)
    if "kvm" in names and report is None:
        reason = probe_vm_creation()
        if reason is not None:
            return unmet_line("kvm", reason)
    return unmet_reason(report if report is not None else host_report(), names)


def kvm_start_report(binary: str) -> str | None:
    """Why ``binary`` cannot start a KVM guest here (probed once per resolved binary), or None."""
    try:
        path = resolve_binary(binary)
    except QemuError as exc:
        return str(exc)
    return _kvm_start_report(path)


@functools.cache
def _kvm_start_report(path: str) -> str | None:
    try:
        return kvm_start_refusal(path)
    except QemuError as exc:
        return f"{path} could not be started to probe KVM: {exc}"


def qemu_missing(name: str, caps: QemuCapabilities) -> str | None:
    """Why ``caps`` (one QEMU binary) lacks ``qemu:<name>``, or None."""
    qemu = f"{caps.binary} (QEMU {'.'.join(map(str, caps.version))})"
    if name.startswith("accel-"):
        accel = name.removeprefix("accel-")
        if accel not in caps.accelerators:
            return f"{qemu} has no {accel} accelerator (it offers: {', '.join(caps.accelerators)})"
        return None
    if name == "kvm-start":
        return kvm_start_report(caps.binary)
    if name == "guest-memfd":
        if not any(caps.guest_memfd_property.values()):
            return (f"{qemu} has no 'guest-memfd' property on "
                    f"{' or '.join(caps.guest_memfd_property)} (QOM says so)")
        return None
    if name in caps.object_types:
        if not caps.object_types[name]:
            return f"{qemu} has no '{name}' object type (QOM says so)"
        return None
    if name in caps.qmp_commands:
        if not caps.qmp_commands[name]:
            return f"{qemu} has no QMP command '{name}' (query-commands says so)"
        return None
    if name in caps.kvm_accel_properties:
        if not caps.kvm_accel_properties[name]:
            return f"{qemu} has no KVM accelerator property '{name}' (QOM says so)"
        return None
    raise ValueError(f"unknown QEMU requirement 'qemu:{name}'; valid: accel-<name>, kvm-start, guest-memfd, "
                     f"{', '.join((*caps.object_types, *caps.qmp_commands, *caps.kvm_accel_properties))}")


def unmet_requirements(names: Iterable[str], *, binary: str = DEFAULT_QEMU,
                       accel: str = "tcg") -> list[str]:
    """One sentence per unmet requirement; empty when everything the names ask for is here."""
    unmet: list[str] = []
    caps = qemu_report(binary)
    wanted = [f"qemu:accel-{accel}", *(["qemu:kvm-start"] if accel == "kvm" else []), *names]
    for name in wanted:
        if name.startswith("hugepages_2m:"):
            missing = _hugepages_missing(name)
        elif name.startswith("qemu:"):
            if isinstance(caps, str):
                unmet.append(caps)
                continue
            missing = qemu_missing(name.removeprefix("qemu:"), caps)
        else:
            missing = host_report().missing(name)
        if missing is not None and missing not in unmet:
            unmet.append(missing)
    return unmet


def _hugepages_missing(name: str) -> str | None:
    from host_stack.pagemap import free_hugepages

    count = name.removeprefix("hugepages_2m:")
    if not count.isdigit():
        raise ValueError(f"bad requirement {name!r}: hugepages_2m:N needs a page count N")
    free = free_hugepages(2048)
    if free is None:
        return "host kernel has no 2 MiB huge pages (/sys/kernel/mm/hugepages/hugepages-2048kB)"
    if free < int(count):
        return (f"host has {free} free 2 MiB huge pages, the guest's RAM needs {count}: reserve them first "
                f"(echo {count} > /proc/sys/vm/nr_hugepages, or hugepages={count} on the kernel command line)")
    return None


def scenario_unmet(spec: ScenarioSpec, profile: GuestProfile, *, binary: str = DEFAULT_QEMU) -> list[str]:
    """Why ``spec`` cannot run under ``profile`` here: meaningless there, or the profile's or the
    row's own requirements unmet (a host-poison row needs hwpoison-inject). Empty: it can run."""
    meaningless = unsupported_under(spec, profile)
    if meaningless:
        return [meaningless]
    return unmet_requirements((*profile.requirements, *spec.requirements), accel=profile.accel, binary=binary)
