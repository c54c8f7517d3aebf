"""Memory-management, signal, ptrace and syscall uAPI numbers, host side and guest side.

One place for every kernel number the pagemap reader, the injectors, the SIGBUS witness and
the scenario runner (reading the guest's /proc) use, each block naming the header (or
documented file format) it is copied from, so a lab engineer can check it against the kernel
under test; the in-guest probe (C, static) carries its own copies of the few it needs.
Python's ``mmap``/``signal``/``os`` modules lack most of these (``MADV_HWPOISON``,
``BUS_MCEERR_AR``, ptrace, ``__WALL``).

All values are for x86_64 Linux.
"""

from __future__ import annotations

from typing import Final

# --- include/uapi/asm-generic/mman-common.h + include/uapi/asm-generic/mman.h ----------------
PROT_NONE: Final = 0x0
PROT_READ: Final = 0x1
PROT_WRITE: Final = 0x2
PROT_EXEC: Final = 0x4

MAP_SHARED: Final = 0x01
MAP_PRIVATE: Final = 0x02
MAP_FIXED: Final = 0x10
MAP_ANONYMOUS: Final = 0x20
MAP_NORESERVE: Final = 0x4000  # asm-generic/mman.h
MAP_POPULATE: Final = 0x8000
MAP_HUGETLB: Final = 0x40000

MADV_NORMAL: Final = 0
MADV_DONTNEED: Final = 4
MADV_REMOVE: Final = 9
MADV_POPULATE_READ: Final = 22
MADV_POPULATE_WRITE: Final = 23
MADV_HWPOISON: Final = 100  # needs CAP_SYS_ADMIN and CONFIG_MEMORY_FAILURE
MADV_SOFT_OFFLINE: Final = 101

# --- include/uapi/linux/prctl.h: machine-check kill policy of the calling process -----------
PR_MCE_KILL: Final = 33
PR_MCE_KILL_GET: Final = 34
PR_MCE_KILL_CLEAR: Final = 0
PR_MCE_KILL_SET: Final = 1
PR_MCE_KILL_LATE: Final = 0
PR_MCE_KILL_EARLY: Final = 1
PR_MCE_KILL_DEFAULT: Final = 2

# --- arch/x86/include/uapi/asm/signal.h -------------------------------------------------------
SIGBUS: Final = 7
SIGSEGV: Final = 11
SIGTRAP: Final = 5
SIGSTOP: Final = 19
SIGTSTP: Final = 20
SIGTTIN: Final = 21
SIGTTOU: Final = 22
SA_SIGINFO: Final = 0x00000004
SA_ONSTACK: Final = 0x08000000
SA_RESTART: Final = 0x10000000
SA_NODEFER: Final = 0x40000000
SA_RESETHAND: Final = 0x80000000

# --- include/uapi/asm-generic/siginfo.h: si_code values ---------------------------------------
SI_USER: Final = 0
SI_KERNEL: Final = 0x80
SI_QUEUE: Final = -1
SI_TKILL: Final = -6
BUS_ADRALN: Final = 1  # invalid address alignment
BUS_ADRERR: Final = 2  # non-existent physical address (e.g. beyond the end of a file)
BUS_OBJERR: Final = 3  # object-specific hardware error
BUS_MCEERR_AR: Final = 4  # hardware memory error consumed: action required
BUS_MCEERR_AO: Final = 5  # hardware memory error detected, not consumed: action optional
BUS_CODE_NAMES: Final[dict[int, str]] = {
    BUS_ADRALN: "BUS_ADRALN",
    BUS_ADRERR: "BUS_ADRERR",
    BUS_OBJERR: "BUS_OBJERR",
    BUS_MCEERR_AR: "BUS_MCEERR_AR",
    BUS_MCEERR_AO: "BUS_MCEERR_AO",
    SI_USER: "SI_USER",
    SI_KERNEL: "SI_KERNEL",
    SI_QUEUE: "SI_QUEUE",
    SI_TKILL: "SI_TKILL",
}

# x86_64 layout of siginfo_t (include/uapi/asm-generic/siginfo.h, 64-bit pointers):
# int si_signo; int si_errno; int si_code; (pad to 16); union _sifields at 16.
# For SIGBUS/SIGSEGV: void *si_addr at 16, then the union holding short si_addr_lsb at 24.
SIGINFO_SIZE: Final = 128
SIGINFO_SIGNO_OFFSET: Final = 0
SIGINFO_ERRNO_OFFSET: Final = 4
SIGINFO_CODE_OFFSET: Final = 8
SIGINFO_PID_OFFSET: Final = 16  # kill()-style signals: si_pid, then si_uid
SIGINFO_ADDR_OFFSET: Final = 16
SIGINFO_ADDR_LSB_OFFSET: Final = 24

