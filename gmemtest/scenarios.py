"""The guest-side scenarios as data.

Each row is one experiment: what the probe maps, which page is poisoned and how, what the probe
is doing when the machine check arrives. Tests, the CLI and the benchmark all read this one table
so a scenario means the same thing wherever it is run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from guests.profiles import GuestProfile
from qmp_helpers.mce import MCE_KINDS


class Trigger(Enum):
    """What the probe does after the machine check is injected."""

    TOUCH = "touch"  # late kill: nothing happens until the program touches the page
    WAIT = "wait"  # early kill: the kernel signals without a touch (action optional)
    SPIN = "spin"  # SRAR while the program runs in user mode on the target vCPU
    KERNEL = "kernel"  # SRAR while the vCPU is in the kernel: the guest must panic
    NONE = "none"  # nothing maps the page: the guest kernel handles it alone, nobody is signalled


class Source(Enum):
    """Where the poison comes from."""

    QMP = "qmp"  # QEMU's `mce` command puts a machine check into the guest at the gpa
    # The host kernel poisons the frame behind the gpa (corrupt-pfn on QEMU's page); what the
    # guest gets is whatever QEMU makes of the SIGBUS it receives.
    HOST = "host"
    # Nothing is injected: QMP converts the probe's page between shared and private, and every
    # layer's view of the page is judged at each step (gmemtest.conversion_row).
    CONVERSION = "conversion"


class KillPolicy(Enum):
    """How the probe asks for early or late kill (or does not ask)."""

    LATE_PRCTL = "late-prctl"
    EARLY_PRCTL = "early-prctl"
    EARLY_SYSCTL = "early-sysctl"


# The triggers a host-poison row can have (each has its act in gmemtest.acts.ACTS).
HOST_TRIGGERS = (Trigger.TOUCH, Trigger.WAIT)

# "free": a frame no process maps, found free in the guest's buddy allocator (KPF_BUDDY).
PAGE_KINDS = ("anon4k", "thp", "hugetlb2m", "free")
# A private row's mapping (4 MiB, mlocked): the runner converts the first of its pages, highest gpa
# first, that QEMU accepts. QEMU refuses a page inside an image it loaded (a PVH kernel's ELF
# segments cover the freed gap after its rodata), and the guest hands out those freed pieces first:
# measured, all six 4-page mappings of one boot lay in that gap, while a 1024-page one reached 0x1f8ff000.
PRIVATE_NPAGES = 1024


@dataclass(frozen=True)
class ScenarioSpec:
    """One scenario.

    `poison_offset` and `touch_offset` are byte offsets into the probe's mapping, so the oracle can
    turn them into addresses from the mapping's layout alone.
    """

    name: str
    summary: str
    page_kind: str
    npages: int
    mce_kind: str
    trigger: Trigger
    kill: KillPolicy
    poison_offset: int
    touch_offset: int | None = None
    profile: str = "tcg-default"
    broadcast: bool = False
    tags: tuple[str, ...] = ()
    # A second page of the same mapping poisoned after the first, and where it is touched.
    second_poison_offset: int | None = None
    second_touch_offset: int | None = None
    source: Source = Source.QMP
    # The guest's MCE bank poll interval for the run (machinecheck check_interval, seconds): an
    # AMD guest learns of a forwarded action-optional error only when it polls (QEMU writes a
    # deferred error to the bank and raises nothing). 0 switches polling off; None leaves it.
    guest_mce_poll_s: int | None = None
    # After the verdict's guest part: system_reset with the host frame still poisoned, then the
    # rebooted guest's kernel loads that gpa (QEMU must have replaced the page on reset).
    reset_after: bool = False
    # The page is made private through QMP (x-kvm-convert-memory) before the act, and shared again
    # after it. The runner picks the page (see PRIVATE_NPAGES) and moves the offsets there (the same
    # offsets inside it), so a private row's offsets lie in the mapping's first page.
    private: bool = False
    # QEMU's switch -accel kvm,x-private-hwpoison-mce=on (the project's series): a poisoned private
    # page reaches the guest as a machine check instead of stopping the VM. Private host rows only.
    qemu_private_hwpoison_mce: bool = False

    def __post_init__(self) -> None:
        self._check_kinds()
        self._check_offsets()
        self._check_host_row()
        self._check_private_row()

    def _check_kinds(self) -> None:
        if self.page_kind not in PAGE_KINDS:
            raise ValueError(f"scenario {self.name}: page kind {self.page_kind!r} is not one of {PAGE_KINDS}")
        if self.source is Source.CONVERSION:
            if self.mce_kind:
                raise ValueError(f"scenario {self.name}: a conversion row injects nothing: mce_kind must be '', "
                                 f"got {self.mce_kind!r}")
        elif self.mce_kind not in MCE_KINDS:
            raise ValueError(f"scenario {self.name}: MCE kind {self.mce_kind!r} is not one of {tuple(MCE_KINDS)}")
        if self.npages < 1:
            raise ValueError(f"scenario {self.name}: npages must be >= 1, got {self.npages}")
        if (self.page_kind == "free") != (self.trigger is Trigger.NONE):
            raise ValueError(f"scenario {self.name}: a free page goes with trigger 'none' and only with it")
        if self.guest_mce_poll_s is not None and self.guest_mce_poll_s < 0:
            raise ValueError(f"scenario {self.name}: guest_mce_poll_s must be >= 0 (0: no polling), "
                             f"got {self.guest_mce_poll_s}")

    def _check_offsets(self) -> None:
        if (self.trigger is Trigger.TOUCH) != (self.touch_offset is not None):
            raise ValueError(f"scenario {self.name}: a touch offset goes with trigger 'touch' and only with it")
        if self.poison_offset < 0 or (self.touch_offset is not None and self.touch_offset < 0):
            raise ValueError(f"scenario {self.name}: offsets must be >= 0")
        if (self.second_poison_offset is None) != (self.second_touch_offset is None):
            raise ValueError(f"scenario {self.name}: a second poisoned page needs its touch offset, and only it")
        if self.second_poison_offset is not None:
            if self.trigger is not Trigger.TOUCH or self.page_kind != "anon4k":
                raise ValueError(f"scenario {self.name}: a second poisoned page is for 4 KiB late-kill touches")
            if self.second_poison_offset >> 12 == self.poison_offset >> 12:
                raise ValueError(f"scenario {self.name}: the second poisoned page must be another page")

    def _check_host_row(self) -> None:
        if self.reset_after and (self.source is not Source.HOST or self.trigger is not Trigger.TOUCH):
            raise ValueError(f"scenario {self.name}: a reset after the injection is for host-poison touch rows")
        if self.source is not Source.HOST:
            return
        # corrupt-pfn is an action-optional event for the host; what reaches the guest is QEMU's
        # translation of it. One 4 KiB frame behind ordinary guest RAM, one injection.
        if self.mce_kind != "SRAO" or self.page_kind not in ("anon4k", "thp") or self.broadcast \
                or self.second_poison_offset is not None:
            raise ValueError(f"scenario {self.name}: a host-poison row poisons one frame behind a 4 KiB "
                             "piece of an anonymous guest page (mce_kind SRAO, page kind anon4k or thp, "
                             "no broadcast, one page)")
        if self.trigger not in HOST_TRIGGERS:
            raise ValueError(f"scenario {self.name}: a host-poison row needs trigger "
                             f"{' or '.join(t.value for t in HOST_TRIGGERS)}, got {self.trigger.value}")

    def _check_private_row(self) -> None:
        if self.qemu_private_hwpoison_mce and not (self.private and self.source is Source.HOST):
            raise ValueError(f"scenario {self.name}: QEMU's x-private-hwpoison-mce is about a poisoned private page: "
                             "a private host-poison row's switch")
        if self.source is Source.CONVERSION and not self.private:
            raise ValueError(f"scenario {self.name}: a conversion row converts its page: private must be True")
        if not self.private:
            return
        if self.page_kind != "anon4k" or self.trigger not in (Trigger.TOUCH, Trigger.SPIN) or self.broadcast \
                or self.second_poison_offset is not None:
            raise ValueError(f"scenario {self.name}: a private row converts one 4 KiB anonymous page and touches it "
                             "or spins beside it (page kind anon4k, trigger touch or spin, no broadcast, one page)")

    def at_page(self, page_offset: int) -> ScenarioSpec:
        """A private row with its offsets moved into the page at ``page_offset`` of the mapping."""
        if not self.private:
            raise ValueError(f"scenario {self.name}: only a private row moves to the page the runner picks")
        return replace(self, poison_offset=page_offset + self.poison_offset % 0x1000,
                       touch_offset=None if self.touch_offset is None else page_offset + self.touch_offset % 0x1000)

    @property
    def expects_panic(self) -> bool:
        return self.trigger is Trigger.KERNEL

    @property
    def requirements(self) -> tuple[str, ...]:
        """Host capabilities the row needs besides its profile's (host_stack.capabilities names)."""
        # kprobes: every SIGBUS sent to QEMU is judged with its address and order (mceerr_trace)
        return ("hwpoison_inject", "kprobes") if self.source is Source.HOST else ()


