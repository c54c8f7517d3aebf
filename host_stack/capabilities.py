"""Host capability probing: what this host kernel and KVM can do, each fact proven by trying.

Tests declare what they need ("hwpoison", "guest_memfd_mmap", ...) and cancel with the
report's own sentence (``HostReport.missing``), so a lab engineer reading a CANCEL knows what
to change on the host. Facts come from real attempts wherever an attempt is safe: VM types by
``KVM_CREATE_VM``, hwpoison by ``madvise(MADV_HWPOISON)`` on a scratch page of a throw-away
child process, kprobe/uprobe support by adding and removing an event, Linux-guest support by
running the instruction that kills a Linux guest (``linux_boot_probe``). Nothing about QEMU.

Probing is lazy per group of facts: ``probe_host()`` returns a report that runs a probe the
first time something asks for one of its facts (``missing(name)``, an attribute, ``rows()``).
Asking whether KVM boots Linux must not poison a page: the MADV_HWPOISON child runs only when
the ``hwpoison`` facts are wanted (``missing("hwpoison")``, ``rows()``, ``to_dict()``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from host_stack import kvm_uapi as u
from host_stack import mm_uapi as m
from host_stack.injectors import madvise_failure_sentence
from host_stack.kernel_modules import kernel_taint, module_taint
from host_stack.kernelfs import DEBUGFS, TRACEFS, mounted
from host_stack.pagemap import PAGE_SIZE

__all__ = ["PROBE_GROUPS", "REQUIREMENTS", "HostReport", "first_unmet", "parse_unmet_line", "probe_host",
           "unmet_line", "unmet_reason"]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

REQUIREMENTS: Final = (
    "kvm",
    "kvm_boots_linux",
    "guest_memfd",
    "guest_memfd_mmap",
    "guest_memfd_init_shared",
    "private_memory",
    "sw_protected_vm",
    "pre_fault",
    "hwpoison",
    "hwpoison_inject",
    "einj",
    "kprobes",
    "uprobes",
    "sev_snp_host",
    "tdx_host",
)
_PROBE_TIMEOUT: Final = 30.0
_SYS_MODULE: Final = Path("/sys/module")
_PROC_MODULES: Final = Path("/proc/modules")


@dataclass(frozen=True)
class HostReport:
    """Everything ``probe_host`` found; ``*_reason`` fields hold the probed sentence."""

    kernel_release: str
    kvm_device: bool
    kvm_reason: str | None
    kvm_vendor_module: str | None
    kvm_api_version: int | None
    cap_guest_memfd: int = 0
    guest_memfd_flags: int = 0
    cap_user_memory2: int = 0
    cap_memory_fault_info: int = 0
    cap_memory_attributes: int = 0
    vm_types_mask: int = 0
    cap_pre_fault_memory: int = 0
    supported_vm_types: tuple[int, ...] = ()
    vm_type_errors: tuple[tuple[int, str], ...] = ()
    private_memory_vm_types: tuple[int, ...] = ()
    # Per VM type KVM_CREATE_VM accepted: (type, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_GUEST_MEMFD_FLAGS)
    # asked of that VM's fd (/dev/kvm answers for no VM in particular).
    vm_type_caps: tuple[tuple[int, int, int], ...] = ()
    # The taint letters of the loaded kvm module (/sys/module/kvm/taint): empty for Debian's signed,
    # in-tree module; "OE" for one built out of tree and unsigned (the lab host's rebuilt KVM).
    kvm_module_taint: str = ""
    kernel_taint: int = 0
    kvm_boots_linux: bool | None = None
    kvm_boots_linux_reason: str = "not probed"
    hwpoison: bool = False
    hwpoison_errno: int | None = None
    hwpoison_reason: str = "not probed"
    debugfs: bool = False
    hwpoison_inject: bool = False
    einj: bool = False
    einj_error_types: tuple[int, ...] = ()
    tracefs: bool = False
    kprobes: bool = False
    kprobes_reason: str = "not probed"
    uprobes: bool = False
    uprobes_reason: str = "not probed"
    notes: tuple[str, ...] = field(default=())

    @property
    def kvm_rebuilt(self) -> bool:
        """Whether the loaded KVM is not the distribution's own (built out of tree: taint O)."""
        return "O" in self.kvm_module_taint

    def kvm_modules_line(self) -> str:
        if not self.kvm_device:
            return "none loaded"
        return (f"rebuilt (kvm taint {self.kvm_module_taint}, kernel taint {self.kernel_taint})" if self.kvm_rebuilt
                else f"stock (kernel taint {self.kernel_taint})")

    def vm_type_caps_line(self) -> str:
        names = u.VM_TYPE_NAMES
        return "; ".join(f"{names.get(t, str(t))}: attributes {a:#x}, gmem flags {g:#x}"
                         for t, a, g in self.vm_type_caps) or "none"

    @property
    def guest_memfd_mmap(self) -> bool:
        return bool(self.guest_memfd_flags & u.GUEST_MEMFD_FLAG_MMAP)

    @property
    def guest_memfd_init_shared(self) -> bool:
        return bool(self.guest_memfd_flags & u.GUEST_MEMFD_FLAG_INIT_SHARED)

    def snapshot(self) -> HostReport:
        """A plain, fully probed copy (for ``dataclasses.replace`` and comparisons)."""
        return HostReport(**{f.name: getattr(self, f.name) for f in dataclasses.fields(HostReport)})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self.snapshot())
        d["guest_memfd_mmap"] = self.guest_memfd_mmap
        d["guest_memfd_init_shared"] = self.guest_memfd_init_shared
        d["vm_type_errors"] = {str(t): e for t, e in self.vm_type_errors}
        return d

    def rows(self) -> list[tuple[str, str]]:
        """(item, value) pairs for a two-column table."""
        names = u.VM_TYPE_NAMES
        return [
            ("kernel release", self.kernel_release),
            ("/dev/kvm", "yes" if self.kvm_device else f"no ({self.kvm_reason})"),
            ("KVM vendor module", self.kvm_vendor_module or "none found"),
            ("KVM API version", str(self.kvm_api_version)),
            ("KVM_CAP_GUEST_MEMFD", str(self.cap_guest_memfd)),
            ("KVM_CAP_GUEST_MEMFD_FLAGS", f"{self.guest_memfd_flags:#x}"),
            ("KVM_CAP_USER_MEMORY2", str(self.cap_user_memory2)),
            ("KVM_CAP_MEMORY_FAULT_INFO", str(self.cap_memory_fault_info)),
            ("KVM_CAP_MEMORY_ATTRIBUTES", f"{self.cap_memory_attributes:#x}"),
            ("KVM_CAP_VM_TYPES", f"{self.vm_types_mask:#x}"),
            ("KVM_CAP_PRE_FAULT_MEMORY", str(self.cap_pre_fault_memory)),
            ("VM types (KVM_CREATE_VM)",
             ", ".join(names.get(t, str(t)) for t in self.supported_vm_types) or "none"),
            ("private memory VM types",
             ", ".join(names.get(t, str(t)) for t in self.private_memory_vm_types) or "none"),
            ("per VM type (asked of the VM)", self.vm_type_caps_line()),
            ("KVM modules", self.kvm_modules_line()),
            ("KVM boots Linux", self.kvm_boots_linux_reason),
            ("hwpoison (MADV_HWPOISON)", self.hwpoison_reason),
            ("debugfs", "yes" if self.debugfs else "no"),
            ("hwpoison-inject", "yes" if self.hwpoison_inject else "no"),
            ("APEI EINJ", ", ".join(f"{t:#x}" for t in self.einj_error_types)
             if self.einj else "no"),
            ("tracefs", "yes" if self.tracefs else "no"),
            ("kprobe events", self.kprobes_reason),
            ("uprobe events", self.uprobes_reason),
        ]  # fmt: skip

    def missing(self, requirement: str) -> str | None:
        """None if ``requirement`` is met, else a sentence saying what the host lacks.

        Only the facts ``requirement`` depends on are read, so a lazy report (``probe_host``)
        runs only the probes that decide it.
        """
        if requirement not in REQUIREMENTS:
            raise ValueError(f"unknown host requirement {requirement!r}; valid: {', '.join(REQUIREMENTS)}")
        if requirement not in _WITHOUT_KVM and not self.kvm_device:
            return f"host has no usable /dev/kvm: {self.kvm_reason}"
        ok, sentence = self._checks()[requirement]()
        return None if ok else sentence

    def _checks(self) -> dict[str, Callable[[], tuple[bool, str]]]:
        flags = "host KVM cannot {what}: KVM_CAP_GUEST_MEMFD_FLAGS {flags:#x} lacks {flag}"
        return {
            "kvm": lambda: (self.kvm_device, f"host has no usable /dev/kvm: {self.kvm_reason}"),
            "kvm_boots_linux": lambda: (self.kvm_boots_linux is True, self.kvm_boots_linux_reason),
            "guest_memfd": lambda: (
                self.cap_guest_memfd > 0,
                "host KVM lacks guest_memfd: KVM_CAP_GUEST_MEMFD is 0",
            ),
            "guest_memfd_mmap": lambda: (
                self.cap_guest_memfd > 0 and self.guest_memfd_mmap,
                flags.format(what="mmap guest_memfd", flags=self.guest_memfd_flags, flag="GUEST_MEMFD_FLAG_MMAP")
                if self.cap_guest_memfd > 0 else "host KVM lacks guest_memfd: KVM_CAP_GUEST_MEMFD is 0",
            ),
            "guest_memfd_init_shared": lambda: (
                self.cap_guest_memfd > 0 and self.guest_memfd_init_shared,
                flags.format(what="create guest_memfd shared from the start (a gmem-only slot)",
                             flags=self.guest_memfd_flags, flag="GUEST_MEMFD_FLAG_INIT_SHARED")
                if self.cap_guest_memfd > 0 else "host KVM lacks guest_memfd: KVM_CAP_GUEST_MEMFD is 0",
            ),
            "sw_protected_vm": lambda: (
                u.KVM_X86_SW_PROTECTED_VM in self.private_memory_vm_types,
                "host KVM cannot create a software-protected VM with private memory: KVM_CAP_VM_TYPES "
                f"{self.vm_types_mask:#x} (CONFIG_KVM_SW_PROTECTED_VM is off; the lab host's rebuilt KVM has it)",
            ),
            "private_memory": lambda: (
                bool(self.private_memory_vm_types),
                "host KVM has no private memory: KVM_CAP_MEMORY_ATTRIBUTES lacks "
                "KVM_MEMORY_ATTRIBUTE_PRIVATE on every VM type it creates ("
                + ", ".join(str(t) for t in self.supported_vm_types)
                + ")",
            ),
            "pre_fault": lambda: (
                self.cap_pre_fault_memory > 0,
                "host KVM lacks KVM_PRE_FAULT_MEMORY: KVM_CAP_PRE_FAULT_MEMORY is 0",
            ),
            "hwpoison": lambda: (self.hwpoison, self.hwpoison_reason),
            "hwpoison_inject": lambda: (
                self.hwpoison_inject,
                "host kernel lacks CONFIG_HWPOISON_INJECT: no hwpoison/corrupt-pfn in debugfs"
                if self.debugfs
                else "debugfs is not available, so hwpoison-inject cannot be used",
            ),
            "einj": lambda: (
                self.einj and m.EINJ_TYPE_MEM_UNCORRECTABLE_NONFATAL in self.einj_error_types,
                "host has no ACPI EINJ with memory uncorrectable non-fatal (0x10): " + self._einj_offer(),
            ),
            "kprobes": lambda: (self.kprobes, self.kprobes_reason),
            "uprobes": lambda: (self.uprobes, self.uprobes_reason),
            "sev_snp_host": lambda: (
                u.KVM_X86_SNP_VM in self.supported_vm_types,
                "host is not an SEV-SNP host: KVM_CREATE_VM(KVM_X86_SNP_VM) failed: "
                + self._vm_type_error(u.KVM_X86_SNP_VM),
            ),
            "tdx_host": lambda: (
                u.KVM_X86_TDX_VM in self.supported_vm_types,
                "host is not a TDX host: KVM_CREATE_VM(KVM_X86_TDX_VM) failed: "
                + self._vm_type_error(u.KVM_X86_TDX_VM),
            ),
        }  # fmt: skip

    def _einj_offer(self) -> str:
        if not self.einj:
            return "no apei/einj in debugfs"
        return "offered " + (", ".join(f"{t:#x}" for t in self.einj_error_types) or "nothing")

    def _vm_type_error(self, vm_type: int) -> str:
        return dict(self.vm_type_errors).get(vm_type, "not probed")