# --- include/uapi/linux/ptrace.h ---------------------------------------------------------------
PTRACE_CONT: Final = 7
PTRACE_KILL: Final = 8
PTRACE_DETACH: Final = 17
PTRACE_SETOPTIONS: Final = 0x4200
PTRACE_GETEVENTMSG: Final = 0x4201
PTRACE_GETSIGINFO: Final = 0x4202
PTRACE_SETSIGINFO: Final = 0x4203
PTRACE_SEIZE: Final = 0x4206
PTRACE_INTERRUPT: Final = 0x4207
PTRACE_LISTEN: Final = 0x4208

PTRACE_O_TRACESYSGOOD: Final = 1
PTRACE_O_TRACEFORK: Final = 1 << 1
PTRACE_O_TRACEVFORK: Final = 1 << 2
PTRACE_O_TRACECLONE: Final = 1 << 3
PTRACE_O_TRACEEXEC: Final = 1 << 4
PTRACE_O_TRACEVFORKDONE: Final = 1 << 5
PTRACE_O_TRACEEXIT: Final = 1 << 6
PTRACE_O_EXITKILL: Final = 1 << 20

PTRACE_EVENT_FORK: Final = 1
PTRACE_EVENT_VFORK: Final = 2
PTRACE_EVENT_CLONE: Final = 3
PTRACE_EVENT_EXEC: Final = 4
PTRACE_EVENT_VFORK_DONE: Final = 5
PTRACE_EVENT_EXIT: Final = 6
PTRACE_EVENT_STOP: Final = 128

# --- include/uapi/linux/wait.h -----------------------------------------------------------------
WNOHANG: Final = 0x00000001
WSTOPPED: Final = 0x00000002
WEXITED: Final = 0x00000004
WNOWAIT: Final = 0x01000000
WNOTHREAD: Final = 0x20000000  # __WNOTHREAD
WALL: Final = 0x40000000  # __WALL: wait for every child/tracee, threads included
P_PID: Final = 1

# --- arch/x86/entry/syscalls/syscall_64.tbl ----------------------------------------------------
# The first field of /proc/PID/syscall while a task is blocked in a syscall; glibc's nanosleep()
# issues clock_nanosleep.
SYS_NANOSLEEP: Final = 35
SYS_CLOCK_NANOSLEEP: Final = 230
SYS_DELETE_MODULE: Final = 176  # delete_module(name, flags)
SYS_FINIT_MODULE: Final = 313  # finit_module(fd, param_values, flags)
O_NONBLOCK: Final = 0o4000  # delete_module: fail with EWOULDBLOCK instead of waiting for users to go

# --- include/uapi/linux/capability.h ------------------------------------------------------------
CAP_SYS_ADMIN: Final = 21

# --- /proc/PID/pagemap: Documentation/admin-guide/mm/pagemap.rst, fs/proc/task_mmu.c -----------
PAGEMAP_ENTRY_SIZE: Final = 8
PM_PFN_BITS: Final = 55
PM_PFN_MASK: Final = (1 << PM_PFN_BITS) - 1  # bits 0-54 (zero without CAP_SYS_ADMIN)
PM_SWAP_TYPE_MASK: Final = 0x1F  # bits 0-4 when swapped
PM_SWAP_OFFSET_SHIFT: Final = 5  # bits 5-54 when swapped
PM_SOFT_DIRTY: Final = 1 << 55
PM_MMAP_EXCLUSIVE: Final = 1 << 56
PM_UFFD_WP: Final = 1 << 57
PM_GUARD_REGION: Final = 1 << 58
PM_FILE: Final = 1 << 61  # file page or shared anonymous
PM_SWAP: Final = 1 << 62
PM_PRESENT: Final = 1 << 63

