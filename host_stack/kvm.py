"""Typed KVM objects over ``/dev/kvm``: system, VM, guest_memfd, memslot, vCPU.

Each object owns exactly one kernel resource (an fd or a mapping) and releases it in
``close()`` / on leaving its ``with`` block, so a test can never leak one. Every failing
ioctl raises ``KvmIoctlError`` naming the ioctl, its arguments and the errno, because a bare
``OSError: [Errno 22]`` from a table of twenty uAPI cases is useless to a lab engineer.

The one exception to "failing ioctl raises" is ``KVM_RUN`` failing with EFAULT or EHWPOISON:
that is how a host reports a guest memory fault (``KVM_EXIT_MEMORY_FAULT``), so ``Vcpu.run``
returns it as a typed exit carrying the errno and the ``memory_fault`` fields.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Self

from host_stack import kvm_uapi as u
from host_stack.errors import HostStackError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "PAGE_SIZE",
    "FailEntryExit",
    "GuestMemfd",
    "HltExit",
    "HostMapping",
    "InternalErrorExit",
    "InterruptedExit",
    "IoExit",
    "KvmIoctlError",
    "KvmSystem",
    "MemoryFaultExit",
    "Memslot",
    "MmioExit",
    "OtherExit",
    "RunFailedExit",
    "ShutdownExit",
    "Vcpu",
    "VcpuExit",
    "Vm",
    "probe_vm_creation",
]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

PAGE_SIZE: Final = mmap.PAGESIZE
_MAP_FAILED: Final = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
)  # fmt: skip
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.ioctl.restype = ctypes.c_int
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)


def _fmt_args(args: dict[str, int]) -> str:
    return ", ".join(
        f"{k}={v:#x}" if k not in ("fd", "slot", "id", "cap", "vm_type") else f"{k}={v}" for k, v in args.items()
    )


class KvmIoctlError(HostStackError, OSError):
    """A KVM (or guest_memfd syscall) call failed; names the call, its arguments and errno.

    ``ioctl_args`` holds the arguments (``args`` is taken by ``BaseException``).
    """

    def __init__(self, ioctl_name: str, args: dict[str, int], err: int) -> None:
        self.ioctl_name = ioctl_name
        self.ioctl_args = dict(args)
        message = f"{ioctl_name}({_fmt_args(args)}) failed: {errno.errorcode.get(err, str(err))} ({os.strerror(err)})"
        super().__init__(err, message)

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[type[KvmIoctlError], tuple[str, dict[str, int], int]]:
        return (type(self), (self.ioctl_name, self.ioctl_args, self.errno or 0))


def _ioctl(
    fd: int,
    request: int,
    arg: int | ctypes.Structure = 0,
    args: dict[str, int] | None = None,
) -> int:
    """Issue one ioctl; translate OSError into ``KvmIoctlError`` with the call spelled out."""
    name = u.IOCTL_NAMES.get(request, f"ioctl {request:#x}")
    try:
        if isinstance(arg, ctypes.Structure):
            buf = bytearray(bytes(arg))
            result = fcntl.ioctl(fd, request, buf, True)
            ctypes.memmove(ctypes.addressof(arg), bytes(buf), len(buf))
            return int(result)
        # libc ioctl, not fcntl.ioctl: the latter takes only a signed C int as argument,
        # and addresses such as KVM_SET_TSS_ADDR's do not fit.
        result = _libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(arg))
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(result)
    except OSError as exc:
        raise KvmIoctlError(
            name,
            args if args is not None else {"arg": int(arg) if isinstance(arg, int) else 0},
            exc.errno or 0,
        ) from exc


class _Closeable:
    """Context-manager plumbing shared by every owner of a kernel resource."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort only; tests use ``with`` and never rely on this.
        with contextlib.suppress(Exception):
            self.close()