# --- probes ------------------------------------------------------------------------------------
def _vendor_module() -> str | None:
    names: list[str] = []
    if _PROC_MODULES.exists():
        names = [line.split()[0] for line in _PROC_MODULES.read_text().splitlines() if line]
    elif _SYS_MODULE.is_dir():
        names = [p.name for p in _SYS_MODULE.iterdir()]
    vendors = sorted(n for n in names if n.startswith("kvm_"))
    return ",".join(vendors) if vendors else None


def _probe_kvm() -> dict[str, Any]:
    """Capabilities and VM types: ioctls only, nothing runs in a guest."""
    from host_stack.kvm import KvmIoctlError, KvmSystem

    try:
        system = KvmSystem()
    except OSError as exc:
        return {"kvm_device": False, "kvm_reason": f"open /dev/kvm: {exc.strerror}"}
    fields: dict[str, Any] = {}
    with system:
        fields.update(kvm_device=True, kvm_reason=None, kvm_api_version=system.api_version())
        caps = {
            "cap_guest_memfd": u.KVM_CAP_GUEST_MEMFD,
            "guest_memfd_flags": u.KVM_CAP_GUEST_MEMFD_FLAGS,
            "cap_user_memory2": u.KVM_CAP_USER_MEMORY2,
            "cap_memory_fault_info": u.KVM_CAP_MEMORY_FAULT_INFO,
            "cap_memory_attributes": u.KVM_CAP_MEMORY_ATTRIBUTES,
            "vm_types_mask": u.KVM_CAP_VM_TYPES,
            "cap_pre_fault_memory": u.KVM_CAP_PRE_FAULT_MEMORY,
        }
        for name, cap in caps.items():
            fields[name] = system.check_extension(cap)
        supported: list[int] = []
        errors: list[tuple[int, str]] = []
        private: list[int] = []
        type_caps: list[tuple[int, int, int]] = []
        for vm_type in sorted(u.VM_TYPE_NAMES):
            try:
                vm = system.create_vm(vm_type)
            except KvmIoctlError as exc:
                errors.append((vm_type, errno.errorcode.get(exc.errno or 0, str(exc.errno))))
                continue
            with vm:
                supported.append(vm_type)
                attrs = vm.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES)
                type_caps.append((vm_type, attrs, vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS)))
                if attrs & u.KVM_MEMORY_ATTRIBUTE_PRIVATE:
                    private.append(vm_type)
        fields.update(
            supported_vm_types=tuple(supported),
            vm_type_errors=tuple(errors),
            private_memory_vm_types=tuple(private),
            vm_type_caps=tuple(type_caps),
            kvm_module_taint=module_taint("kvm"),
            kernel_taint=kernel_taint(),
        )
    return fields


