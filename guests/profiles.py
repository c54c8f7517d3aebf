"""Guest profiles: the QEMU arguments of each guest flavour, as data.

A profile owns the machine, CPU model, SMP, memory, firmware and kernel command line,
because those are exactly the conditions that decide between a recovered page and a guest
panic (an AMD CPU model takes the AMD MCE path, two vCPUs need broadcast MCEs with an Intel
model >= 14, ``panic=0`` plus ``-action panic=none`` keeps the panic text on the console).
The QEMU process owner adds QMP, serial and networking; a caller adds a kernel argument only
for one run (``extra_kernel_args``, e.g. the lab host's ``gmemtest.hold=N``).

``requirements`` names the capabilities a profile needs, so a runner can probe them and
cancel with a reason instead of failing: ``kvm_boots_linux`` (a KVM that really runs a
Linux guest), ``sev_snp_host``, ``tdx_host`` and ``qemu:<object-or-property>`` for features
of the QEMU binary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Final

__all__ = [
    "DEFAULT_OVMF",
    "PROFILES",
    "QBOOT_FIRMWARE",
    "GuestProfile",
    "get_profile",
    "kvm_gmem_profile",
    "kvm_sev_snp_profile",
    "kvm_swprot_profile",
    "kvm_tdx_profile",
    "labhost_svm_profile",
    "profile_names",
]

# Debian 12's ovmf package (2022.11); lab hosts pass their own SNP/TDX-capable build.
DEFAULT_OVMF: Final[Path] = Path("/usr/share/ovmf/OVMF.fd")
# How a TCG guest boots fast (each saving a median of 3 boots, launch -> first SSH command, on the
# 2-core development machine, python -m images.measure_boot; the start was 5.1 s with the bzImage
# and SeaBIOS). The image boots the uncompressed PVH vmlinux (5.1 s -> 2.6 s, images/vmlinux.py)
# from an uncompressed initramfs (0.3 s less than gzip). Machine q35 boots 0.15 s faster than pc.
# qboot (Debian's qemu-system-data) hands a direct-boot kernel over at once: 2.15 s -> 1.93 s
# against SeaBIOS, which spends ~0.25 s before handing over to the PVH option ROM. Only for
# profiles that boot a plain kernel; confidential profiles need OVMF and own their firmware.
QBOOT_FIRMWARE: Final[Path] = Path("/usr/share/qemu/qboot.rom")

# Every kernel argument of a guest (a profile owns them all; the image adds none).
# Conditions for a recoverable MCE in the guest (FACTS: generic kernel, Intel vendor,
# panic kept on the console); hugepages for the hugetlb2m probe kind; then a fast boot under
# TCG (each saving a median of 3 boots with images.measure_boot).
BASE_KERNEL_ARGS: Final[tuple[str, ...]] = (
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
# Legacy virtio-net (port I/O doorbell) for KVM guests. Inside the lab host (nested SVM under
# TCG, KVM 7.3.4), with the modern device (MMIO doorbell) the guest's KVM stopped at boot with
# "KVM internal error. Suberror: 3" on 7 of 20 first boots (11 of 27 boots in all); with
# disable-modern=on, on 0 of 10. The memory-failure paths under test do not involve the NIC.
KVM_NIC_OPTIONS: Final[tuple[str, ...]] = ("disable-modern=on",)
# pvpanic turns a guest panic into a GUEST_PANICKED QMP event; panic=none keeps the guest
# (and the panic text on the serial console) instead of pausing or exiting.
PANIC_ARGS: Final[tuple[str, ...]] = ("-device", "pvpanic", "-action", "panic=none")


@dataclass(frozen=True)
class GuestProfile:
    """How to run one guest flavour; everything but QMP, serial and netdev."""

    name: str
    accel: str
    machine: str
    cpu: str
    smp: int
    memory_mib: int
    kernel_args: tuple[str, ...]
    extra_args: tuple[str, ...] = ()
    requirements: tuple[str, ...] = ()
    firmware: Path | None = None
    description: str = ""
    # Options appended to the -machine argument (e.g. confidential-guest-support=sev0).
    machine_options: tuple[str, ...] = field(default=())
    # Every MCE must go to all vCPUs (mce -b): an Intel model >= 14 with more than one vCPU
    # waits in the kernel's rendezvous for the others and panics ("Not all CPUs entered
    # broadcast exception handler") when only one vCPU gets it.
    mce_broadcast: bool = False
    # Whether a booted guest of this profile may be saved once and restored per test
    # (gmemtest.snapshots). False where migration cannot carry the guest: confidential
    # guests (SNP/TDX state lives in the firmware/TDX module), guest_memfd-backed RAM, and
    # the lab host (its nested SVM state is a separate question, see the snapshot notes).
    restorable: bool = True
    # Guest RAM is backed by the host's 2 MiB hugetlb pages: one host poison takes 2 MiB of it.
    ram_on_host_hugepages: bool = False
    # QEMU backs guest RAM with a guest_memfd: KVM's memslots for it carry a guest_memfd (the
    # confidential profiles' private memory, and kvm-gmem's RAM).
    ram_guest_memfd: bool = False
    # Pages become private only when the host converts them through QMP (x-kvm-convert-memory):
    # the guest never converts (kvm-swprot). SEV-SNP and TDX guests convert as they like.
    host_converts: bool = False

    @property
    def confidential(self) -> bool:
        """A confidential VM (SEV-SNP, TDX, a software-protected VM): it has private memory."""
        return any(o.startswith("confidential-guest-support=") for o in self.machine_options)

    @property
    def guest_converts(self) -> bool:
        """The guest converts memory on its own (SEV-SNP, TDX): a run cannot say which conversions to expect."""
        return self.confidential and not self.host_converts
    # Properties of the guest's NIC (the SSH forward's virtio-net-pci, added by the QEMU owner).
    nic_options: tuple[str, ...] = ()
    # Properties of the accelerator (-accel kvm,<options>), e.g. x-private-hwpoison-mce=on.
    accel_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.accel not in ("tcg", "kvm"):
            raise ValueError(f"profile {self.name!r}: accel must be 'tcg' or 'kvm', got {self.accel!r}")
        if self.smp < 1:
            raise ValueError(f"profile {self.name!r}: smp must be >= 1, got {self.smp}")
        if self.memory_mib < 64:
            raise ValueError(f"profile {self.name!r}: memory_mib must be >= 64, got {self.memory_mib}")

    def machine_arg(self) -> str:
        return ",".join((self.machine, *self.machine_options))

    def kernel_cmdline(self, extra_kernel_args: str | Sequence[str] = ()) -> str:
        """The profile's kernel arguments plus ``extra_kernel_args``, exact duplicates dropped."""
        extra = extra_kernel_args.split() if isinstance(extra_kernel_args, str) else list(extra_kernel_args)
        seen: set[str] = set()
        words: list[str] = []
        for word in (*self.kernel_args, *extra):
            if word not in seen:
                seen.add(word)
                words.append(word)
        return " ".join(words)

    def qemu_args(self, kernel: Path, initrd: Path, *,
                  extra_kernel_args: str | Sequence[str] = ()) -> list[str]:
        """QEMU arguments for this profile booting ``kernel`` + ``initrd`` directly."""
        args = [
            "-accel", ",".join((self.accel, *self.accel_options)),
            "-machine", self.machine_arg(),
            "-cpu", self.cpu,
            "-smp", str(self.smp),
            "-m", str(self.memory_mib),
        ]
        if self.firmware is not None:
            args += ["-bios", str(self.firmware)]
        args += [
            "-kernel", str(kernel),
            "-initrd", str(initrd),
            "-append", self.kernel_cmdline(extra_kernel_args),
            *self.extra_args,
        ]
        return args


