"""Table-driven guest_memfd uAPI cases, in the manner of the kernel's ``guest_memfd_test.c``.

Each ``UapiCase`` does its own set-up in a fresh VM, performs exactly one operation under test
and expects one errno (0: must succeed). ``contract`` says what the expectation rests on:

- ``kernel``: the upstream kernel's code/documentation gives this errno (the source is named in
  ``basis``); a host returning anything else deviates from upstream.
- ``host``: upstream leaves the answer to configuration (e.g. an ioctl that exists only with a
  capability); the case asserts what hosts of this machine's kind answer and ``basis`` says why.

Errnos are not fixed across kernels: the same misuse has been answered differently by
different releases. ``kernels`` says where the expected errno is known to hold, and
``alternatives`` lists errnos *documented* (measured or read in a named source) for other
kernels. A documented alternative passes and carries a ``Finding`` naming both errnos and both
kernel sets, so a qualification report shows the difference instead of hiding it. Any other
errno fails.

Every case, and the whole table (``run_table``), is an ``outcome.Verdict``. Set-up failures are
failures of the case ("setup failed"), never a pass; a case that needs what the host's VM lacks
is CANNOT RUN with the reason, listed in the table's evidence.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from host_stack import kvm_uapi as u
from host_stack.kvm import PAGE_SIZE, GuestMemfd, HostMapping, KvmSystem, Memslot, Vm
from outcome import Check, Finding, Verdict

__all__ = [
    "CASES",
    "HOST_REQUIREMENTS",
    "TABLE_NAME",
    "CaseEnv",
    "KnownErrno",
    "Outcome",
    "UapiCase",
    "case_by_id",
    "judge_outcome",
    "run_case",
    "run_table",
]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

P: Final = PAGE_SIZE
GMEM_SIZE: Final = 16 * P
# The whole table needs guest_memfd: a host without it cannot run a single case. The decision rests
# on the capability, never on a case's errno (a host that claims it and answers ENOTTY fails).
HOST_REQUIREMENTS: Final = ("kvm", "guest_memfd")
TABLE_NAME: Final = "guest_memfd uAPI cases"
MMAP_SHARED_FLAGS: Final = u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED
SLOT_GPA: Final = 0x100000
OTHER_GPA: Final = 0x200000

ErrnoSource = Literal["kernel", "host"]
# Where a case's primary errno was measured, unless the case says otherwise.
ALL_KERNELS: Final = "every kernel with guest_memfd seen so far (6.18 PVM, 7.3.4)"
KERNEL_7_3_4: Final = "7.3.4 (Debian trixie-backports, measured in the lab host's L1)"
KERNEL_6_18_PVM: Final = "6.18 (the PVM KVM of this project's development machines)"


@dataclass(frozen=True)
class KnownErrno:
    """An errno the case is documented to give on other kernels than its primary one."""

    errno: int
    kernels: str
    basis: str


@dataclass
class Outcome:
    """What the operation under test returned (0 or errno) plus any extra checks that failed."""

    errno: int
    problems: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


class CaseEnv:
    """Per-case resources: /dev/kvm, one VM, and an exit stack that closes everything."""

    def __init__(self, system: KvmSystem, stack: contextlib.ExitStack) -> None:
        self.system = system
        self.stack = stack
        self.vm: Vm = stack.enter_context(system.create_vm(u.KVM_X86_DEFAULT_VM))

    def gmem(self, flags: int = 0, size: int = GMEM_SIZE, vm: Vm | None = None) -> GuestMemfd:
        return self.stack.enter_context((vm or self.vm).create_guest_memfd(size, flags))

    def anon(self, length: int = GMEM_SIZE) -> HostMapping:
        return self.stack.enter_context(HostMapping.anonymous(length, "case buffer"))

    def other_vm(self) -> Vm:
        return self.stack.enter_context(self.system.create_vm(u.KVM_X86_DEFAULT_VM))

    def gmem_flags_supported(self) -> int:
        return self.vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS)


def attempt(fn: Callable[[], object]) -> int:
    """Run the operation under test; 0 on success, else its errno."""
    try:
        result = fn()
        if isinstance(result, contextlib.AbstractContextManager):
            result.__exit__(None, None, None)
    except OSError as exc:
        return exc.errno or -1
    return 0


@dataclass(frozen=True)
class UapiCase:
    """One row of the table."""

    id: str
    description: str
    expected_errno: int
    contract: ErrnoSource
    basis: str
    action: Callable[[CaseEnv], Outcome]
    requires_flags: int = 0  # guest_memfd creation flags the case needs from the host
    applies: Callable[[CaseEnv], str | None] | None = None  # reason the case does not apply
    kernels: str = ALL_KERNELS  # where ``expected_errno`` is known to be the answer
    alternatives: tuple[KnownErrno, ...] = ()  # documented answers of other kernels

    @property
    def expected_name(self) -> str:
        return "success" if self.expected_errno == 0 else errno.errorcode[self.expected_errno]


def _name(err: int | None) -> str:
    if err is None:
        return "nothing"
    if err == 0:
        return "success"
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def run_case(case: UapiCase, system: KvmSystem | None = None) -> Verdict:
    """Run one case in a fresh VM; every fd and mapping is closed before returning.

    PASS or FAIL with the errno check; CANNOT RUN when the case needs what this host's VM
    lacks (creation flags, an ioctl); a documented errno of another kernel passes with a finding.
    """
    with contextlib.ExitStack() as stack:
        if system is None:
            system = stack.enter_context(KvmSystem())
        try:
            env = CaseEnv(system, stack)
            flags = env.gmem_flags_supported() if case.requires_flags else 0
            if case.requires_flags and flags & case.requires_flags != case.requires_flags:
                reason = f"needs guest_memfd flags {case.requires_flags:#x}, KVM_CAP_GUEST_MEMFD_FLAGS={flags:#x}"
                return Verdict.did_not_run(case.id, "CANNOT RUN", reason)
            reason_na = case.applies(env) if case.applies else None
            if reason_na is not None:
                return Verdict.did_not_run(case.id, "CANNOT RUN", reason_na)
            outcome = case.action(env)
        except OSError as exc:
            check = Check(_check_name(case), _expected(case), f"setup failed before the operation under test: {exc}",
                          False)
            return Verdict(case.id, (check,))
    return judge_outcome(case, outcome)


def run_table(system: KvmSystem | None = None) -> Verdict:
    """Every case as one verdict: a check per case that ran, the cases that cannot run here
    listed in its evidence, documented errnos of other kernels as findings."""
    with contextlib.ExitStack() as stack:
        if system is None:
            system = stack.enter_context(KvmSystem())
        parts = [run_case(case, system) for case in CASES]
    return Verdict.combine(TABLE_NAME, parts)


def _check_name(case: UapiCase) -> str:
    return f"{case.description} [{case.contract}]"


def _expected(case: UapiCase) -> str:
    return f"{_name(case.expected_errno)} (known on {case.kernels})"


def judge_outcome(case: UapiCase, outcome: Outcome) -> Verdict:
    """Pure: the expected errno passes; a documented alternative passes with a finding naming both
    kernels; any other errno, or a failed extra check, fails."""
    alternative = next((a for a in case.alternatives if a.errno == outcome.errno), None)
    documented = "".join(f"; {_name(a.errno)} is documented on {a.kernels}" for a in case.alternatives)
    actual = _name(outcome.errno)
    if alternative is not None:
        actual += f", the documented answer of {alternative.kernels} ({alternative.basis})"
    elif outcome.errno != case.expected_errno:
        actual += documented
    checks = [Check(_check_name(case), _expected(case), actual,
                    outcome.errno == case.expected_errno or alternative is not None)]
    checks += [Check(f"{_check_name(case)}: {problem.split(':', 1)[0]}", "as the case requires", problem, False)
               for problem in outcome.problems]
    evidence = {"contract": case.contract, "expected_errno": case.expected_errno, "actual_errno": outcome.errno,
                **({"detail": outcome.detail} if outcome.detail else {})}
    if alternative is None:
        return Verdict(case.id, tuple(checks), evidence=evidence)
    finding = Finding(
        id=f"uapi-errno-{case.id}",
        severity="divergence",
        text=(f"{case.id} ({case.description}): expected {_expected(case)}, got {_name(outcome.errno)}, "
              f"the documented answer of {alternative.kernels} ({alternative.basis})"),
        evidence={
            "case": case.id,
            "expected_errno": errno.errorcode.get(case.expected_errno, case.expected_errno),
            "expected_on": case.kernels,
            "actual_errno": errno.errorcode.get(outcome.errno, outcome.errno),
            "documented_on": alternative.kernels,
            "basis": alternative.basis,
            "kernel_release": os.uname().release,
        },
    )
    return Verdict(case.id, tuple(checks), findings=(finding,), evidence=evidence)


# --- actions ----------------------------------------------------------------------------------
def _create(size: int, flags: int = 0) -> Callable[[CaseEnv], Outcome]:
    return lambda env: Outcome(attempt(lambda: env.vm.create_guest_memfd(size, flags)))


def _unsupported_flags(env: CaseEnv) -> Outcome:
    """Every flag bit the host does not advertise must be refused with EINVAL."""
    supported = env.gmem_flags_supported()
    seen: dict[int, int] = {}
    for bit in range(64):
        if supported & (1 << bit):
            continue
        seen[bit] = attempt(lambda bit=bit: env.vm.create_guest_memfd(P, 1 << bit))  # type: ignore[misc]
    odd = {b: e for b, e in seen.items() if e != errno.EINVAL}
    first = next(iter(odd.values())) if odd else errno.EINVAL
    problems = [f"flag bit {b}: expected EINVAL, got {_name(e)}" for b, e in odd.items()]
    return Outcome(first, problems, {"supported": supported, "bits_tried": sorted(seen)})


def _supported_flags(env: CaseEnv) -> Outcome:
    supported = env.gmem_flags_supported()
    bits = [1 << b for b in range(64) if supported & (1 << b)]
    errs = {f: attempt(lambda f=f: env.vm.create_guest_memfd(P, f)) for f in bits}  # type: ignore[misc]
    errs[supported] = attempt(lambda: env.vm.create_guest_memfd(P, supported))
    bad = {f: e for f, e in errs.items() if e}
    problems = [f"flags {f:#x}: expected success, got {_name(e)}" for f, e in bad.items()]
    return Outcome(next(iter(bad.values())) if bad else 0, problems, {"supported": supported})


def _fallocate(mode: int, offset: int, length: int) -> Callable[[CaseEnv], Outcome]:
    def action(env: CaseEnv) -> Outcome:
        gmem = env.gmem()
        return Outcome(attempt(lambda: gmem.fallocate(mode, offset, length)))

    return action


def _file_op(op: Literal["read", "write", "ftruncate"]) -> Callable[[CaseEnv], Outcome]:
    def action(env: CaseEnv) -> Outcome:
        fd = env.gmem().fd
        if op == "read":
            return Outcome(attempt(lambda: os.read(fd, 64)))
        if op == "write":
            return Outcome(attempt(lambda: os.write(fd, b"x" * 64)))
        return Outcome(attempt(lambda: os.ftruncate(fd, 2 * GMEM_SIZE)))

    return action


def _mmap(flags: int, shared: bool) -> Callable[[CaseEnv], Outcome]:
    def action(env: CaseEnv) -> Outcome:
        gmem = env.gmem(flags)
        return Outcome(attempt(lambda: gmem.mmap(P, 0, shared=shared)))

    return action


def _mmap_read_write(env: CaseEnv) -> Outcome:
    gmem = env.gmem(MMAP_SHARED_FLAGS)
    mapping = env.stack.enter_context(gmem.mmap())
    mapping.write_u64(3 * P + 8, 0x1122334455667788)
    got = mapping.read_u64(3 * P + 8)
    problems = [] if got == 0x1122334455667788 else [f"read back {got:#x}, wrote 0x1122..88"]
    return Outcome(0, problems)


def _punch_under_live_mapping(env: CaseEnv) -> Outcome:
    """Punch one page while it is mapped: it reads as zero, its neighbours keep their data."""
    gmem = env.gmem(MMAP_SHARED_FLAGS)
    mapping = env.stack.enter_context(gmem.mmap())
    for page in range(GMEM_SIZE // P):
        mapping.write_u64(page * P, 0xA5A5_0000 + page)
    err = attempt(lambda: gmem.punch_hole(5 * P, P))
    problems = []
    for page in range(GMEM_SIZE // P):
        got = mapping.read_u64(page * P)
        want = 0 if page == 5 else 0xA5A5_0000 + page
        if got != want:
            problems.append(f"page {page}: expected {want:#x} after punching page 5, got {got:#x}")
    return Outcome(err, problems)


def _bind(env: CaseEnv, slot: int, gpa: int, gmem: GuestMemfd, offset: int, *, npages: int = 4) -> Memslot:
    hva = env.anon(npages * P).addr
    return env.stack.enter_context(env.vm.add_memslot(slot, gpa, npages * P, hva, gmem=gmem, guest_memfd_offset=offset))


def _bind_ok(env: CaseEnv) -> Outcome:
    gmem = env.gmem()
    return Outcome(attempt(lambda: _bind(env, 1, SLOT_GPA, gmem, 4 * P)))


def _bind_twice(second_offset: int) -> Callable[[CaseEnv], Outcome]:
    def action(env: CaseEnv) -> Outcome:
        gmem = env.gmem()
        _bind(env, 1, SLOT_GPA, gmem, 4 * P)
        return Outcome(attempt(lambda: _bind(env, 2, OTHER_GPA, gmem, second_offset)))

    return action


def _bind_other_vm(env: CaseEnv) -> Outcome:
    foreign = env.gmem(vm=env.other_vm())
    return Outcome(attempt(lambda: _bind(env, 1, SLOT_GPA, foreign, 0)))


def _bind_offset(offset: int) -> Callable[[CaseEnv], Outcome]:
    def action(env: CaseEnv) -> Outcome:
        gmem = env.gmem()
        return Outcome(attempt(lambda: _bind(env, 1, SLOT_GPA, gmem, offset)))

    return action


def _bind_not_gmem(env: CaseEnv) -> Outcome:
    hva = env.anon(4 * P).addr
    return Outcome(
        attempt(
            lambda: env.vm.set_user_memory_region2(
                1,
                flags=u.KVM_MEM_GUEST_MEMFD,
                guest_phys_addr=SLOT_GPA,
                memory_size=4 * P,
                userspace_addr=hva,
                guest_memfd=env.system.fd,
            )
        )
    )


def _change_bound(flags: int, gpa: int, keep_gmem: bool = True) -> Callable[[CaseEnv], Outcome]:
    def action(env: CaseEnv) -> Outcome:
        gmem = env.gmem()
        slot = _bind(env, 1, SLOT_GPA, gmem, 4 * P)
        return Outcome(
            attempt(
                lambda: env.vm.set_user_memory_region2(
                    1,
                    flags=flags,
                    guest_phys_addr=gpa,
                    memory_size=slot.memory_size,
                    userspace_addr=slot.userspace_addr,
                    guest_memfd=gmem.fd if keep_gmem else 0,
                    guest_memfd_offset=4 * P if keep_gmem else 0,
                )
            )
        )

    return action


def _overlapping_gpa(env: CaseEnv) -> Outcome:
    gmem = env.gmem()
    _bind(env, 1, SLOT_GPA, gmem, 0)
    return Outcome(attempt(lambda: _bind(env, 2, SLOT_GPA + 2 * P, gmem, 8 * P)))


def _rebind_after_delete(env: CaseEnv) -> Outcome:
    gmem = env.gmem()
    slot = _bind(env, 1, SLOT_GPA, gmem, 4 * P)
    slot.close()
    return Outcome(attempt(lambda: _bind(env, 2, OTHER_GPA, gmem, 4 * P)))


def _set_private(env: CaseEnv) -> Outcome:
    return Outcome(attempt(lambda: env.vm.set_memory_attributes(SLOT_GPA, P, u.KVM_MEMORY_ATTRIBUTE_PRIVATE)))


def _attributes_absent(env: CaseEnv) -> str | None:
    cap = env.vm.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES)
    return None if cap == 0 else f"KVM_CAP_MEMORY_ATTRIBUTES={cap:#x}: attributes are offered"


_GMEM_C: Final = "virt/kvm/guest_memfd.c"
_MAIN_C: Final = "virt/kvm/kvm_main.c"
EINVAL: Final = errno.EINVAL
EOPNOTSUPP: Final = errno.EOPNOTSUPP
_BOUND_EINVAL: Final = KnownErrno(
    EINVAL, KERNEL_6_18_PVM,
    f"{_GMEM_C} kvm_gmem_bind there fails a range already bound with -EINVAL (measured)",
)  # fmt: skip

CASES: Final[tuple[UapiCase, ...]] = (
    # creation
    UapiCase("create.ok", "16-page guest_memfd, no flags", 0, "kernel",
             f"{_GMEM_C} kvm_gmem_create", _create(GMEM_SIZE)),
    UapiCase("create.size_unaligned", "size not a page multiple", EINVAL, "kernel",
             f"{_GMEM_C}: size must be PAGE_ALIGNED", _create(P + 1)),
    UapiCase("create.size_zero", "size 0", EINVAL, "kernel",
             f"{_GMEM_C}: size must be > 0", _create(0)),
    UapiCase("create.size_negative", "size with bit 63 set (negative loff_t)", EINVAL, "kernel",
             f"{_GMEM_C}: loff_t size <= 0 rejected", _create((1 << 64) - P)),
    UapiCase("create.flags_unsupported", "every flag bit not in KVM_CAP_GUEST_MEMFD_FLAGS",
             EINVAL, "kernel", f"{_GMEM_C}: flags outside the supported mask",
             _unsupported_flags),
    UapiCase("create.flags_supported", "each advertised flag and all of them together", 0,
             "kernel", "Documentation/virt/kvm/api.rst KVM_CAP_GUEST_MEMFD_FLAGS",
             _supported_flags, requires_flags=u.GUEST_MEMFD_FLAG_MMAP),
    # fallocate
    UapiCase("fallocate.mode0", "mode 0 (allocate and extend)", EOPNOTSUPP, "kernel",
             f"{_GMEM_C} kvm_gmem_fallocate: KEEP_SIZE required", _fallocate(0, 0, P)),
    UapiCase("fallocate.keep_size", "KEEP_SIZE (allocate)", 0, "kernel",
             f"{_GMEM_C} kvm_gmem_allocate", _fallocate(u.FALLOC_FL_KEEP_SIZE, 0, 4 * P)),
    UapiCase("fallocate.punch_hole", "PUNCH_HOLE|KEEP_SIZE", 0, "kernel",
             f"{_GMEM_C} kvm_gmem_punch_hole",
             _fallocate(u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, 0, 4 * P)),
    UapiCase("fallocate.punch_no_keep", "PUNCH_HOLE without KEEP_SIZE", EOPNOTSUPP, "kernel",
             "fs/open.c vfs_fallocate: punch requires KEEP_SIZE",
             _fallocate(u.FALLOC_FL_PUNCH_HOLE, 0, P)),
    UapiCase("fallocate.zero_range", "ZERO_RANGE", EOPNOTSUPP, "kernel",
             f"{_GMEM_C}: only KEEP_SIZE|PUNCH_HOLE accepted",
             _fallocate(u.FALLOC_FL_ZERO_RANGE | u.FALLOC_FL_KEEP_SIZE, 0, P)),
    UapiCase("fallocate.collapse", "COLLAPSE_RANGE", EOPNOTSUPP, "kernel",
             f"{_GMEM_C}: only KEEP_SIZE|PUNCH_HOLE accepted",
             _fallocate(u.FALLOC_FL_COLLAPSE_RANGE, 0, P)),
    UapiCase("fallocate.insert", "INSERT_RANGE", EOPNOTSUPP, "kernel",
             f"{_GMEM_C}: only KEEP_SIZE|PUNCH_HOLE accepted",
             _fallocate(u.FALLOC_FL_INSERT_RANGE, 0, P)),
    UapiCase("fallocate.offset_unaligned", "punch at offset 1", EINVAL, "kernel",
             f"{_GMEM_C}: offset must be PAGE_ALIGNED",
             _fallocate(u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, 1, P)),
    UapiCase("fallocate.len_unaligned", "punch of P+1 bytes", EINVAL, "kernel",
             f"{_GMEM_C}: len must be PAGE_ALIGNED",
             _fallocate(u.FALLOC_FL_PUNCH_HOLE | u.FALLOC_FL_KEEP_SIZE, 0, P + 1)),
    UapiCase("fallocate.beyond_size", "allocate at the file's size", EINVAL, "kernel",
             "fs/open.c vfs_fallocate + i_size checks",
             _fallocate(u.FALLOC_FL_KEEP_SIZE, GMEM_SIZE, P)),
    # plain file I/O
    UapiCase("io.read", "read(2)", EINVAL, "kernel", "guest_memfd has no read_iter",
             _file_op("read")),
    UapiCase("io.write", "write(2)", EINVAL, "kernel", "guest_memfd has no write_iter",
             _file_op("write")),
    UapiCase("io.ftruncate", "ftruncate(2) to grow", EINVAL, "kernel",
             f"{_GMEM_C} kvm_gmem_setattr", _file_op("ftruncate")),
    # mmap
    UapiCase("mmap.without_flag", "mmap of a guest_memfd created without MMAP", errno.ENODEV,
             "kernel", f"{_GMEM_C} kvm_gmem_mmap", _mmap(0, shared=True)),
    UapiCase("mmap.private", "MAP_PRIVATE of an MMAP guest_memfd", EINVAL, "kernel",
             f"{_GMEM_C} kvm_gmem_mmap: shared mappings only",
             _mmap(MMAP_SHARED_FLAGS, shared=False), requires_flags=MMAP_SHARED_FLAGS),
    UapiCase("mmap.shared_rw", "MAP_SHARED of MMAP|INIT_SHARED, write then read", 0, "kernel",
             f"{_GMEM_C} kvm_gmem_fault_user_mapping", _mmap_read_write,
             requires_flags=MMAP_SHARED_FLAGS),
    UapiCase("mmap.punch_live", "punch one page under a live mapping", 0, "kernel",
             f"{_GMEM_C} kvm_gmem_punch_hole zaps the mapping; refault reads zero",
             _punch_under_live_mapping, requires_flags=MMAP_SHARED_FLAGS),
    # binding
    UapiCase("bind.ok", "bind pages 4-7 to a slot", 0, "kernel", f"{_GMEM_C} kvm_gmem_bind",
             _bind_ok),
    UapiCase("bind.same_range_twice", "same file range to a second slot", errno.EEXIST, "kernel",
             f"{_GMEM_C} kvm_gmem_bind: range already bound", _bind_twice(4 * P),
             kernels=KERNEL_7_3_4, alternatives=(_BOUND_EINVAL,)),
    UapiCase("bind.partial_overlap", "overlapping file range to a second slot", errno.EEXIST,
             "kernel", f"{_GMEM_C} kvm_gmem_bind: range already bound", _bind_twice(6 * P),
             kernels=KERNEL_7_3_4, alternatives=(_BOUND_EINVAL,)),
    UapiCase("bind.other_vm", "guest_memfd created by another VM", EINVAL, "kernel",
             f"{_GMEM_C} kvm_gmem_bind: gmem->kvm != kvm", _bind_other_vm),
    UapiCase("bind.offset_unaligned", "guest_memfd_offset not page aligned", EINVAL, "kernel",
             f"{_MAIN_C} kvm_set_memory_region", _bind_offset(4 * P + 1)),
    UapiCase("bind.offset_beyond", "offset + size past the file's end", EINVAL, "kernel",
             f"{_GMEM_C} kvm_gmem_bind: offset + size > i_size", _bind_offset(14 * P)),
    UapiCase("bind.not_gmem_fd", "guest_memfd field names /dev/kvm", EINVAL, "kernel",
             f"{_GMEM_C} kvm_gmem_bind: file is not a guest_memfd", _bind_not_gmem),
    UapiCase("bind.change_flags", "add LOG_DIRTY_PAGES to a bound slot", EINVAL, "kernel",
             f"{_MAIN_C}: guest_memfd slots are immutable, only deletable",
             _change_bound(u.KVM_MEM_GUEST_MEMFD | u.KVM_MEM_LOG_DIRTY_PAGES, SLOT_GPA)),
    UapiCase("bind.move", "move a bound slot to another gpa", EINVAL, "kernel",
             f"{_MAIN_C}: guest_memfd slots are immutable, only deletable",
             _change_bound(u.KVM_MEM_GUEST_MEMFD, OTHER_GPA)),
    UapiCase("bind.reissue", "re-issue the identical bound slot", EINVAL, "kernel",
             f"{_MAIN_C}: guest_memfd slots are immutable, only deletable",
             _change_bound(u.KVM_MEM_GUEST_MEMFD, SLOT_GPA)),
    UapiCase("bind.drop_gmem", "clear KVM_MEM_GUEST_MEMFD on a bound slot", EINVAL, "kernel",
             f"{_MAIN_C}: guest_memfd slots are immutable, only deletable",
             _change_bound(0, SLOT_GPA, keep_gmem=False)),
    UapiCase("bind.overlapping_gpa", "second slot overlapping the first slot's gpa range",
             errno.EEXIST, "kernel", f"{_MAIN_C} kvm_set_memory_region: overlap check",
             _overlapping_gpa),
    UapiCase("bind.rebind_after_delete", "delete a slot, bind its range to a new slot", 0,
             "kernel", f"{_GMEM_C} kvm_gmem_unbind releases the range", _rebind_after_delete),
    # attributes
    UapiCase("attributes.set_private", "KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) on a default VM",
             EINVAL, "host",
             "api.rst defines the ioctl only when KVM_CAP_MEMORY_ATTRIBUTES is non-zero and "
             "does not fix the errno otherwise; 7.3.4 has the ioctl (/dev/kvm reports "
             "KVM_CAP_MEMORY_ATTRIBUTES 8, a default VM 0) and refuses the attribute with EINVAL",
             _set_private, applies=_attributes_absent, kernels=KERNEL_7_3_4,
             alternatives=(KnownErrno(errno.ENOTTY, KERNEL_6_18_PVM,
                                      "no KVM_SET_MEMORY_ATTRIBUTES ioctl for default VMs there "
                                      "(CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES off), so ENOTTY"),)),
)  # fmt: skip


def case_by_id(case_id: str) -> UapiCase:
    for case in CASES:
        if case.id == case_id:
            return case
    raise KeyError(f"no uAPI case {case_id!r}; known: {', '.join(c.id for c in CASES)}")