def _probe_linux_boot() -> dict[str, Any]:
    """Two tiny long-mode payloads (``linux_boot_probe``); harmless to the host."""
    from host_stack.kvm import KvmSystem
    from host_stack.linux_boot_probe import probe_linux_boot

    try:
        with KvmSystem() as system:
            boot = probe_linux_boot(system)
    except OSError as exc:
        return {
            "kvm_boots_linux": None,
            "kvm_boots_linux_reason": f"the long-mode probe payload could not be set up: {exc}",
        }
    return {"kvm_boots_linux": boot.boots_linux, "kvm_boots_linux_reason": boot.sentence}


_HWPOISON_CHILD: Final = """
import ctypes, os, sys
from host_stack import mm_uapi as m
from host_stack.pagemap import read_pagemap
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
page = libc.mmap(None, 4096, m.PROT_READ | m.PROT_WRITE, m.MAP_PRIVATE | m.MAP_ANONYMOUS, -1, 0)
ctypes.memset(page, 0x5A, 4096)
print("pfn", read_pagemap(page).pfn or 0, flush=True)
rc = libc.madvise(page, 4096, m.MADV_HWPOISON)
print("errno", 0 if rc == 0 else ctypes.get_errno(), flush=True)
"""


def _python_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _run_hwpoison_child() -> subprocess.CompletedProcess[str]:
    """The only place a page is poisoned by probing: a throw-away child's scratch page."""
    return subprocess.run(
        [sys.executable, "-c", _HWPOISON_CHILD],
        capture_output=True, text=True, env=_python_env(), timeout=_PROBE_TIMEOUT, check=False,
    )  # fmt: skip