def kvm_gmem_profile(memory_mib: int = 1024) -> GuestProfile:
    """KVM guest whose RAM is a guest_memfd, mapped and shared from creation (upstream QEMU 11.2's
    ``memory-backend-memfd,guest-memfd=on``; the project's QEMU series gives 10.2 the same).

    No Debian QEMU (10.0.2, 11.1.3) has the property; a runner checks the ``qemu:guest-memfd``
    requirement through QOM before launching this profile. RAM on guest_memfd cannot be restored
    from a snapshot, so every guest of this profile boots.
    """
    return GuestProfile(
        name="kvm-gmem", accel="kvm", machine="q35", cpu="host", smp=1, memory_mib=memory_mib,
        kernel_args=BASE_KERNEL_ARGS, firmware=QBOOT_FIRMWARE,
        machine_options=("memory-backend=ram0",),
        extra_args=(
            "-object", f"memory-backend-memfd,id=ram0,size={memory_mib}M,share=on,guest-memfd=on",
            *PANIC_ARGS,
        ),
        requirements=("kvm_boots_linux", "qemu:guest-memfd"), restorable=False, nic_options=KVM_NIC_OPTIONS,
        ram_guest_memfd=True,
        description="KVM guest with guest_memfd-backed RAM (needs the QEMU guest-memfd series)",
    )


