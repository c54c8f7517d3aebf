"""A tiny VMM: one guest_memfd split across several memslots, and a real-mode payload.

The layout is the shape the seed's bug needs: slots at non-trivial base gfns bound to the
guest_memfd at non-zero offsets, so ``gfn != file index`` everywhere. A 16-bit real-mode
payload (hand-assembled, see ``build_payload``) reads the first dword of each listed gfn
and reports ``(gfn, value)`` through port I/O, then HLTs. Scenarios compare what the guest read
with the oracle (``gmem_layout``) and markers written through the guest_memfd mmap.

Real mode reaches only the first MiB, hence gfns below 0x100; that is plenty for layouts
that distinguish ``base_gfn + index - pgoff`` from ``index``.

The oracle and punch-hole checks give every gmem slot a *decoy* ``userspace_addr`` (an
anonymous buffer holding ``anon_marker`` values), so each read says which source served it.
Were ``userspace_addr`` the guest_memfd's own mmap at the oracle's offset, a host that serves
gmem slots from ``userspace_addr`` (this project's PVM development host) would pass both
checks without KVM's gfn -> guest_memfd index translation ever being used. On such a host the
checks are ``not_meaningful`` (a distinct status with its reason, never ``pass``); the
divergence itself is the backing-source check's finding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Final, Literal, TypeVar

from host_stack import gmem_layout as gl
from host_stack import kvm_uapi as u
from host_stack.errors import HostStackError
from host_stack.kvm import (
    GuestMemfd,
    HltExit,
    HostMapping,
    IoExit,
    KvmSystem,
    Memslot,
    Vcpu,
    VcpuExit,
    Vm,
)
from outcome import Check, Finding, Verdict

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "BACKING_SOURCE",
    "DEFAULT_LAYOUT",
    "FINDING_ID",
    "HOST_REQUIREMENTS",
    "MAPPING",
    "NOT_MEANINGFUL_ON_DECOY",
    "PORT_GFN",
    "PORT_VALUE",
    "PUNCH_HOLE",
    "GmemUnsupported",
    "GuestRead",
    "PayloadError",
    "TinyVm",
    "anon_marker",
    "build_payload",
    "gmem_marker",
    "guest_pattern",
    "judge_oracle_mapping",
    "judge_punch_hole",
    "not_meaningful_reason",
    "private_gfns",
    "run_backing_source",
    "run_oracle_mapping",
    "run_punch_hole",
]

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())

PORT_GFN: Final = 0xE0  # 16-bit OUT: the gfn about to be read
PORT_VALUE: Final = 0xE4  # 32-bit OUT: the dword read at offset 0 of that gfn
CODE_GFN: Final = 0x01  # payload slot (plain anonymous memory)
CODE_SLOT: Final = 0
TSS_ADDR: Final = 0xFFFBD000  # three pages below 4 GiB, where QEMU/selftests put it
REAL_MODE_MAX_GFN: Final = 0xFF
MAX_EXITS: Final = 4096

# Slot 1: gfn 0x20-0x23 <- index 2-5; slot 2: gfn 0x40-0x43 <- index 8-11;
# slot 3: gfn 0x70-0x75 <- index 16-21. Indices 0-1, 6-7, 12-15, 22-31 stay unbound.
DEFAULT_LAYOUT: Final = (
    gl.SlotLayout(slot=1, base_gfn=0x20, npages=4, gmem_pgoff=2),
    gl.SlotLayout(slot=2, base_gfn=0x40, npages=4, gmem_pgoff=8),
    gl.SlotLayout(slot=3, base_gfn=0x70, npages=6, gmem_pgoff=16),
)
DEFAULT_GMEM_PAGES: Final = 32
# The guest_memfd flags a VM type's tiny VMM asks for by default: a default VM's is mapped and
# shared from the start (a gmem-only slot); a software-protected VM takes no INIT_SHARED (7.3.4
# says EINVAL) and, without MMAP, its slots are served from userspace_addr while shared.
DEFAULT_GMEM_FLAGS: Final[dict[int, int]] = {
    u.KVM_X86_DEFAULT_VM: u.GUEST_MEMFD_FLAG_MMAP | u.GUEST_MEMFD_FLAG_INIT_SHARED,
    u.KVM_X86_SW_PROTECTED_VM: 0,
}
# What the scenarios need from the host (capabilities.HostReport.missing names): a test that
# lacks one CANCELs with the report's sentence instead of erroring in TinyVm.
HOST_REQUIREMENTS: Final = ("kvm", "guest_memfd", "guest_memfd_mmap", "guest_memfd_init_shared")


_R = TypeVar("_R", Memslot, Vcpu, HostMapping, GuestMemfd, Vm)


class GmemUnsupported(HostStackError, RuntimeError):
    """The host cannot run the scenario (e.g. no guest_memfd MMAP|INIT_SHARED)."""


class PayloadError(HostStackError, RuntimeError):
    """The payload did not run as written (unexpected exit, protocol error).

    ``exit`` is the vCPU exit that stopped it, if any (e.g. a memory-fault exit).
    """

    def __init__(self, message: str, exit: VcpuExit | None = None) -> None:
        super().__init__(message)
        self.exit = exit


def gmem_marker(index: int) -> int:
    """Marker written through the guest_memfd mmap into file page ``index`` ("GM" + index)."""
    return 0x474D0000 | (index & 0xFFFF)


def anon_marker(index: int) -> int:
    """Marker in the decoy anonymous buffer at the page the slot maps for ``index``."""
    return 0x414E0000 | (index & 0xFFFF)


def private_gfns(layout: Sequence[gl.SlotLayout]) -> tuple[int, ...]:
    """One gfn of each slot, not its first, so every private page sits at a non-zero slot offset
    (with ``DEFAULT_LAYOUT`` it includes the seed's gfn 0x41, file index 9 behind slot 2)."""
    return tuple(s.base_gfn + 1 for s in layout)


def guest_pattern(gfn: int) -> int:
    """What the guest writes to a private gfn, so a read tells its page from a zeroed or decoy one."""
    return 0x50520000 | gfn


def build_payload(steps: Sequence[tuple[int, int | None]]) -> bytes:
    """Hand-assembled 16-bit real-mode code: for each (gfn, write) step, optionally store the
    dword ``write`` at offset 0 of the gfn, then report the gfn and its first dword.

    Per step (21 bytes, 30 with a write)::

        B8 lo hi        mov ax, gfn          ; the gfn itself
        BA E0 00        mov dx, PORT_GFN
        EF              out dx, ax           ; 2-byte OUT -> KVM_EXIT_IO
        B8 lo hi        mov ax, gfn << 8     ; real-mode segment of the page (gfn*4096/16)
        8E D8           mov ds, ax
        66 C7 06 00 00 imm32                 ; (write only) mov dword [0x0000], imm32
        66 A1 00 00     mov eax, [0x0000]    ; 32-bit load of ds:0 = gfn*4096
        BA E4 00        mov dx, PORT_VALUE
        66 EF           out dx, eax          ; 4-byte OUT -> KVM_EXIT_IO

    then ``F4 hlt`` (KVM_EXIT_HLT) and ``EB FE jmp $`` in case HLT ever resumes.
    """
    code = bytearray()
    for gfn, write in steps:
        if not 0 <= gfn <= REAL_MODE_MAX_GFN:
            raise ValueError(f"gfn {gfn:#x} outside real-mode reach [0, {REAL_MODE_MAX_GFN:#x}]")
        if write is not None and not 0 <= write <= 0xFFFFFFFF:
            raise ValueError(f"value {write:#x} to write at gfn {gfn:#x} is not a dword")
        seg = gfn << 8
        code += bytes([0xB8, gfn & 0xFF, gfn >> 8])
        code += bytes([0xBA, PORT_GFN, 0x00, 0xEF])
        code += bytes([0xB8, seg & 0xFF, seg >> 8, 0x8E, 0xD8])
        if write is not None:
            code += bytes([0x66, 0xC7, 0x06, 0x00, 0x00]) + write.to_bytes(4, "little")
        code += bytes([0x66, 0xA1, 0x00, 0x00])
        code += bytes([0xBA, PORT_VALUE, 0x00, 0x66, 0xEF])
    code += bytes([0xF4, 0xEB, 0xFE])
    if len(code) > gl.PAGE_SIZE:
        raise ValueError(f"payload of {len(code)} bytes exceeds one page ({len(steps)} steps)")
    return bytes(code)


@dataclass(frozen=True)
class GuestRead:
    """One report of the payload: the dword at offset 0 of ``gfn``."""

    gfn: int
    value: int


BackingMode = Literal["gmem_mmap", "decoy"]


class TinyVm:
    """A VM, its guest_memfd (mmapped), the gmem slots, a code slot and one vCPU.

    ``backing`` chooses each gmem slot's ``userspace_addr``: ``gmem_mmap`` points it at the
    guest_memfd's own mapping (both views agree), ``decoy`` at a separate anonymous buffer
    filled with ``anon_marker`` values (tells which view the host serves the guest from).
    ``markers=False`` leaves every guest_memfd page unallocated and untouched, for callers
    that decide per page whether it is mapped, clean or dirty (the poison matrix).

    ``vm_type`` chooses the guest_memfd flags (``DEFAULT_GMEM_FLAGS``): a default VM's is
    MMAP|INIT_SHARED (mapped, and its markers written through the mapping); a software-protected
    VM's (type 1) has neither, so it has no host mapping at all: its pages start zeroed,
    ``markers`` must be off, and each slot is served from ``userspace_addr`` (the decoy) while
    shared and from the guest_memfd once ``set_private`` made it private.
    """

    def __init__(
        self,
        system: KvmSystem,
        layout: Sequence[gl.SlotLayout] = DEFAULT_LAYOUT,
        *,
        gmem_pages: int = DEFAULT_GMEM_PAGES,
        backing: BackingMode = "gmem_mmap",
        markers: bool = True,
        vm_type: int = u.KVM_X86_DEFAULT_VM,
    ) -> None:
        self.layout = gl.check_no_overlap(layout)
        self.vm_type = vm_type
        self.gmem_flags = DEFAULT_GMEM_FLAGS.get(vm_type, 0)
        mapped = bool(self.gmem_flags & u.GUEST_MEMFD_FLAG_MMAP)
        if not mapped and (markers or backing == "gmem_mmap"):
            raise ValueError(f"guest_memfd flags {self.gmem_flags:#x} have no MMAP: nothing can write its markers "
                             "or serve as a slot's userspace_addr (use markers=False, backing='decoy')")
        self.backing = backing
        self.markers = markers
        self.gmem_pages = gmem_pages
        for s in self.layout:
            if s.index_end > gmem_pages:
                raise ValueError(f"{s} reaches past the guest_memfd's {gmem_pages} pages")
            if s.gfn_end - 1 > REAL_MODE_MAX_GFN or s.base_gfn <= CODE_GFN:
                raise ValueError(f"{s}: gfns must lie in ({CODE_GFN:#x}, {REAL_MODE_MAX_GFN:#x}]")
        self._resources: list[Memslot | Vcpu | HostMapping | GuestMemfd | Vm] = []
        self.slot_hva: dict[int, int] = {}
        try:
            self._build(system)
        except BaseException:
            self.close()
            raise

    def _own(self, obj: _R) -> _R:
        self._resources.append(obj)
        return obj

    def _build(self, system: KvmSystem) -> None:
        wanted = self.gmem_flags
        self.vm = self._own(system.create_vm(self.vm_type))
        supported = self.vm.check_extension(u.KVM_CAP_GUEST_MEMFD_FLAGS)
        if self.vm.check_extension(u.KVM_CAP_GUEST_MEMFD) <= 0 or supported & wanted != wanted:
            raise GmemUnsupported(
                f"guest_memfd with flags {wanted:#x} not offered to VM type {self.vm_type}: KVM_CAP_GUEST_MEMFD="
                f"{self.vm.check_extension(u.KVM_CAP_GUEST_MEMFD)}, "
                f"KVM_CAP_GUEST_MEMFD_FLAGS={supported:#x} (need {wanted:#x})"
            )
        if self.vm.check_extension(u.KVM_CAP_SET_TSS_ADDR) > 0:
            self.vm.set_tss_addr(TSS_ADDR)
        self.gmem = self._own(self.vm.create_guest_memfd(self.gmem_pages * gl.PAGE_SIZE, wanted))
        self._gmem_map = self._own(self.gmem.mmap()) if wanted & u.GUEST_MEMFD_FLAG_MMAP else None
        for index in range(self.gmem_pages if self.markers else 0):
            self.gmem_map.write_u32(index * gl.PAGE_SIZE, gmem_marker(index))
        self.code = self._own(HostMapping.anonymous(gl.PAGE_SIZE, "payload code"))
        self._own(self.vm.add_memslot(CODE_SLOT, CODE_GFN << gl.PAGE_SHIFT, gl.PAGE_SIZE, self.code.addr))
        for s in self.layout:
            if self.backing == "gmem_mmap":
                hva = self.gmem_map.addr + s.gmem_offset
            else:
                decoy = self._own(HostMapping.anonymous(s.memory_size, f"decoy slot {s.slot}"))
                for page in range(s.npages):
                    decoy.write_u32(page * gl.PAGE_SIZE, anon_marker(s.gmem_pgoff + page))
                hva = decoy.addr
            self.slot_hva[s.slot] = hva
            self._own(
                self.vm.add_memslot(
                    s.slot,
                    s.guest_phys_addr,
                    s.memory_size,
                    hva,
                    gmem=self.gmem,
                    guest_memfd_offset=s.gmem_offset,
                )
            )
        self.vcpu = self._own(self.vm.create_vcpu(0))

    @property
    def gmem_map(self) -> HostMapping:
        """The host mapping of the guest_memfd (MMAP flag only)."""
        if self._gmem_map is None:
            raise ValueError(f"this VM's guest_memfd (flags {self.gmem_flags:#x}) has no MMAP flag: no host mapping")
        return self._gmem_map

    def all_gfns(self) -> list[int]:
        return [gfn for s in self.layout for gfn in range(s.base_gfn, s.gfn_end)]

    def set_private(self, gfns: Sequence[int], private: bool = True) -> None:
        """Convert each gfn to private (served from the guest_memfd) or back to shared."""
        attributes = u.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
        for gfn in gfns:
            self.vm.set_memory_attributes(gfn << gl.PAGE_SHIFT, gl.PAGE_SIZE, attributes)

    def read_gfns(self, gfns: Sequence[int]) -> list[GuestRead]:
        """Load the payload for ``gfns``, reset the vCPU to real mode at it, run to HLT."""
        return self.run_steps([(gfn, None) for gfn in gfns])

    def write_gfns(self, values: Sequence[tuple[int, int]]) -> list[GuestRead]:
        """The guest stores each dword at its gfn and reads it back (the reports)."""
        return self.run_steps(list(values))

    def run_steps(self, steps: Sequence[tuple[int, int | None]]) -> list[GuestRead]:
        """Run ``build_payload(steps)`` on the vCPU from real mode to HLT; a memory-fault exit (a
        private gfn without guest_memfd behind it, a poisoned page) raises ``PayloadError`` with it."""
        gfns = [gfn for gfn, _ in steps]
        self.code.write(0, build_payload(steps))
        sregs = self.vcpu.get_sregs()
        sregs.cs.base = CODE_GFN << gl.PAGE_SHIFT
        sregs.cs.selector = CODE_GFN << 8
        sregs.ds.base = 0
        sregs.ds.selector = 0
        self.vcpu.set_sregs(sregs)
        regs = u.KvmRegs()
        regs.rip = 0
        regs.rflags = 0x2
        self.vcpu.set_regs(regs)
        return _collect(self.vcpu, gfns)

    def close(self) -> None:
        while self._resources:
            self._resources.pop().close()

    def __enter__(self) -> TinyVm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _collect(vcpu: Vcpu, gfns: Sequence[int]) -> list[GuestRead]:
    reads: list[GuestRead] = []
    pending_gfn: int | None = None
    for _ in range(MAX_EXITS):
        ex: VcpuExit = vcpu.run()
        if isinstance(ex, HltExit):
            break
        if not isinstance(ex, IoExit) or ex.direction != u.KVM_EXIT_IO_OUT:
            raise PayloadError(f"payload stopped with {ex!r} after {len(reads)} reads", ex)
        if ex.port == PORT_GFN and ex.size == 2:
            pending_gfn = ex.value
        elif ex.port == PORT_VALUE and ex.size == 4 and pending_gfn is not None:
            reads.append(GuestRead(pending_gfn, ex.value))
            pending_gfn = None
        else:
            raise PayloadError(f"unexpected OUT {ex!r} (pending gfn {pending_gfn})")
    else:
        raise PayloadError(f"payload did not HLT within {MAX_EXITS} exits")
    got = [r.gfn for r in reads]
    if got != list(gfns):
        raise PayloadError(f"payload reported gfns {got}, expected {list(gfns)}")
    return reads


def _describe(value: int) -> str:
    if value >> 16 == gmem_marker(0) >> 16:
        return f"guest_memfd marker of index {value & 0xFFFF}"
    if value >> 16 == anon_marker(0) >> 16:
        return f"userspace_addr marker of index {value & 0xFFFF}"
    if value == 0:
        return "zero"
    return "garbage"


def _layout_json(layout: Sequence[gl.SlotLayout]) -> list[dict[str, int]]:
    return [asdict(s) for s in layout]


def not_meaningful_reason(what: str) -> str:
    """Why ``what`` (an oracle check) proves nothing on a host that serves gmem slots from userspace_addr."""
    return f"{what} {NOT_MEANINGFUL_ON_DECOY}"


MAPPING: Final = "oracle_mapping"
PUNCH_HOLE: Final = "punch_hole"
BACKING_SOURCE: Final = "backing_source"


def _reads_json(reads: Sequence[GuestRead]) -> list[dict[str, int]]:
    return [{"gfn": r.gfn, "value": r.value} for r in reads]


def _marker_checks(layout: Sequence[gl.SlotLayout], reads: Sequence[GuestRead], hole_gfn: int | None = None,
                   when: str = "") -> list[Check]:
    """One check per gfn read: the marker of the file index the oracle maps it to (or zero at a hole)."""
    if not reads:
        return [Check(f"{when}gfns read by the payload", "every gfn of the layout", "none", False)]
    checks = []
    for r in reads:
        index = gl.index_for_gfn(layout, r.gfn)
        if index is None:
            checks.append(Check(f"{when}gfn {r.gfn:#x}", "no read (no slot maps it)", f"{r.value:#010x}", False))
            continue
        expected = 0 if r.gfn == hole_gfn else gmem_marker(index)
        what = "zero (punched)" if r.gfn == hole_gfn else f"index {index}"
        checks.append(Check(f"{when}gfn {r.gfn:#x}", f"{expected:#010x} ({what})",
                            f"{r.value:#010x} ({_describe(r.value)})", r.value == expected))
    return checks


def _served_from_userspace_addr(layout: Sequence[gl.SlotLayout], reads: Sequence[GuestRead]) -> bool:
    return bool(reads) and classify_backing(layout, reads)[0] == "userspace_addr"


def judge_oracle_mapping(layout: Sequence[gl.SlotLayout], reads: Sequence[GuestRead]) -> Verdict:
    """Pure: every gfn read through decoy ``userspace_addr`` views shows the oracle's file index;
    NOT MEANINGFUL where the decoys answered (the translation was never used)."""
    evidence = {"layout": _layout_json(layout), "reads": _reads_json(reads)}
    if _served_from_userspace_addr(layout, reads):
        return Verdict.did_not_run(MAPPING, "NOT MEANINGFUL",
                                   not_meaningful_reason("the gfn -> guest_memfd index oracle check"),
                                   evidence=evidence)
    return Verdict(MAPPING, tuple(_marker_checks(layout, reads)), evidence=evidence)


def run_oracle_mapping(system: KvmSystem, layout: Sequence[gl.SlotLayout] = DEFAULT_LAYOUT) -> Verdict:
    """(a) Through decoy ``userspace_addr`` views, each gfn must show the oracle's file index."""
    with TinyVm(system, layout, backing="decoy") as tvm:
        return judge_oracle_mapping(tvm.layout, tvm.read_gfns(tvm.all_gfns()))


def judge_punch_hole(
    layout: Sequence[gl.SlotLayout], hole_gfn: int, before: Sequence[GuestRead], after: Sequence[GuestRead]
) -> Verdict:
    """Pure: every gfn before the punch, and after it zero at exactly ``hole_gfn`` (decoy views)."""
    evidence = {"layout": _layout_json(layout), "expected_gfn": hole_gfn, "before": _reads_json(before),
                "after": _reads_json(after)}
    if _served_from_userspace_addr(layout, before):
        return Verdict.did_not_run(PUNCH_HOLE, "NOT MEANINGFUL", not_meaningful_reason("the punch-hole check"),
                                   evidence=evidence)
    checks = [*_marker_checks(layout, before, when="before punch: "),
              *_marker_checks(layout, after, hole_gfn, when="after punch: ")]
    return Verdict(PUNCH_HOLE, tuple(checks), evidence=evidence)


def run_punch_hole(system: KvmSystem, index: int, layout: Sequence[gl.SlotLayout] = DEFAULT_LAYOUT) -> Verdict:
    """(b) Punch file page ``index`` between two runs of the payload in the same VM (decoy views)."""
    expected_gfn = gl.gfn_for_index(layout, index)
    if expected_gfn is None:
        raise ValueError(f"file index {index} is bound to no slot of {list(layout)}")
    with TinyVm(system, layout, backing="decoy") as tvm:
        gfns = tvm.all_gfns()
        before = tvm.read_gfns(gfns)
        tvm.gmem.punch_hole(index * gl.PAGE_SIZE, gl.PAGE_SIZE)
        after = tvm.read_gfns(gfns)
        verdict = judge_punch_hole(tvm.layout, expected_gfn, before, after)
    return replace(verdict, evidence={**verdict.evidence, "index": index})


Behaviour = Literal["guest_memfd", "userspace_addr", "unexpected"]


def classify_backing(layout: Sequence[gl.SlotLayout], reads: Sequence[GuestRead]) -> tuple[Behaviour, list[str]]:
    """Pure: decide the behaviour from what the guest read (decoy ``userspace_addr``)."""
    sources: set[str] = set()
    problems: list[str] = []
    for r in reads:
        index = gl.index_for_gfn(layout, r.gfn)
        if index is None:
            problems.append(f"gfn {r.gfn:#x}: no slot maps it")
        elif r.value == gmem_marker(index):
            sources.add("guest_memfd")
        elif r.value == anon_marker(index):
            sources.add("userspace_addr")
        else:
            problems.append(
                f"gfn {r.gfn:#x}: expected {gmem_marker(index):#010x} (guest_memfd) or "
                f"{anon_marker(index):#010x} (userspace_addr) for index {index}, "
                f"got {r.value:#010x} ({_describe(r.value)})"
            )
    if not problems and len(sources) > 1:
        problems.append(f"mixed sources across gfns: {sorted(sources)}")
    if problems or len(sources) != 1:
        return "unexpected", problems or ["no reads"]
    behaviour: Behaviour = "guest_memfd" if "guest_memfd" in sources else "userspace_addr"
    return behaviour, []


FINDING_ID: Final = "gmem-slot-served-from-userspace-addr"
NOT_MEANINGFUL_ON_DECOY: Final = (
    "is not meaningful on this host: guest accesses to the KVM_MEM_GUEST_MEMFD slots "
    "were served from each slot's userspace_addr (the decoy buffer's markers came back), not "
    "from the guest_memfd, so KVM's gfn -> guest_memfd index translation was never used "
    f"(finding {FINDING_ID})"
)


def run_backing_source(system: KvmSystem, layout: Sequence[gl.SlotLayout] = DEFAULT_LAYOUT) -> Verdict:
    """Run with ``userspace_addr`` pointing at a decoy buffer and see which view the guest reads.

    ``guest_memfd`` is the upstream (6.18, TDP MMU) behaviour for MMAP|INIT_SHARED slots and
    passes; ``userspace_addr`` is an understood divergence: it passes with the finding;
    ``unexpected`` (mixed sources, wrong index, garbage) fails. ``evidence["behaviour"]`` says which.
    """
    with TinyVm(system, layout, backing="decoy") as tvm:
        reads = tvm.read_gfns(tvm.all_gfns())
        behaviour, problems = classify_backing(tvm.layout, reads)
        evidence = {"behaviour": behaviour, "layout": _layout_json(tvm.layout), "reads": _reads_json(reads),
                    "slot_hva": {str(k): v for k, v in tvm.slot_hva.items()}}
        check = Check("memory serving every gmem slot's gfns", "one of guest_memfd, userspace_addr",
                      behaviour if not problems else "; ".join(problems), behaviour != "unexpected")
        findings: tuple[Finding, ...] = ()
        if behaviour == "userspace_addr":
            findings = (Finding(
                id=FINDING_ID,
                severity="divergence",
                text=(
                    "Guest accesses to KVM_MEM_GUEST_MEMFD slots (guest_memfd created with "
                    "MMAP|INIT_SHARED) are served from the slot's userspace_addr, not from the "
                    "guest_memfd; upstream KVM serves such slots from the guest_memfd. Poison "
                    "or holes in the guest_memfd are invisible to the guest unless "
                    "userspace_addr is the guest_memfd's own mapping."
                ),
                evidence={
                    "layout": _layout_json(tvm.layout),
                    "reads": _reads_json(reads),
                    "guest_memfd_marker_example": gmem_marker(tvm.layout[0].gmem_pgoff),
                    "userspace_addr_marker_example": anon_marker(tvm.layout[0].gmem_pgoff),
                },
            ),)
            _log.warning("finding %s: %s", FINDING_ID, findings[0].text)
        return Verdict(BACKING_SOURCE, (check,), findings=findings, evidence=evidence)