_MIB = 1 << 20

SCENARIOS: tuple[ScenarioSpec, ...] = (
    ScenarioSpec(
        name="srao-late-touch-4k",
        summary="SRAO on a 4 KiB anonymous page, late kill; touching the page gives AR with lsb 12",
        page_kind="anon4k", npages=4, mce_kind="SRAO", trigger=Trigger.TOUCH, kill=KillPolicy.LATE_PRCTL,
        poison_offset=0x1000 + 0x80, touch_offset=0x1000 + 0x238, tags=("srao", "late", "4k"),
    ),
    ScenarioSpec(
        name="srao-late-touch-thp",
        summary="SRAO on a 4 KiB piece of a THP; the THP is split and only that piece is lost (lsb 12)",
        page_kind="thp", npages=1, mce_kind="SRAO", trigger=Trigger.TOUCH, kill=KillPolicy.LATE_PRCTL,
        poison_offset=0x5000 + 0x80, touch_offset=0x5000 + 0x10, tags=("srao", "late", "thp"),
    ),
    ScenarioSpec(
        name="srao-late-touch-hugetlb",
        summary="SRAO on a tail of a 2 MiB hugetlb page; a touch anywhere in it gives AR with lsb 21",
        page_kind="hugetlb2m", npages=1, mce_kind="SRAO", trigger=Trigger.TOUCH, kill=KillPolicy.LATE_PRCTL,
        poison_offset=0x3000 + 0x80, touch_offset=2 * _MIB - 0x1000 + 0x18, tags=("srao", "late", "hugetlb"),
    ),
    ScenarioSpec(
        name="srao-early-kill-prctl-4k",
        summary="SRAO with PR_MCE_KILL_EARLY: AO arrives without a touch, si_addr = the page",
        page_kind="anon4k", npages=4, mce_kind="SRAO", trigger=Trigger.WAIT, kill=KillPolicy.EARLY_PRCTL,
        poison_offset=0x2000 + 0x100, tags=("srao", "early", "4k"),
    ),
    ScenarioSpec(
        name="srao-early-kill-sysctl-4k",
        summary="SRAO with vm.memory_failure_early_kill=1: AO arrives without a touch",
        page_kind="anon4k", npages=4, mce_kind="SRAO", trigger=Trigger.WAIT, kill=KillPolicy.EARLY_SYSCTL,
        poison_offset=0x3000 + 0x8, tags=("srao", "early", "4k"),
    ),
    ScenarioSpec(
        name="srar-user-spin-4k",
        summary="SRAR while the program spins in user mode: AR to the program, the guest survives",
        page_kind="anon4k", npages=4, mce_kind="SRAR", trigger=Trigger.SPIN, kill=KillPolicy.LATE_PRCTL,
        poison_offset=0x1000 + 0x40, tags=("srar", "user", "4k"),
    ),
    ScenarioSpec(
        name="srar-kernel-panic",
        summary="SRAR while the vCPU is in the kernel: the guest must panic (GUEST_PANICKED + serial text)",
        page_kind="anon4k", npages=4, mce_kind="SRAR", trigger=Trigger.KERNEL, kill=KillPolicy.LATE_PRCTL,
        poison_offset=0x1000, tags=("srar", "kernel", "panic"),
    ),
    ScenarioSpec(
        name="srao-free-page",
        summary="SRAO on a free page no process maps: the guest survives, recovers a free buddy page, no SIGBUS",
        page_kind="free", npages=1, mce_kind="SRAO", trigger=Trigger.NONE, kill=KillPolicy.LATE_PRCTL,
        poison_offset=0x80, tags=("srao", "free"),
    ),
    ScenarioSpec(
        name="srao-late-touch-two-4k",
        summary="SRAO on two 4 KiB pages of one mapping, late kill: two SIGBUS, each at its own touched address",
        page_kind="anon4k", npages=4, mce_kind="SRAO", trigger=Trigger.TOUCH, kill=KillPolicy.LATE_PRCTL,
        poison_offset=0x1000 + 0x80, touch_offset=0x1000 + 0x238,
        second_poison_offset=0x3000 + 0x40, second_touch_offset=0x3000 + 0x100, tags=("srao", "late", "4k", "two"),
    ),
    ScenarioSpec(
        name="srao-broadcast-smp2-4k",
        summary="SRAO broadcast to 2 vCPUs (Intel model 85): one recovery, one MEMORY_FAILURE per vCPU",
        page_kind="anon4k", npages=4, mce_kind="SRAO", trigger=Trigger.TOUCH, kill=KillPolicy.LATE_PRCTL,
        poison_offset=0x80, touch_offset=0x400, profile="tcg-smp2-broadcast", broadcast=True,
        tags=("srao", "late", "4k", "smp", "broadcast"),
    ),
    # The whole chain: the host poisons QEMU's frame behind the probe's page (needs KVM and a
    # host with memory failure: the lab host). QEMU's early kill turns it into an MCE for the guest.
    ScenarioSpec(
        name="host-ao-late-touch-4k",
        summary="host poisons the frame behind a 4 KiB guest page; QEMU forwards the AO, the guest recovers "
                "it (late kill) and the program's touch gives AR",
        page_kind="anon4k", npages=4, mce_kind="SRAO", trigger=Trigger.TOUCH, kill=KillPolicy.LATE_PRCTL,
        poison_offset=0x1000 + 0x80, touch_offset=0x1000 + 0x238, profile="kvm-default", source=Source.HOST,
        guest_mce_poll_s=1, tags=("host", "chain", "ao", "late", "4k"),
    ),
    ScenarioSpec(
        name="host-ao-early-kill-4k",
        summary="host poisons the frame behind a 4 KiB guest page; QEMU forwards the AO and the program "
                "(PR_MCE_KILL_EARLY) gets AO without a touch",
        page_kind="anon4k", npages=4, mce_kind="SRAO", trigger=Trigger.WAIT, kill=KillPolicy.EARLY_PRCTL,
        poison_offset=0x2000 + 0x100, profile="kvm-default", source=Source.HOST,
        guest_mce_poll_s=1, tags=("host", "chain", "ao", "early", "4k"),
    ),
    ScenarioSpec(
        name="host-ao-reset-4k",
        summary="host poisons the frame behind a 4 KiB guest page, the guest recovers it, then system_reset: "
                "QEMU replaces the poisoned page and the rebooted guest's kernel reads that gpa without a "
                "machine check",
        page_kind="anon4k", npages=4, mce_kind="SRAO", trigger=Trigger.TOUCH, kill=KillPolicy.LATE_PRCTL,
        poison_offset=0x2000 + 0x80, touch_offset=0x2000 + 0x10, profile="kvm-default", source=Source.HOST,
        guest_mce_poll_s=1, reset_after=True, tags=("host", "chain", "ao", "reset", "4k"),
    ),
    # Guest RAM on the host's 2 MiB hugetlb pages: a guest THP (2 MiB-aligned in guest-physical
    # memory) then lies on exactly one host huge page, so nobody but the probe uses the 2 MiB lost.
    ScenarioSpec(
        name="host-ao-hugetlb-thp",
        summary="guest RAM on the host's 2 MiB hugetlb pages: the host poisons a 4 KiB piece of the huge page "
                "behind a guest THP and loses all 2 MiB; QEMU forwards 4 KiB, so the program's touch of another "
                "piece reaches the guest as a second machine check (AR)",
        page_kind="thp", npages=1, mce_kind="SRAO", trigger=Trigger.TOUCH, kill=KillPolicy.LATE_PRCTL,
        poison_offset=0x5000 + 0x80, touch_offset=0x9000 + 0x10, profile="kvm-hugetlb", source=Source.HOST,
        guest_mce_poll_s=1, tags=("host", "chain", "ao", "hugetlb", "thp"),
    ),
    ScenarioSpec(
        name="host-ar-touch-4k",
        summary="host poisons the frame behind a 4 KiB guest page the guest does not know is bad; the "
                "program's touch makes KVM signal QEMU's vCPU thread (AR), QEMU injects an SRAR, the program "
                "gets AR and the guest survives",
        page_kind="anon4k", npages=4, mce_kind="SRAO", trigger=Trigger.TOUCH, kill=KillPolicy.LATE_PRCTL,
        poison_offset=0x1000 + 0x40, touch_offset=0x1000 + 0x300, profile="kvm-default", source=Source.HOST,
        guest_mce_poll_s=0,
        tags=("host", "chain", "ar", "4k"),
    ),
    # A software-protected VM (kvm-swprot: the project's QEMU series on a KVM with
    # KVM_SW_PROTECTED_VM, i.e. the lab host's rebuilt modules): the host makes the page private.
    ScenarioSpec(
        name="private-convert-4k",
        summary="QMP converts a 4 KiB guest page shared -> private -> shared -> private -> shared; at each step "
                "QEMU (reply, trace, its record), KVM's attributes, the host's view of the bytes and the guest's "
                "reads agree; bad requests are refused by name and the guest keeps running; a conversion that "
                "takes a page the guest needs is detected, and a reset makes every page shared again",
        page_kind="anon4k", npages=PRIVATE_NPAGES, mce_kind="", trigger=Trigger.TOUCH, kill=KillPolicy.LATE_PRCTL,
        poison_offset=0, touch_offset=0x10, profile="kvm-swprot", source=Source.CONVERSION, private=True,
        tags=("private", "conversion", "4k"),
    ),
    # The SRAR-in-user-mode shape: the one an AMD guest (the lab host's L2) recovers, as an Intel one
    # does (oracle.amd_panics); an SRAO with a late touch panics an AMD guest, private page or not.
    ScenarioSpec(
        name="private-srar-user-spin-4k",
        summary="SRAR (QMP mce) at the gpa of a 4 KiB page made private through QMP while the program spins in "
                "user mode: AR at the page's address with lsb 12 to the program, as on a shared page; the guest "
                "survives",
        page_kind="anon4k", npages=PRIVATE_NPAGES, mce_kind="SRAR", trigger=Trigger.SPIN,
        kill=KillPolicy.LATE_PRCTL, poison_offset=0x40, profile="kvm-swprot", private=True,
        tags=("private", "srar", "user", "4k"),
    ),
    ScenarioSpec(
        name="private-host-poison-touch-4k",
        summary="the host poisons the guest_memfd frame behind a 4 KiB page made private through QMP (the frame "
                "named by KVM's own fault trace); the program's touch makes KVM_RUN fail with EHWPOISON for exactly "
                "that gfn, and what QEMU does with it is reported with its version",
        page_kind="anon4k", npages=PRIVATE_NPAGES, mce_kind="SRAO", trigger=Trigger.TOUCH,
        kill=KillPolicy.LATE_PRCTL, poison_offset=0x80, touch_offset=0x238, profile="kvm-swprot",
        source=Source.HOST, private=True, tags=("private", "host", "chain", "4k"),
    ),
    ScenarioSpec(
        name="private-host-poison-mce-4k",
        summary="as private-host-poison-touch-4k, with QEMU's x-private-hwpoison-mce on (the project's series): "
                "QEMU traces the memory-fault exit and injects an SRAR at that gpa, MEMORY_FAILURE says so, the "
                "program gets AR with lsb 12 and the guest goes on",
        page_kind="anon4k", npages=PRIVATE_NPAGES, mce_kind="SRAO", trigger=Trigger.TOUCH,
        kill=KillPolicy.LATE_PRCTL, poison_offset=0x80, touch_offset=0x238, profile="kvm-swprot",
        source=Source.HOST, private=True, qemu_private_hwpoison_mce=True,
        tags=("private", "host", "chain", "mce", "4k"),
    ),
)