def kvm_swprot_profile(memory_mib: int = 512) -> GuestProfile:
    """A confidential-style guest without hardware protection: a ``KVM_X86_SW_PROTECTED_VM`` (type 1)
    whose RAM has a guest_memfd beside its memfd, through the project's QEMU series
    (``-object x-sw-protected-vm``, images/patches/qemu).

    RAM starts shared, so qboot and the direct-boot kernel run as in any VM; a page is private only
    after ``x-kvm-convert-memory`` makes it so, and a reset makes every page shared again. Needs
    KVM with VM type 1 (``CONFIG_KVM_SW_PROTECTED_VM``: the lab host's rebuilt modules) and a QEMU
    that has the object; SMM is off (KVM has none for this VM type). The NIC is the profiles'
    legacy virtio one: the object, unlike SEV and TDX, does not force ``iommu_platform``.
    """
    return GuestProfile(
        name="kvm-swprot", accel="kvm", machine="q35", cpu="host", smp=1, memory_mib=memory_mib,
        kernel_args=BASE_KERNEL_ARGS, firmware=QBOOT_FIRMWARE,
        machine_options=("confidential-guest-support=swp0", "memory-backend=ram0"),
        extra_args=(
            "-object", "x-sw-protected-vm,id=swp0",
            "-object", f"memory-backend-memfd,id=ram0,size={memory_mib}M,share=on",
            *PANIC_ARGS,
        ),
        requirements=("kvm_boots_linux", "sw_protected_vm", "qemu:x-sw-protected-vm", "qemu:x-kvm-convert-memory"),
        restorable=False,
        nic_options=KVM_NIC_OPTIONS, ram_guest_memfd=True, host_converts=True,
        description="software-protected KVM guest (VM type 1): RAM on guest_memfd, starting shared; "
                    "conversions via QMP (needs the QEMU series and a KVM with KVM_SW_PROTECTED_VM)",
    )


def kvm_hugetlb_profile(memory_mib: int = 512) -> GuestProfile:
    """KVM guest whose RAM is 2 MiB hugetlb pages of the host (a hugetlb memfd, share=on, preallocated).

    The host's huge pages must be reserved beforehand (``vm.nr_hugepages``); the requirement
    ``hugepages_2m:N`` says how many must be free. A host poison then takes a whole 2 MiB page
    of guest RAM at once, and QEMU's SIGBUS says so (lsb 21) on the action-optional path.
    """
    return GuestProfile(
        name="kvm-hugetlb", accel="kvm", machine="q35", cpu="host", smp=1, memory_mib=memory_mib,
        kernel_args=BASE_KERNEL_ARGS, firmware=QBOOT_FIRMWARE,
        machine_options=("memory-backend=ram0",),
        extra_args=(
            "-object", f"memory-backend-memfd,id=ram0,size={memory_mib}M,hugetlb=on,hugetlbsize=2M,share=on,"
                       "prealloc=on",
            *PANIC_ARGS,
        ),
        requirements=("kvm_boots_linux", f"hugepages_2m:{memory_mib // 2}"), nic_options=KVM_NIC_OPTIONS,
        ram_on_host_hugepages=True, description="KVM guest with its RAM on the host's 2 MiB hugetlb pages",
    )


def kvm_sev_snp_profile(firmware: Path = DEFAULT_OVMF, memory_mib: int = 1024,
                        policy: int = 0x30000, cbitpos: int = 51,
                        reduced_phys_bits: int = 1) -> GuestProfile:
    """SEV-SNP guest (QEMU docs/system/i386/amd-memory-encryption.rst, "Launching (SEV-SNP)").

    Memory comes from a memfd backend because QEMU backs SNP private memory with
    guest_memfd next to it; kernel-hashes=on lets OVMF measure the direct-boot kernel.
    """
    return GuestProfile(
        name="kvm-sev-snp", accel="kvm", machine="q35", cpu="EPYC-v4", smp=1,
        memory_mib=memory_mib, kernel_args=BASE_KERNEL_ARGS, firmware=firmware,
        machine_options=("confidential-guest-support=sev0", "memory-backend=ram0"),
        extra_args=(
            "-object", f"memory-backend-memfd,id=ram0,size={memory_mib}M,share=true,"
                       "prealloc=false,reserve=false",
            "-object", f"sev-snp-guest,id=sev0,cbitpos={cbitpos},"
                       f"reduced-phys-bits={reduced_phys_bits},policy={policy:#x},kernel-hashes=on",
            *PANIC_ARGS,
        ),
        requirements=("kvm_boots_linux", "sev_snp_host", "qemu:sev-snp-guest"), restorable=False,
        ram_guest_memfd=True,
        description="AMD SEV-SNP confidential guest (lab hosts only)",
    )


