"""Shared fixtures for host_stack tests: a /dev/kvm handle, skipped with a probed reason."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from host_stack.capabilities import unmet_line
from host_stack.kvm import KvmSystem, probe_vm_creation


@pytest.fixture(scope="session")
def kvm_unavailable() -> str | None:
    """Why no VM can be created here (from a real attempt), or None."""
    return probe_vm_creation()


@pytest.fixture
def kvm_system(kvm_unavailable: str | None) -> Iterator[KvmSystem]:
    """An open /dev/kvm; the test is skipped with the probe's sentence if KVM is unusable."""
    if kvm_unavailable is not None:
        pytest.skip(unmet_line("kvm", kvm_unavailable))
    with KvmSystem() as system:
        yield system


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves more open fds than it found."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    after = set(os.listdir("/proc/self/fd"))
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in after - before if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"expected no new fds after the test, got {leaked}"
