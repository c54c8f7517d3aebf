"""Kernel uAPI numbers the guest side reads or checks, with the header each comes from.

The probe (C) carries its own copy of the ones it uses, for the same reason: a static
guest binary must not depend on the build host's kernel headers.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BUS_ADRERR",
    "BUS_MCEERR_AO",
    "BUS_MCEERR_AR",
    "KPF_HUGE",
    "KPF_HWPOISON",
    "KPF_THP",
    "PAGEMAP_PFN_MASK",
    "PAGEMAP_PRESENT",
    "PR_MCE_KILL_EARLY",
    "PR_MCE_KILL_LATE",
    "SI_USER",
    "SYS_CLOCK_NANOSLEEP",
    "SYS_NANOSLEEP",
]

# include/uapi/linux/kernel-page-flags.h (bit numbers in /proc/kpageflags)
KPF_HUGE: Final = 17
KPF_HWPOISON: Final = 19
KPF_THP: Final = 22

# Documentation/admin-guide/mm/pagemap.rst (/proc/PID/pagemap entries)
PAGEMAP_PRESENT: Final = 1 << 63
PAGEMAP_PFN_MASK: Final = (1 << 55) - 1

# include/uapi/asm-generic/siginfo.h (si_code of SIGBUS)
SI_USER: Final = 0
BUS_ADRERR: Final = 2
BUS_MCEERR_AR: Final = 4
BUS_MCEERR_AO: Final = 5

# include/uapi/linux/prctl.h (PR_MCE_KILL arguments, as PR_MCE_KILL_GET returns them)
PR_MCE_KILL_LATE: Final = 0
PR_MCE_KILL_EARLY: Final = 1

# arch/x86/entry/syscalls/syscall_64.tbl (first field of /proc/PID/syscall while blocked);
# glibc's nanosleep() issues clock_nanosleep.
SYS_NANOSLEEP: Final = 35
SYS_CLOCK_NANOSLEEP: Final = 230