class _FdOwner(_Closeable):
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class HostMapping(_Closeable):
    """A userspace mapping made with libc ``mmap``; knows its address (the hva) and size.

    Plain ``mmap.mmap`` hides the address that memslots (``userspace_addr``) and injectors
    (``madvise``) need, hence ctypes.
    """

    def __init__(self, addr: int, length: int, description: str) -> None:
        self._addr: int | None = addr
        self.length = length
        self.description = description

    @classmethod
    def map(
        cls,
        length: int,
        *,
        fd: int = -1,
        offset: int = 0,
        shared: bool = True,
        prot: int = mmap.PROT_READ | mmap.PROT_WRITE,
        description: str = "mapping",
    ) -> HostMapping:
        """mmap ``length`` bytes of ``fd`` at ``offset`` (anonymous when ``fd`` is -1)."""
        if length <= 0:
            raise ValueError(f"mapping length must be > 0, got {length}")
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        if fd < 0:
            flags |= mmap.MAP_ANONYMOUS
        addr = _libc.mmap(None, length, prot, flags, fd, offset)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise KvmIoctlError(
                "mmap",
                {"length": length, "prot": prot, "flags": flags, "fd": fd, "offset": offset},
                err,
            )
        _log.debug("mmap %s: %#x+%#x", description, addr, length)
        return cls(int(addr), length, description)

    @classmethod
    def anonymous(cls, length: int, description: str = "anonymous") -> HostMapping:
        """A private anonymous read/write mapping (payload code, decoy buffers)."""
        return cls.map(length, shared=False, description=description)

    @property
    def addr(self) -> int:
        if self._addr is None:
            raise ValueError(f"mapping {self.description} is closed")
        return self._addr

    @property
    def closed(self) -> bool:
        return self._addr is None

    def _check(self, offset: int, size: int) -> int:
        if offset < 0 or size < 0 or offset + size > self.length:
            raise ValueError(
                f"range {offset:#x}+{size:#x} outside mapping {self.description} of {self.length:#x} bytes"
            )
        return self.addr + offset

    def read(self, offset: int, size: int) -> bytes:
        """Copy ``size`` bytes out of the mapping (a CPU load: may fault on poison)."""
        return ctypes.string_at(self._check(offset, size), size)

    def write(self, offset: int, data: bytes) -> None:
        """Copy ``data`` into the mapping (a CPU store: may fault on poison)."""
        ctypes.memmove(self._check(offset, len(data)), data, len(data))

    def read_u32(self, offset: int) -> int:
        return int.from_bytes(self.read(offset, 4), "little")

    def write_u32(self, offset: int, value: int) -> None:
        self.write(offset, value.to_bytes(4, "little"))

    def read_u64(self, offset: int) -> int:
        return int.from_bytes(self.read(offset, 8), "little")

    def write_u64(self, offset: int, value: int) -> None:
        self.write(offset, value.to_bytes(8, "little"))

    def close(self) -> None:
        addr, self._addr = self._addr, None
        if addr is not None and _libc.munmap(addr, self.length) != 0:
            err = ctypes.get_errno()
            raise KvmIoctlError("munmap", {"addr": addr, "length": self.length}, err)


class KvmSystem(_FdOwner):
    """``/dev/kvm``: API version, capabilities, vCPU mmap size, VM creation."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        super().__init__(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def api_version(self) -> int:
        return _ioctl(self.fd, u.KVM_GET_API_VERSION, 0, {})

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on /dev/kvm: 0 means absent, >0 is cap-specific."""
        return _ioctl(self.fd, u.KVM_CHECK_EXTENSION, cap, {"cap": cap})

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, u.KVM_GET_VCPU_MMAP_SIZE, 0, {})

    def create_vm(self, vm_type: int = u.KVM_X86_DEFAULT_VM) -> Vm:
        fd = _ioctl(self.fd, u.KVM_CREATE_VM, vm_type, {"vm_type": vm_type})
        return Vm(self, fd, vm_type)

    def supported_cpuid(self) -> list[u.KvmCpuidEntry2]:
        """``KVM_GET_SUPPORTED_CPUID``: the CPUID this KVM can give a vCPU (for KVM_SET_CPUID2)."""
        nent = 64
        while True:
            buf = u.kvm_cpuid2(nent)
            try:
                _ioctl(self.fd, u.KVM_GET_SUPPORTED_CPUID, buf, {"nent": nent})
            except KvmIoctlError as exc:
                if exc.errno == errno.E2BIG and nent < u.KVM_MAX_CPUID_ENTRIES * 4:
                    nent *= 2  # the kernel needs more room than offered
                    continue
                raise
            entries = getattr(buf, "entries")  # noqa: B009 - a field of a per-size ctypes class
            return [u.KvmCpuidEntry2.from_buffer_copy(entries[i]) for i in range(buf.nent)]


