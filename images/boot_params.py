"""Kernel command line and QEMU arguments for a fast boot of the default image under TCG.

Data only: ``guests.profiles`` composes them into the guest profiles. Every saving
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

__all__ = ["DEFAULT_KERNEL_ARGS", "FAST_QEMU_ARGS"]

DEFAULT_KERNEL_ARGS: tuple[str, ...] = (
    "console=ttyS0",  # contract: the console (and GMEMTEST-READY) is the first serial port
    "panic=0",  # contract: stay in the panic so its text and GUEST_PANICKED can be read
    "hugepages=16",  # 16 x 2 MiB pages reserved at boot for the hugetlb scenarios
    "transparent_hugepage=madvise",  # THP only where the probe asks for it (MADV_HUGEPAGE)
    # Console printing is slow under TCG. quiet (loglevel 4) keeps errors and panics on
    # the serial log; dmesg in the guest still has everything. Together with the
    # following items: 2.45 s -> 2.15 s.
    "quiet",
    "tsc=reliable",  # no clocksource watchdog / TSC refinement work at boot
    "no_timer_check",  # skips the IO-APIC timer check (a timed loop under TCG)
    "mitigations=off",  # no speculation-mitigation patching at boot: ~0.17 s alone
    "8250.nr_uarts=1",  # probe one UART instead of four
    "rcupdate.rcu_expedited=1",  # expedited grace periods during boot
    "cryptomgr.notests",  # skip the crypto self-tests
    "random.trust_cpu=on",  # crng ready at once (RDRAND of -cpu max)
)

# For images.measure_boot's bare command line only: the guest profiles carry the same choices
# themselves (machine q35, firmware qboot), so a launched guest never gets them twice.
FAST_QEMU_ARGS: tuple[str, ...] = (
    # q35 booted 0.15 s faster than pc with the same kernel and firmware.
    "-machine", "q35",
    # qboot instead of SeaBIOS: 2.15 s -> 1.93 s (SeaBIOS spends ~0.25 s before
    # handing over to the PVH option ROM).
    "-bios", str(QBOOT_FIRMWARE),
)