def _probe_hwpoison() -> dict[str, Any]:
    """MADV_HWPOISON on a scratch page of a child process, never on this process's memory.

    On a kernel with memory failure this really poisons one page of the child (which is then
    killed by SIGBUS, itself proof of support); the page is unpoisoned when hwpoison-inject
    allows it, otherwise it stays retired, as after any real poison (the reason says so).
    """
    try:
        proc = _run_hwpoison_child()
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return {
            "hwpoison": False,
            "hwpoison_errno": None,
            "hwpoison_reason": f"the MADV_HWPOISON probe child did not finish within {_PROBE_TIMEOUT}s"
            + (f": {stderr.strip()[-300:]}" if stderr.strip() else ""),
        }
    values = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
    pfn = int(values.get("pfn", "0"))
    if "errno" in values and values["errno"] != "0":
        err = int(values["errno"])
        return {"hwpoison": False, "hwpoison_errno": err,
                "hwpoison_reason": madvise_failure_sentence(err)}  # fmt: skip
    if proc.returncode not in (0, -m.SIGBUS):
        return {
            "hwpoison": False,
            "hwpoison_errno": None,
            "hwpoison_reason": f"the MADV_HWPOISON probe child failed (exit {proc.returncode}): "
            + proc.stderr.strip()[-300:],
        }
    how = "its child was killed by SIGBUS" if proc.returncode == -m.SIGBUS else "it returned 0"
    return {"hwpoison": True, "hwpoison_errno": 0,
            "hwpoison_reason": f"MADV_HWPOISON poisoned a scratch page ({how}); {_unpoison_scratch(pfn)}"}  # fmt: skip