class Vm(_FdOwner):
    """A VM fd; creates guest_memfds, memslots and vCPUs."""

    def __init__(self, system: KvmSystem, fd: int, vm_type: int) -> None:
        super().__init__(fd)
        self.system = system
        self.vm_type = vm_type

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (answers for this VM type)."""
        return _ioctl(self.fd, u.KVM_CHECK_EXTENSION, cap, {"cap": cap})

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, u.KVM_SET_TSS_ADDR, addr, {"addr": addr})

    def set_memory_attributes(self, gpa: int, size: int, attributes: int) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES`` on ``[gpa, gpa+size)``: 0 shared, ``KVM_MEMORY_ATTRIBUTE_PRIVATE``
        private. KVM copies nothing: which memory serves the range changes, its contents do not."""
        attrs = u.KvmMemoryAttributes(address=gpa, size=size, attributes=attributes, flags=0)
        _ioctl(self.fd, u.KVM_SET_MEMORY_ATTRIBUTES, attrs, {"address": gpa, "size": size, "attributes": attributes})

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        return GuestMemfd.create(self, size, flags)

    def set_user_memory_region2(
        self,
        slot: int,
        *,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd: int = 0,
        guest_memfd_offset: int = 0,
    ) -> None:
        """Raw ``KVM_SET_USER_MEMORY_REGION2``; most callers want ``add_memslot``."""
        region = u.KvmUserspaceMemoryRegion2(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
            guest_memfd_offset=guest_memfd_offset,
            guest_memfd=guest_memfd,
        )
        args = {
            "slot": slot,
            "flags": flags,
            "guest_phys_addr": guest_phys_addr,
            "memory_size": memory_size,
            "userspace_addr": userspace_addr,
            "guest_memfd": guest_memfd,
            "guest_memfd_offset": guest_memfd_offset,
        }
        _ioctl(self.fd, u.KVM_SET_USER_MEMORY_REGION2, region, args)

    def add_memslot(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        *,
        flags: int = 0,
        gmem: GuestMemfd | None = None,
        guest_memfd_offset: int = 0,
    ) -> Memslot:
        """Create a memslot; ``gmem`` adds ``KVM_MEM_GUEST_MEMFD`` and binds the file."""
        return Memslot(
            self,
            slot,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            flags=flags,
            gmem=gmem,
            guest_memfd_offset=guest_memfd_offset,
        )

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        size = self.system.vcpu_mmap_size()
        fd = _ioctl(self.fd, u.KVM_CREATE_VCPU, vcpu_id, {"id": vcpu_id})
        return Vcpu(self, fd, vcpu_id, size)  # owns fd from here, also when its mapping fails


