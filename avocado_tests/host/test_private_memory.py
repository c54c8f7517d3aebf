"""Private memory of a software-protected VM: conversions, and poison behind a private gfn."""

from __future__ import annotations

from avocado import Test

from gmemtest.avocado_support import HOST_TEST_TIMEOUT_S, run_host_check
from gmemtest.host_checks import CONVERSION_ITEM, PRIVATE_MATRIX_ITEM, PRIVATE_SEED_ITEM


class PrivateMemory(Test):  # type: ignore[misc]  # avocado is untyped
    """
    Convert gfns of a software-protected VM (KVM_X86_SW_PROTECTED_VM) between shared and private,
    then poison the frame behind a private gfn and judge KVM's report of the vCPU's touch.

    CANCELs with the host's sentence where KVM creates no software-protected VM (Debian's stock
    KVM: CONFIG_KVM_SW_PROTECTED_VM is off; the lab host's rebuilt KVM has it) or the kernel
    cannot poison a page; a frame the clean-up could not unpoison makes it WARN.

    :avocado: tags=host,gmem,private,kvm
    """

    timeout = HOST_TEST_TIMEOUT_S

    def test_conversion_table(self) -> None:
        """:avocado: tags=conversion"""
        run_host_check(self, CONVERSION_ITEM)

    def test_private_seed_regression(self) -> None:
        """:avocado: tags=hwpoison,seed"""
        run_host_check(self, PRIVATE_SEED_ITEM)

    def test_private_poison_matrix(self) -> None:
        """:avocado: tags=hwpoison,matrix"""
        run_host_check(self, PRIVATE_MATRIX_ITEM)