def _unpoison_scratch(pfn: int) -> str:
    from host_stack.injectors import InjectionRecord, MadviseInjector

    if not pfn:
        return "its pfn was hidden, so it stays poisoned"
    with mounted(DEBUGFS) as debugfs:
        injector = MadviseInjector(debugfs)
        injector.records.append(InjectionRecord("madvise", 0, 0, pfn, PAGE_SIZE, 0, 0, 0))
        (done,) = injector.cleanup()
    if done.cleanup_failed:
        _log.warning("hwpoison probe: scratch pfn %#x: %s", pfn, done.cleanup)
    return done.cleanup


def _probe_debugfs() -> dict[str, Any]:
    with mounted(DEBUGFS) as debugfs:
        if debugfs is None:
            return {"debugfs": False}
        einj_types = debugfs / m.EINJ_DIR / "available_error_type"
        types: tuple[int, ...] = ()
        if einj_types.exists():
            with contextlib.suppress(OSError, ValueError):
                types = tuple(int(line.split()[0], 16) for line in einj_types.read_text().splitlines() if line)
        return {
            "debugfs": True,
            "hwpoison_inject": (debugfs / m.HWPOISON_CORRUPT_PFN).exists(),
            "einj": einj_types.exists(),
            "einj_error_types": types,
        }


