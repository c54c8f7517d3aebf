"""Which KVM the lab host runs: Debian's stock modules, or the pair rebuilt with
``CONFIG_KVM_SW_PROTECTED_VM`` (``images.kvm_modules``) that can create private memory.

One choice, the same everywhere: ``gmemtest labhost run --kvm``, and the command L1 runs is
prefixed with the swap (``host_stack.kernel_modules``), so the modules change inside L1 before
the command and nothing else in L1's boot differs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

__all__ = ["KVM_CHOICES", "STOCK", "SW_PROTECTED", "kvm_command"]

STOCK = "stock"
SW_PROTECTED = "sw-protected"
KVM_CHOICES = (STOCK, SW_PROTECTED)
# The shell step that swaps, then runs the command; a failed swap exits 97 (the command never ran).
SWAP_EXIT = 97
_SWAP_SCRIPT = ('"$1" -m host_stack.kernel_modules swap "$2" "$3" >&2 || exit ' + str(SWAP_EXIT)
                + '; shift 3; exec "$@"')


def kvm_command(choice: str, argv: Sequence[str], kernel_release: str, *, python: str = sys.executable,
                progress: Callable[[str], None] | None = None) -> list[str]:
    """``argv`` as L1 runs it under the ``choice`` of KVM (unchanged for the stock modules).

    The rebuilt modules are built for ``kernel_release`` (or taken from the cache) here, on the
    host; L1 reads them through its view of this machine's root.
    """
    if choice not in KVM_CHOICES:
        raise ValueError(f"KVM choice {choice!r} is not one of {', '.join(KVM_CHOICES)}")
    if choice == STOCK:
        return list(argv)
    from images.kvm_modules import build_kvm_modules

    modules = build_kvm_modules(kernel_release, progress=progress)
    return ["sh", "-c", _SWAP_SCRIPT, "sh", python, str(modules.kvm), str(modules.kvm_amd), *argv]
