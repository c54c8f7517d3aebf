"""QEMU arguments for a fast boot of the default image under TCG, and how they were chosen.

The kernel command line they were measured with is the profiles' own
(``guests.profiles.BASE_KERNEL_ARGS``: a profile owns every kernel argument). Every saving
below is a median of 3 boots, launch -> first SSH command (``uname -r``), on the
2-core development machine, measured with ``python -m images.measure_boot``; the
starting point was 5.1 s with the bzImage and SeaBIOS. The largest saving is not
here but in the image: booting the uncompressed PVH ``vmlinux`` instead of the XZ
bzImage took 5.1 s down to 2.6 s (see ``images/vmlinux.py``). An uncompressed
initramfs beat a gzip one by 0.3 s (7.5 MB vs 3.5 MB: inflating costs more under
TCG than QEMU's loader spends copying).
"""

from __future__ import annotations

from guests.profiles import QBOOT_FIRMWARE

__all__ = ["FAST_QEMU_ARGS"]

# For images.measure_boot's bare command line only: the guest profiles carry the same choices
# themselves (machine q35, firmware qboot), so a launched guest never gets them twice.
FAST_QEMU_ARGS: tuple[str, ...] = (
    # q35 booted 0.15 s faster than pc with the same kernel and firmware.
    "-machine", "q35",
    # qboot instead of SeaBIOS: 2.15 s -> 1.93 s (SeaBIOS spends ~0.25 s before
    # handing over to the PVH option ROM).
    "-bios", str(QBOOT_FIRMWARE),
)