def _try_probe_event(tracefs: Path, file: str, kind: str, definition: str) -> tuple[bool, str]:
    """Add one probe event and remove it again; the outcome is the proof."""
    events = tracefs / file
    if not events.exists():
        return False, f"host kernel lacks {kind} events: no {file} in tracefs"
    group, name = f"gmemtest_{os.getpid()}", kind
    spec = f"p:{group}/{name} {definition}\n"
    try:
        fd = os.open(events, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, spec.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return False, f"host kernel refused a {kind} event ({spec.strip()!r}): {code}"
    fd = os.open(events, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, f"-:{group}/{name}\n".encode())
    finally:
        os.close(fd)
    return True, f"yes: a {kind} event was added and removed ({definition.rsplit('/', maxsplit=1)[-1]})"


def _probe_tracing() -> dict[str, Any]:
    with mounted(TRACEFS) as tracefs:
        if tracefs is None:
            reason = "tracefs is not available"
            return {"tracefs": False, "kprobes_reason": reason, "uprobes_reason": reason}
        kprobes, kreason = _try_probe_event(tracefs, m.TRACEFS_KPROBE_EVENTS, "kprobe", "do_sys_openat2")
        exe = os.path.realpath(sys.executable)
        uprobes, ureason = _try_probe_event(tracefs, m.TRACEFS_UPROBE_EVENTS, "uprobe", f"{exe}:0x0")
        return {
            "tracefs": True,
            "kprobes": kprobes,
            "kprobes_reason": kreason,
            "uprobes": uprobes,
            "uprobes_reason": ureason,
        }


# Each group of facts, the probe that establishes it, and the fields it sets. ``hwpoison`` is
# the only destructive one (it poisons a child's scratch page); it runs only when asked.
_PROBES: Final[dict[str, Callable[[], dict[str, Any]]]] = {
    "kvm": _probe_kvm,
    "kvm_boots_linux": _probe_linux_boot,
    "debugfs": _probe_debugfs,
    "hwpoison": _probe_hwpoison,
    "tracing": _probe_tracing,
}
PROBE_GROUPS: Final = tuple(_PROBES)
_GROUP_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "kvm": ("kvm_device", "kvm_reason", "kvm_api_version", "cap_guest_memfd", "guest_memfd_flags",
            "cap_user_memory2", "cap_memory_fault_info", "cap_memory_attributes", "vm_types_mask",
            "cap_pre_fault_memory", "supported_vm_types", "vm_type_errors", "private_memory_vm_types",
            "vm_type_caps", "kvm_module_taint", "kernel_taint"),
    "kvm_boots_linux": ("kvm_boots_linux", "kvm_boots_linux_reason"),
    "debugfs": ("debugfs", "hwpoison_inject", "einj", "einj_error_types"),
    "hwpoison": ("hwpoison", "hwpoison_errno", "hwpoison_reason"),
    "tracing": ("tracefs", "kprobes", "kprobes_reason", "uprobes", "uprobes_reason"),
}  # fmt: skip
_FIELD_GROUP: Final = {name: group for group, names in _GROUP_FIELDS.items() for name in names}
_WITHOUT_KVM: Final = frozenset({"hwpoison", "hwpoison_inject", "einj", "kprobes", "uprobes"})