def scenario_names() -> tuple[str, ...]:
    return tuple(s.name for s in SCENARIOS)


def get_scenario(name: str) -> ScenarioSpec:
    for spec in SCENARIOS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown scenario {name!r}; valid: {', '.join(scenario_names())}")


def unsupported_under(spec: ScenarioSpec, profile: GuestProfile) -> str | None:
    """Why `spec` means nothing under `profile` (checked before booting), or None.

    A broadcast scenario is about every vCPU entering the MCE handler together; a profile that
    does not broadcast has a CPU QEMU refuses ``mce -b`` for ("Guest CPU does not support MCA
    broadcast") or a single vCPU, so running it there would be an ERROR that says nothing.
    """
    if spec.source is Source.HOST and profile.accel != "kvm":
        return (f"scenario {spec.name} poisons the host frame behind guest RAM and needs QEMU to forward the "
                f"SIGBUS it gets, which only KVM does; profile {profile.name} runs under {profile.accel}: run it "
                "under a KVM profile (kvm-default, kvm-gmem) on a host with memory failure, e.g. the lab host")
    if spec.source is Source.HOST and spec.page_kind == "thp" and not profile.ram_on_host_hugepages:
        return (f"scenario {spec.name} needs guest RAM on the host's 2 MiB hugetlb pages (a guest THP over one "
                f"host huge page); profile {profile.name} has ordinary RAM: run it under kvm-hugetlb")
    if spec.source is Source.HOST and spec.page_kind != "thp" and profile.ram_on_host_hugepages:
        return (f"scenario {spec.name} poisons a 4 KiB guest page, and profile {profile.name} backs guest RAM with "
                "2 MiB host pages: the other 511 pieces lost with it belong to whatever the guest put there, "
                "often its kernel, so the outcome is not set by the layout (measured: the guest panicked at its "
                "next kernel access to one of them); host-ao-hugetlb-thp is the row for this profile")
    if spec.private and not profile.host_converts:
        return (f"scenario {spec.name} makes the probe's page private through QMP (x-kvm-convert-memory), which "
                f"needs a VM whose memory the host converts; profile {profile.name} is not one: run it under "
                "kvm-swprot")
    if not spec.private and profile.host_converts:
        return (f"scenario {spec.name} is about a shared page; profile {profile.name} is a software-protected VM, "
                "whose shared pages are ordinary RAM that kvm-default covers: its rows are the private ones")
    if spec.broadcast and not profile.mce_broadcast:
        return (f"scenario {spec.name} broadcasts its MCE to every vCPU (mce -b), and profile {profile.name} "
                f"is not a broadcast profile ({profile.smp} vCPU, cpu {profile.cpu}); run it under one that is, "
                "e.g. tcg-smp2-broadcast")
    return None