def kvm_tdx_profile(firmware: Path = DEFAULT_OVMF, memory_mib: int = 1024) -> GuestProfile:
    """Intel TDX guest (QEMU >= 10.1, docs/system/i386/tdx.rst): split irqchip is mandatory."""
    return GuestProfile(
        name="kvm-tdx", accel="kvm", machine="q35", cpu="host", smp=1, memory_mib=memory_mib,
        kernel_args=BASE_KERNEL_ARGS, firmware=firmware,
        machine_options=("kernel-irqchip=split", "confidential-guest-support=tdx0"),
        extra_args=("-object", "tdx-guest,id=tdx0", *PANIC_ARGS),
        requirements=("kvm_boots_linux", "tdx_host", "qemu:tdx-guest"), restorable=False, ram_guest_memfd=True,
        description="Intel TDX confidential guest (lab hosts only)",
    )


# The lab host reserves, at boot, the 2 MiB pages one kvm-hugetlb guest (512 MiB) needs.
LABHOST_HUGEPAGES_2M: Final = 256


def labhost_svm_profile(memory_mib: int = 3072, smp: int = 2) -> GuestProfile:
    """The lab host in a box (FACTS section 5): an L1 KVM host under TCG.

    ``-cpu max`` under TCG is AuthenticAMD with svm and npt, so the L1 kernel's kvm_amd
    runs nested guests; TCG has no VMX. Two vCPUs because one vCPU froze L1 for good in
    7 of 18 runs that started a nested guest. ``-no-reboot`` turns an L1 panic
    (``panic=-1``) into QEMU exiting, which the runner sees at once instead of waiting
    for a deadline. The runner adds the 9p shares and the command-output serial port.
    """
    return GuestProfile(
        name="labhost-svm", accel="tcg", machine="q35", cpu="max", smp=smp,
        memory_mib=memory_mib, kernel_args=("console=ttyS0", "panic=-1", "loglevel=4",
                                            f"hugepages={LABHOST_HUGEPAGES_2M}"),
        extra_args=("-nodefaults", "-no-reboot"), restorable=False,
        description="TCG, AMD SVM+NPT, 2 vCPUs, 3 GiB (512 MiB of it 2 MiB huge pages for one kvm-hugetlb "
                    "guest): a nested KVM host with memory failure",
    )


def _builtin_profiles() -> dict[str, GuestProfile]:
    tcg_default = GuestProfile(
        name="tcg-default", accel="tcg", machine="q35", cpu="max,vendor=GenuineIntel", smp=1,
        memory_mib=512, kernel_args=BASE_KERNEL_ARGS, extra_args=PANIC_ARGS, firmware=QBOOT_FIRMWARE,
        description="TCG, 1 vCPU, Intel vendor: the guest recovers from SRAO/SRAR in user pages",
    )
    profiles = [
        tcg_default,
        replace(
            tcg_default, name="tcg-smp2-broadcast", smp=2,
            cpu="max,vendor=GenuineIntel,family=6,model=85", mce_broadcast=True,
            description="TCG, 2 vCPUs, Intel model 85 (>= 14): MCEs must be broadcast (mce -b)",
        ),
        GuestProfile(
            name="kvm-default", accel="kvm", machine="q35", cpu="host", smp=1, memory_mib=512,
            kernel_args=BASE_KERNEL_ARGS, extra_args=PANIC_ARGS, firmware=QBOOT_FIRMWARE,
            requirements=("kvm_boots_linux",), nic_options=KVM_NIC_OPTIONS,
            description="KVM with the host CPU model",
        ),
        kvm_gmem_profile(),
        kvm_swprot_profile(),
        kvm_hugetlb_profile(),
        kvm_sev_snp_profile(),
        kvm_tdx_profile(),
        labhost_svm_profile(),
    ]
    return {p.name: p for p in profiles}


PROFILES: Final[Mapping[str, GuestProfile]] = MappingProxyType(_builtin_profiles())


def profile_names() -> tuple[str, ...]:
    return tuple(PROFILES)


def get_profile(name: str) -> GuestProfile:
    """The built-in profile called ``name``; ValueError naming the valid ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown guest profile {name!r}; valid: {', '.join(PROFILES)}"
        ) from None