class _LazyHostReport(HostReport):
    """A ``HostReport`` whose groups of facts are probed on first access, each at most once.

    Reading a field (directly or through ``missing``/``rows``/``to_dict``) runs the probe of
    its group; the value then stays, as in an eagerly built report.
    """

    def __init__(self, probes: dict[str, Callable[[], dict[str, Any]]] | None = None, **facts: Any) -> None:
        """``probes`` for a lazy report; ``facts`` alone (what ``dataclasses.replace`` passes) for a complete one."""
        object.__setattr__(self, "_probes", dict(probes or {}))
        object.__setattr__(self, "_pending", set(probes or ()))
        object.__setattr__(self, "_lock", threading.RLock())
        if probes is None:
            super().__init__(**facts)
            return
        super().__init__(
            kernel_release=os.uname().release,
            kvm_device=False,
            kvm_reason="not probed",
            kvm_vendor_module=_vendor_module(),
            kvm_api_version=None,
        )

    def __getattribute__(self, name: str) -> Any:
        group = _FIELD_GROUP.get(name)
        if group is not None:
            object.__getattribute__(self, "_ensure")(group)
        return object.__getattribute__(self, name)

    def _ensure(self, group: str) -> None:
        pending: set[str] = object.__getattribute__(self, "_pending")
        if group not in pending:
            return
        with object.__getattribute__(self, "_lock"):
            if group not in pending:
                return
            probe = object.__getattribute__(self, "_probes")[group]
            facts = probe()
            unknown = set(facts) - set(_GROUP_FIELDS[group])
            if unknown:
                raise RuntimeError(f"probe {group!r} set {sorted(unknown)}, expected only {_GROUP_FIELDS[group]}")
            for key, value in facts.items():
                object.__setattr__(self, key, value)
            pending.discard(group)
            _log.info("host probe %s: %s", group, facts)

    @property
    def probed(self) -> tuple[str, ...]:
        """The groups probed so far, in probing order of ``PROBE_GROUPS``."""
        pending: set[str] = object.__getattribute__(self, "_pending")
        return tuple(g for g in PROBE_GROUPS if g not in pending)

    def __repr__(self) -> str:
        return f"HostReport(kernel_release={self.kernel_release!r}, probed={self.probed})"


def probe_host() -> HostReport:
    """This host's report, probed lazily: each group runs the first time one of its facts is read.

    Cheap to call; leaves no mount, event or process. ``missing("kvm_boots_linux")`` runs the
    KVM probes only; the MADV_HWPOISON child runs only for ``hwpoison`` (or a full table).
    """
    return _LazyHostReport(_PROBES)


def first_unmet(report: HostReport, requirements: Iterable[str]) -> tuple[str, str] | None:
    """The first unmet requirement, in the given order, as (name, sentence); None if all are met."""
    for name in requirements:
        sentence = report.missing(name)
        if sentence is not None:
            return name, sentence
    return None


# How a skip or cancel names the requirement behind it, so that a run's results can be read back
# by requirement (the lab-host batch refuses any skip for a requirement the lab host guarantees).
_UNMET_LINE: Final = re.compile(r"^unmet host requirement ([a-z0-9_]+): (.*)$", re.DOTALL)


def unmet_line(name: str, sentence: str) -> str:
    """The one-line reason for a check that cannot run here: the requirement's name and its sentence."""
    if name not in REQUIREMENTS:
        raise ValueError(f"unknown host requirement {name!r}; valid: {', '.join(REQUIREMENTS)}")
    return f"unmet host requirement {name}: {sentence}"


def unmet_reason(report: HostReport, requirements: Iterable[str]) -> str | None:
    """``unmet_line`` of the first unmet requirement, or None: the reason a check CANCELs with."""
    unmet = first_unmet(report, requirements)
    return None if unmet is None else unmet_line(*unmet)


def parse_unmet_line(text: str) -> tuple[str, str] | None:
    """(name, sentence) from a reason ``unmet_line`` wrote (anywhere after a prefix), else None."""
    start = text.find("unmet host requirement ")
    match = _UNMET_LINE.match(text[start:]) if start >= 0 else None
    return (match.group(1), match.group(2)) if match else None
