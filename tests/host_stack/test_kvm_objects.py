"""Typed KVM objects on the real /dev/kvm: errors, exits, and that nothing leaks."""

from __future__ import annotations

import errno
import signal
import threading

import pytest

from host_stack import kvm_uapi as u
from host_stack.kvm import (
    HltExit,
    HostMapping,
    InterruptedExit,
    IoExit,
    KvmIoctlError,
    KvmSystem,
)

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("no_fd_leak")]
P = 4096


@pytest.mark.host_requires("guest_memfd")
def test_error_names_ioctl_arguments_and_errno(kvm_system: KvmSystem) -> None:
    with kvm_system.create_vm() as vm, pytest.raises(KvmIoctlError) as info:
        vm.create_guest_memfd(P + 1, 0)
    err = info.value
    assert err.errno == errno.EINVAL
    assert err.ioctl_name == "KVM_CREATE_GUEST_MEMFD"
    assert err.ioctl_args == {"size": P + 1, "flags": 0}
    assert str(err) == "KVM_CREATE_GUEST_MEMFD(size=0x1001, flags=0x0) failed: EINVAL (Invalid argument)"


def test_system_reports_api_version_and_vcpu_mmap_size(kvm_system: KvmSystem) -> None:
    assert kvm_system.api_version() == u.KVM_API_VERSION
    assert kvm_system.vcpu_mmap_size() >= 4096


def test_vm_check_extension_answers_for_the_vm(kvm_system: KvmSystem) -> None:
    with kvm_system.create_vm() as vm:
        assert vm.check_extension(u.KVM_CAP_USER_MEMORY2) > 0
        # An unknown capability number answers 0, not an error.
        assert vm.check_extension(0x7FFF) == 0


def test_error_rendering_of_a_recorded_answer() -> None:
    """The message of a failed call, from a recorded answer: the same on every host."""
    err = KvmIoctlError("KVM_CREATE_GUEST_MEMFD", {"size": P + 1, "flags": 0}, errno.EINVAL)
    assert (err.errno, err.ioctl_name) == (errno.EINVAL, "KVM_CREATE_GUEST_MEMFD")
    assert err.ioctl_args == {"size": P + 1, "flags": 0}
    assert str(err) == "KVM_CREATE_GUEST_MEMFD(size=0x1001, flags=0x0) failed: EINVAL (Invalid argument)"
    enotty = KvmIoctlError("KVM_CREATE_GUEST_MEMFD", {"size": P, "flags": 0}, errno.ENOTTY)
    assert str(enotty) == ("KVM_CREATE_GUEST_MEMFD(size=0x1000, flags=0x0) failed: "
                           "ENOTTY (Inappropriate ioctl for device)")
    vm = KvmIoctlError("KVM_CREATE_VM", {"vm_type": 1}, errno.EINVAL)
    assert str(vm) == "KVM_CREATE_VM(vm_type=1) failed: EINVAL (Invalid argument)"


@pytest.mark.host_requires("guest_memfd", "guest_memfd_mmap", "guest_memfd_init_shared")
def test_gmem_mmap_write_punch_and_close(kvm_system: KvmSystem) -> None:
    with kvm_system.create_vm() as vm:
        want = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
        with vm.create_guest_memfd(4 * P, want) as gmem, gmem.mmap() as mapping:
            mapping.write_u64(P, 0xFEEDFACE)
            assert mapping.read_u64(P) == 0xFEEDFACE
            gmem.punch_hole(P, P)
            assert mapping.read_u64(P) == 0
        assert mapping.closed and gmem.closed


def test_memslot_deleted_on_exit_frees_the_gpa(kvm_system: KvmSystem) -> None:
    with kvm_system.create_vm() as vm, HostMapping.anonymous(4 * P) as buf:
        with vm.add_memslot(1, 0x100000, 4 * P, buf.addr):
            with pytest.raises(KvmIoctlError) as info:
                vm.add_memslot(2, 0x100000, 4 * P, buf.addr)
            assert info.value.errno == errno.EEXIST
        # After deletion the same range can be used again.
        with vm.add_memslot(2, 0x100000, 4 * P, buf.addr):
            pass


def test_vcpu_runs_out_and_hlt_as_typed_exits(kvm_system: KvmSystem) -> None:
    # Real-mode code at gpa 0x1000: mov al, 0x42; out 0xE0, al; hlt.
    code = bytes([0xB0, 0x42, 0xE6, 0xE0, 0xF4])
    with kvm_system.create_vm() as vm, HostMapping.anonymous(P) as mem:
        mem.write(0, code)
        with vm.add_memslot(0, 0x1000, P, mem.addr), vm.create_vcpu() as vcpu:
            sregs = vcpu.get_sregs()
            sregs.cs.base, sregs.cs.selector = 0x1000, 0x100
            vcpu.set_sregs(sregs)
            regs = u.KvmRegs()
            regs.rip, regs.rflags = 0, 2
            vcpu.set_regs(regs)
            first = vcpu.run()
            assert first == IoExit(0xE0, u.KVM_EXIT_IO_OUT, 1, 1, b"\x42")
            assert isinstance(vcpu.run(), HltExit)
            assert vcpu.get_regs().rip == len(code)


def test_signal_during_kvm_run_is_a_typed_interrupted_exit(kvm_system: KvmSystem) -> None:
    # A SIGBUS for poisoned shared memory ends KVM_RUN this way; SIGUSR1 stands in for it.
    hits: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signo, _frame: hits.append(signo))
    timer = threading.Timer(0.2, signal.pthread_kill, (threading.get_ident(), signal.SIGUSR1))
    try:
        with kvm_system.create_vm() as vm, HostMapping.anonymous(P) as mem:
            mem.write(0, bytes([0xEB, 0xFE]))  # jmp $ (spin until interrupted)
            with vm.add_memslot(0, 0x1000, P, mem.addr), vm.create_vcpu() as vcpu:
                sregs = vcpu.get_sregs()
                sregs.cs.base, sregs.cs.selector = 0x1000, 0x100
                vcpu.set_sregs(sregs)
                regs = u.KvmRegs()
                regs.rflags = 2
                vcpu.set_regs(regs)
                timer.start()
                assert vcpu.run() == InterruptedExit(errno.EINTR)
                assert vcpu.kvm_run.exit_reason == u.KVM_EXIT_INTR
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    assert hits == [signal.SIGUSR1]


def test_failed_kvm_run_mapping_closes_the_vcpu_fd_once(kvm_system: KvmSystem, monkeypatch: pytest.MonkeyPatch) -> None:
    """If mapping kvm_run fails, the vCPU fd is closed once and no fd number is closed twice later."""
    import gc
    import os

    import host_stack.kvm as kvm_mod

    def refuse(*_args: object, **_kwargs: object) -> object:
        raise OSError(errno.ENOMEM, "mmap refused by the test")

    with kvm_system.create_vm() as vm:
        before = set(os.listdir("/proc/self/fd"))
        monkeypatch.setattr(kvm_mod.HostMapping, "map", staticmethod(refuse))
        with pytest.raises(OSError, match="mmap refused by the test") as failure:
            vm.create_vcpu(0)
        monkeypatch.undo()
        assert set(os.listdir("/proc/self/fd")) == before, "the vCPU fd leaked"
        # A new file takes the freed number; collecting the half-built Vcpu (its traceback holds
        # it) must not close that file.
        reader, writer = os.pipe()
        try:
            del failure
            gc.collect()
            os.fstat(reader)
            os.fstat(writer)
        finally:
            os.close(reader)
            os.close(writer)
