"""What a QEMU binary offers, asked of the binary itself, never inferred from its version.

Object types and properties come from QMP ``qom-list-types``/``qom-list-properties`` on a
``-machine none`` instance; accelerators from ``-accel help``. ``validate_args`` lets a lab
profile (SNP, TDX, guest-memfd backends) be checked against the real binary without
running a guest.
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import QemuLaunchError, QmpCommandError
from .machine import DEFAULT_QEMU, QemuMachine, resolve_binary

_LOG = logging.getLogger(__name__)

# x-sw-protected-vm: a KVM_X86_SW_PROTECTED_VM (the project's QEMU series, images/patches/qemu).
CONFIDENTIAL_GUEST_TYPES = ("sev-snp-guest", "tdx-guest", "x-sw-protected-vm")
# The QMP commands that drive and read conversions (the same series); no released QEMU has them.
CONVERSION_COMMANDS = ("x-kvm-convert-memory", "x-query-kvm-private-memory")
# Properties of the KVM accelerator (-accel kvm,NAME=...) the project asks about (the same series).
KVM_ACCEL_PROPERTIES = ("x-private-hwpoison-mce",)
GUEST_MEMFD_BACKENDS = ("memory-backend-memfd", "memory-backend-ram")
GUEST_MEMFD_PROPERTY = "guest-memfd"
_VERSION_RE = re.compile(r"QEMU emulator version (\S+)")


@dataclass(frozen=True)
class QemuCapabilities:
    """Capabilities of one QEMU binary as it reported them."""

    binary: str
    version_text: str
    version: tuple[int, int, int]
    package: str
    object_types: dict[str, bool]
    guest_memfd_property: dict[str, bool]
    accelerators: tuple[str, ...]
    qmp_commands: dict[str, bool]
    kvm_accel_properties: dict[str, bool]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for qualification reports."""
        data = asdict(self)
        data["version"] = ".".join(str(part) for part in self.version)
        data["accelerators"] = list(self.accelerators)
        return data


def _run(argv: Sequence[str], timeout: float = 10.0) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                            check=False)
    if result.returncode != 0:
        raise QemuLaunchError(f"{' '.join(argv)} failed", argv=argv, stderr=result.stderr,
                              returncode=result.returncode)
    return result.stdout


def _accelerators(binary: str) -> tuple[str, ...]:
    """Accelerators compiled into the binary; usable on this host is a separate question."""
    text = _run([binary, "-accel", "help"])
    lines = [line.strip() for line in text.splitlines()]
    return tuple(line for line in lines if line and not line.endswith(":"))


def probe_qemu(binary: str = DEFAULT_QEMU) -> QemuCapabilities:
    """Ask ``binary`` what it offers (starts one short-lived ``-machine none`` QEMU)."""
    path = resolve_binary(binary)
    version_text = _run([path, "--version"]).splitlines()[0].strip()
    match = _VERSION_RE.search(version_text)
    with tempfile.TemporaryDirectory(prefix="gmcaps-") as tmp, QemuMachine(
            ["-machine", "none", "-nodefaults"], Path(tmp), binary=path, name="caps",
            ssh_forward_port=None) as machine:
        qmp_version = machine.qmp("query-version")
        types = {entry["name"] for entry in
                 machine.qmp("qom-list-types", implements="object", abstract=True)}
        object_types = {name: name in types for name in CONFIDENTIAL_GUEST_TYPES}
        commands = {entry["name"] for entry in machine.qmp("query-commands")}
        try:
            accel_props = {p["name"] for p in machine.qmp("qom-list-properties", typename="kvm-accel")}
        except QmpCommandError as exc:  # a QEMU built without KVM
            _LOG.debug("kvm-accel: %s", exc)
            accel_props = set()
        gmem_prop: dict[str, bool] = {}
        for backend in GUEST_MEMFD_BACKENDS:
            try:
                props = machine.qmp("qom-list-properties", typename=backend)
            except QmpCommandError as exc:
                _LOG.debug("%s: %s", backend, exc)
                gmem_prop[backend] = False
                continue
            gmem_prop[backend] = any(p["name"] == GUEST_MEMFD_PROPERTY for p in props)
    qv = qmp_version["qemu"]
    version = (int(qv["major"]), int(qv["minor"]), int(qv["micro"]))
    if match is not None and not match.group(1).startswith(".".join(map(str, version))):
        _LOG.warning("--version says %s but query-version says %s", match.group(1), version)
    return QemuCapabilities(binary=path, version_text=version_text, version=version,
                            package=str(qmp_version.get("package", "")).strip(),
                            object_types=object_types, guest_memfd_property=gmem_prop,
                            accelerators=_accelerators(path),
                            qmp_commands={name: name in commands for name in CONVERSION_COMMANDS},
                            kvm_accel_properties={name: name in accel_props for name in KVM_ACCEL_PROPERTIES})


def validate_args(binary: str, args: Sequence[str], timeout: float = 10.0) -> str | None:
    """QEMU's error text if it rejects the command line ``args``, else None.

    QEMU is started paused (``-S``): it builds the whole machine (so bad options, missing
    firmware, an unavailable accelerator or a refused confidential-guest object fail) but
    no guest code runs. Answering QMP means the command line was accepted.
    """
    with tempfile.TemporaryDirectory(prefix="gmvalidate-") as tmp:
        machine = QemuMachine([*args, "-S"], Path(tmp), binary=binary, name="validate",
                              ssh_forward_port=None, qmp_timeout=timeout)
        try:
            machine.launch()
        except QemuLaunchError as exc:
            return exc.stderr.strip() or str(exc)
        finally:
            machine.shutdown(timeout=2.0)
    return None


# The smallest KVM guest QEMU will build: what a KVM profile needs before anything of its own.
KVM_START_ARGS = ("-accel", "kvm", "-cpu", "host", "-machine", "q35", "-nodefaults", "-m", "128",
                  "-display", "none")


def kvm_start_refusal(binary: str = DEFAULT_QEMU, timeout: float = 10.0) -> str | None:
    """Why ``binary`` cannot start a KVM guest on this host, from a real (paused) start; None if it can.

    That /dev/kvm opens says nothing about whether QEMU can use it: on an AMD host with a
    PVM-based KVM, QEMU aborts while it sets up the vCPU ("failed to set MSR 0x10a ...
    kvm_buf_set_msrs: Assertion ... failed"), on an Intel one of the same kind it starts. Only
    starting QEMU tells, so the answer is probed, never derived from the CPU vendor.
    """
    error = validate_args(binary, KVM_START_ARGS, timeout=timeout)
    if error is None:
        return None
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return (f"{binary} cannot start a KVM guest on this host (a paused '{' '.join(KVM_START_ARGS[:4])}' "
            f"start failed): {' | '.join(lines[:3]) or 'no message'}")