# --- /proc/kpageflags: include/uapi/linux/kernel-page-flags.h (bits 0-26) ----------------------
KPF_LOCKED: Final = 0
KPF_ERROR: Final = 1
KPF_REFERENCED: Final = 2
KPF_UPTODATE: Final = 3
KPF_DIRTY: Final = 4
KPF_LRU: Final = 5
KPF_ACTIVE: Final = 6
KPF_SLAB: Final = 7
KPF_WRITEBACK: Final = 8
KPF_RECLAIM: Final = 9
KPF_BUDDY: Final = 10
KPF_MMAP: Final = 11
KPF_ANON: Final = 12
KPF_SWAPCACHE: Final = 13
KPF_SWAPBACKED: Final = 14
KPF_COMPOUND_HEAD: Final = 15
KPF_COMPOUND_TAIL: Final = 16
KPF_HUGE: Final = 17
KPF_UNEVICTABLE: Final = 18
KPF_HWPOISON: Final = 19
KPF_NOPAGE: Final = 20
KPF_KSM: Final = 21
KPF_THP: Final = 22
KPF_OFFLINE: Final = 23
KPF_ZERO_PAGE: Final = 24
KPF_IDLE: Final = 25
KPF_PGTABLE: Final = 26
# kernel-internal bits exported by /proc/kpageflags: include/linux/kernel-page-flags.h
KPF_RESERVED: Final = 32
KPF_MLOCKED: Final = 33
KPF_MAPPEDTODISK: Final = 34
KPF_PRIVATE: Final = 35
KPF_PRIVATE_2: Final = 36
KPF_OWNER_PRIVATE: Final = 37
KPF_ARCH: Final = 38
KPF_UNCACHED: Final = 39
KPF_SOFTDIRTY: Final = 40
KPF_ARCH_2: Final = 41
KPF_NAMES: Final[dict[int, str]] = {
    KPF_LOCKED: "locked",
    KPF_ERROR: "error",
    KPF_REFERENCED: "referenced",
    KPF_UPTODATE: "uptodate",
    KPF_DIRTY: "dirty",
    KPF_LRU: "lru",
    KPF_ACTIVE: "active",
    KPF_SLAB: "slab",
    KPF_WRITEBACK: "writeback",
    KPF_RECLAIM: "reclaim",
    KPF_BUDDY: "buddy",
    KPF_MMAP: "mmap",
    KPF_ANON: "anon",
    KPF_SWAPCACHE: "swapcache",
    KPF_SWAPBACKED: "swapbacked",
    KPF_COMPOUND_HEAD: "compound_head",
    KPF_COMPOUND_TAIL: "compound_tail",
    KPF_HUGE: "huge",
    KPF_UNEVICTABLE: "unevictable",
    KPF_HWPOISON: "hwpoison",
    KPF_NOPAGE: "nopage",
    KPF_KSM: "ksm",
    KPF_THP: "thp",
    KPF_OFFLINE: "offline",
    KPF_ZERO_PAGE: "zero_page",
    KPF_IDLE: "idle",
    KPF_PGTABLE: "pgtable",
    KPF_RESERVED: "reserved",
    KPF_MLOCKED: "mlocked",
    KPF_MAPPEDTODISK: "mappedtodisk",
    KPF_PRIVATE: "private",
    KPF_PRIVATE_2: "private_2",
    KPF_OWNER_PRIVATE: "owner_private",
    KPF_ARCH: "arch",
    KPF_UNCACHED: "uncached",
    KPF_SOFTDIRTY: "softdirty",
    KPF_ARCH_2: "arch_2",
}

# --- fs/proc/meminfo.c (CONFIG_MEMORY_FAILURE) -------------------------------------------------
MEMINFO_HARDWARE_CORRUPTED: Final = "HardwareCorrupted"

# --- file-system paths of the injection and tracing interfaces ---------------------------------
# mm/hwpoison-inject.c (CONFIG_HWPOISON_INJECT), under debugfs
HWPOISON_CORRUPT_PFN: Final = "hwpoison/corrupt-pfn"
HWPOISON_UNPOISON_PFN: Final = "hwpoison/unpoison-pfn"
# drivers/acpi/apei/einj-core.c, under debugfs
EINJ_DIR: Final = "apei/einj"
EINJ_TYPE_MEM_UNCORRECTABLE_NONFATAL: Final = 0x10  # ACPI 6.x EINJ error type bit 4
EINJ_FLAG_PHYS_ADDR_VALID: Final = 0x2  # "flags" file: SETWA_FLAGS_MEM (param1/param2 valid)
# kernel/trace/trace_kprobe.c and trace_uprobe.c, under tracefs
TRACEFS_KPROBE_EVENTS: Final = "kprobe_events"
TRACEFS_UPROBE_EVENTS: Final = "uprobe_events"