class GuestMemfd(_FdOwner):
    """A guest_memfd file (``KVM_CREATE_GUEST_MEMFD``)."""

    def __init__(self, vm: Vm, fd: int, size: int, flags: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.size = size
        self.flags = flags

    @classmethod
    def create(cls, vm: Vm, size: int, flags: int = 0) -> GuestMemfd:
        arg = u.KvmCreateGuestMemfd(size=size, flags=flags)
        fd = _ioctl(vm.fd, u.KVM_CREATE_GUEST_MEMFD, arg, {"size": size, "flags": flags})
        return cls(vm, fd, size, flags)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the file; raises ``KvmIoctlError('fallocate', ...)`` on failure."""
        if _libc.fallocate(self.fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise KvmIoctlError("fallocate", {"fd": self.fd, "mode": mode, "offset": offset, "len": length}, err)

    def punch_hole(self, offset: int, length: int) -> None:
        """Free ``[offset, offset+length)``; the only hole mode guest_memfd accepts."""
        self.fallocate(u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, offset, length)

    def mmap(self, length: int | None = None, offset: int = 0, shared: bool = True) -> HostMapping:
        """Map the file (needs ``GUEST_MEMFD_FLAG_MMAP``; the kernel refuses MAP_PRIVATE)."""
        return HostMapping.map(
            self.size if length is None else length,
            fd=self.fd,
            offset=offset,
            shared=shared,
            description=f"guest_memfd fd {self.fd} @ {offset:#x}",
        )


class Memslot(_Closeable):
    """One ``KVM_SET_USER_MEMORY_REGION2`` slot, deleted (memory_size 0) on close."""

    def __init__(
        self,
        vm: Vm,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        *,
        flags: int = 0,
        gmem: GuestMemfd | None = None,
        guest_memfd_offset: int = 0,
    ) -> None:
        self.vm = vm
        self.slot = slot
        self.guest_phys_addr = guest_phys_addr
        self.memory_size = memory_size
        self.userspace_addr = userspace_addr
        self.flags = flags | (u.KVM_MEM_GUEST_MEMFD if gmem is not None else 0)
        self.gmem = gmem
        self.guest_memfd_offset = guest_memfd_offset
        vm.set_user_memory_region2(
            slot,
            flags=self.flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
            guest_memfd=gmem.fd if gmem is not None else 0,
            guest_memfd_offset=guest_memfd_offset,
        )
        self._live = True

    @property
    def base_gfn(self) -> int:
        return self.guest_phys_addr // PAGE_SIZE

    @property
    def npages(self) -> int:
        return self.memory_size // PAGE_SIZE

    def close(self) -> None:
        if not getattr(self, "_live", False):
            return
        self._live = False
        if self.vm.closed:
            return  # the VM's memslots died with it
        self.vm.set_user_memory_region2(
            self.slot,
            flags=0,
            guest_phys_addr=self.guest_phys_addr,
            memory_size=0,
            userspace_addr=0,
        )


# --- vCPU exits -------------------------------------------------------------------------------
@dataclass(frozen=True)
class IoExit:
    """``KVM_EXIT_IO``: ``data`` holds ``size * count`` bytes (OUT: what the guest wrote)."""

    port: int
    direction: int  # u.KVM_EXIT_IO_IN / KVM_EXIT_IO_OUT
    size: int
    count: int
    data: bytes

    @property
    def value(self) -> int:
        """The first element as a little-endian integer."""
        return int.from_bytes(self.data[: self.size], "little")


@dataclass(frozen=True)
class HltExit:
    """``KVM_EXIT_HLT``."""


@dataclass(frozen=True)
class MmioExit:
    """``KVM_EXIT_MMIO``."""

    phys_addr: int
    data: bytes
    length: int
    is_write: bool


@dataclass(frozen=True)
class MemoryFaultExit:
    """``KVM_EXIT_MEMORY_FAULT``; ``errno`` is set when KVM_RUN returned -1 (EFAULT/EHWPOISON)."""

    gpa: int
    size: int
    flags: int
    errno: int | None


@dataclass(frozen=True)
class RunFailedExit:
    """KVM_RUN returned -1 with EFAULT/EHWPOISON but ``exit_reason`` is not MEMORY_FAULT."""

    errno: int
    exit_reason: int


@dataclass(frozen=True)
class InterruptedExit:
    """KVM_RUN returned -1/EINTR (``KVM_EXIT_INTR``): a signal is pending for the vCPU thread.

    This is how a SIGBUS sent to the vCPU thread (e.g. for poisoned shared memory) ends a run.
    """

    errno: int = errno.EINTR


@dataclass(frozen=True)
class ShutdownExit:
    """``KVM_EXIT_SHUTDOWN`` (triple fault)."""


@dataclass(frozen=True)
class InternalErrorExit:
    """``KVM_EXIT_INTERNAL_ERROR`` with its suberror and data words."""

    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True)
class FailEntryExit:
    """``KVM_EXIT_FAIL_ENTRY``."""

    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True)
class OtherExit:
    """Any exit reason this module does not model; carries the raw reason."""

    exit_reason: int

    @property
    def name(self) -> str:
        return u.EXIT_REASON_NAMES.get(self.exit_reason, f"exit {self.exit_reason}")


VcpuExit = (
    IoExit
    | HltExit
    | MmioExit
    | MemoryFaultExit
    | RunFailedExit
    | InterruptedExit
    | ShutdownExit
    | InternalErrorExit
    | FailEntryExit
    | OtherExit
)


class Vcpu(_FdOwner):
    """A vCPU fd plus its ``kvm_run`` mapping."""

    def __init__(self, vm: Vm, fd: int, vcpu_id: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.vcpu_id = vcpu_id
        try:
            self._run_map = HostMapping.map(mmap_size, fd=fd, description=f"kvm_run vcpu {vcpu_id}")
        except BaseException:
            # Close our fd exactly once, here: a later __del__ must not close a reused number.
            _FdOwner.close(self)
            raise

    @property
    def kvm_run(self) -> u.KvmRun:
        return u.KvmRun.from_address(self._run_map.addr)

    def get_regs(self) -> u.KvmRegs:
        regs = u.KvmRegs()
        _ioctl(self.fd, u.KVM_GET_REGS, regs, {})
        return regs

    def set_regs(self, regs: u.KvmRegs) -> None:
        _ioctl(self.fd, u.KVM_SET_REGS, regs, {"rip": regs.rip, "rflags": regs.rflags})

    def get_sregs(self) -> u.KvmSregs:
        sregs = u.KvmSregs()
        _ioctl(self.fd, u.KVM_GET_SREGS, sregs, {})
        return sregs

    def set_sregs(self, sregs: u.KvmSregs) -> None:
        _ioctl(self.fd, u.KVM_SET_SREGS, sregs, {"cr0": sregs.cr0, "cs_base": sregs.cs.base})

    def set_cpuid2(self, entries: list[u.KvmCpuidEntry2]) -> None:
        """``KVM_SET_CPUID2``; upstream KVM refuses EFER.LME in KVM_SET_SREGS until the vCPU has LM."""
        buf = u.kvm_cpuid2(len(entries))
        target = getattr(buf, "entries")  # noqa: B009 - a field of a per-size ctypes class
        for i, entry in enumerate(entries):
            target[i] = entry
        _ioctl(self.fd, u.KVM_SET_CPUID2, buf, {"nent": len(entries)})

    def run(self) -> VcpuExit:
        """One ``KVM_RUN``; returns the typed exit.

        EFAULT/EHWPOISON are answers about guest memory, not failures of this call, so they
        come back as ``MemoryFaultExit``/``RunFailedExit``; EINTR (a signal for this thread)
        comes back as ``InterruptedExit``; any other errno raises ``KvmIoctlError``.
        """
        try:
            fcntl.ioctl(self.fd, u.KVM_RUN, 0)
            err: int | None = None
        except OSError as exc:
            err = exc.errno or 0
            if err == errno.EINTR:
                return InterruptedExit()
            if err not in (errno.EFAULT, u.EHWPOISON):
                raise KvmIoctlError("KVM_RUN", {"vcpu": self.vcpu_id}, err) from exc
        run = self.kvm_run
        reason = int(run.exit_reason)
        if reason == u.KVM_EXIT_MEMORY_FAULT:
            mf = run.exit.memory_fault
            return MemoryFaultExit(gpa=mf.gpa, size=mf.size, flags=mf.flags, errno=err)
        if err is not None:
            return RunFailedExit(errno=err, exit_reason=reason)
        return self._decode(run, reason)

    def _decode(self, run: u.KvmRun, reason: int) -> VcpuExit:
        if reason == u.KVM_EXIT_IO:
            io = run.exit.io
            nbytes = io.size * io.count
            data = self._run_map.read(io.data_offset, nbytes)
            return IoExit(io.port, io.direction, io.size, io.count, data)
        if reason == u.KVM_EXIT_HLT:
            return HltExit()
        if reason == u.KVM_EXIT_MMIO:
            m = run.exit.mmio
            return MmioExit(m.phys_addr, bytes(m.data)[: m.len], m.len, bool(m.is_write))
        if reason == u.KVM_EXIT_SHUTDOWN:
            return ShutdownExit()
        if reason == u.KVM_EXIT_INTERNAL_ERROR:
            ie = run.exit.internal
            return InternalErrorExit(ie.suberror, tuple(ie.data[: min(ie.ndata, 16)]))
        if reason == u.KVM_EXIT_FAIL_ENTRY:
            fe = run.exit.fail_entry
            return FailEntryExit(fe.hardware_entry_failure_reason, fe.cpu)
        return OtherExit(reason)

    def close(self) -> None:
        run_map = getattr(self, "_run_map", None)
        try:
            if run_map is not None:
                run_map.close()
        finally:
            super().close()


def probe_vm_creation(path: str = "/dev/kvm") -> str | None:
    """Return why a VM cannot be created here (a sentence), or None if it can.

    Tests skip/cancel with this sentence; it comes from a real attempt, not a guess.
    """
    try:
        with KvmSystem(path) as system:
            version = system.api_version()
            if version != u.KVM_API_VERSION:
                return f"{path}: KVM_GET_API_VERSION returned {version}, need {u.KVM_API_VERSION}"
            with system.create_vm(u.KVM_X86_DEFAULT_VM):
                return None
    except OSError as exc:
        return f"cannot create a KVM VM through {path}: {exc}"
