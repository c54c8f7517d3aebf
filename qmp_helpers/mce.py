"""Named machine-check kinds as data, and the record of one injection.

Values are those QEMU itself injects when it forwards a host SIGBUS to the guest
(target/i386/kvm/kvm.c, ``kvm_mce_inject``), written with the bit names of the Intel SDM
vol. 3B ch. 16 (IA32_MCi_STATUS / IA32_MCG_STATUS):

MCi_STATUS bits: VAL 63, OVER 62, UC 61, EN 60, MISCV 59, ADDRV 58, PCC 57, S 56, AR 55;
the low 16 bits are the MCA error code (0x00c0: memory scrubbing; 0x0134: data load).
MCG_STATUS bits: RIPV 0, EIPV 1, MCIP 2.
MCi_MISC 0x8c: address mode 2 (physical) in bits 8:6, LSB of the address = 12 (bits 5:0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .vcpu_state import VcpuState

MCI_STATUS_VAL = 1 << 63
MCI_STATUS_OVER = 1 << 62
MCI_STATUS_UC = 1 << 61
MCI_STATUS_EN = 1 << 60
MCI_STATUS_MISCV = 1 << 59
MCI_STATUS_ADDRV = 1 << 58
MCI_STATUS_PCC = 1 << 57
MCI_STATUS_S = 1 << 56
MCI_STATUS_AR = 1 << 55
# AMD's MCA_STATUS (APM vol. 2, 9.3): Deferred 44 (uncorrected, not consumed yet), Poison 43.
MCI_STATUS_DEFERRED = 1 << 44
MCI_STATUS_POISON = 1 << 43

MCG_STATUS_RIPV = 1 << 0
MCG_STATUS_EIPV = 1 << 1
MCG_STATUS_MCIP = 1 << 2

MCA_CODE_SCRUB = 0x00C0
MCA_CODE_DATA_LOAD = 0x0134
MCM_ADDR_PHYS = 2
MCI_MISC_PHYS_LSB12 = (MCM_ADDR_PHYS << 6) | 12

# QEMU's TCG/KVM x86 CPUs expose MCE_BANKS_DEF = 10 banks (target/i386/cpu.h; MCG_CAP
# 0x100010a measured in the guest): bank 9 is the last valid one, bank 10 is refused.
MCE_BANKS = 10

_UC_SIGNALED = (MCI_STATUS_VAL | MCI_STATUS_UC | MCI_STATUS_EN
                | MCI_STATUS_MISCV | MCI_STATUS_ADDRV | MCI_STATUS_S)


@dataclass(frozen=True)
class MceKind:
    """One kind of machine check: the three register values ``mce`` needs besides addr."""

    name: str
    status: int
    mcg_status: int
    misc: int
    description: str


MCE_KINDS: dict[str, MceKind] = {
    kind.name: kind
    for kind in (
        MceKind("SRAO", _UC_SIGNALED | MCA_CODE_SCRUB,
                MCG_STATUS_MCIP | MCG_STATUS_RIPV, MCI_MISC_PHYS_LSB12,
                "software recoverable, action optional (patrol scrub found the error)"),
        MceKind("SRAR", _UC_SIGNALED | MCI_STATUS_AR | MCA_CODE_DATA_LOAD,
                MCG_STATUS_MCIP | MCG_STATUS_EIPV | MCG_STATUS_RIPV, MCI_MISC_PHYS_LSB12,
                "software recoverable, action required (data load consumed poison)"),
    )
}


@dataclass(frozen=True)
class ForwardedMce:
    """What QEMU puts into bank 9 when it forwards a host SIGBUS (``kvm_mce_inject``, QEMU >= 10.0).

    ``raises_mc``: an uncorrected status raises #MC; AMD's deferred one (the action-optional
    case) is only written to the bank, where the guest finds it when it polls the banks.
    ``status`` is before QEMU's overflow rule: OVER is added when bank 9 still holds a valid
    record (target/i386/helper.c ``do_inject_x86_mce``).
    """

    code: str  # "BUS_MCEERR_AO" or "BUS_MCEERR_AR"
    status: int
    mcg_status: int
    misc: int
    raises_mc: bool

    @property
    def action_required(self) -> bool:
        """The MEMORY_FAILURE event's 'action-required' flag: QEMU reads the AR bit of the status."""
        return bool(self.status & MCI_STATUS_AR)


FORWARDED_CODES = ("BUS_MCEERR_AO", "BUS_MCEERR_AR")


def forwarded_mce(code: str, *, amd: bool) -> ForwardedMce:
    """QEMU's encoding of a forwarded SIGBUS ``code`` for an Intel (``amd=False``) or AMD guest vCPU."""
    if code not in FORWARDED_CODES:
        raise ValueError(f"unknown SIGBUS code {code!r} for a forwarded MCE; valid: {', '.join(FORWARDED_CODES)}")
    base = MCI_STATUS_VAL | MCI_STATUS_EN | MCI_STATUS_MISCV | MCI_STATUS_ADDRV
    ar = code == "BUS_MCEERR_AR"
    mcg = MCG_STATUS_MCIP | MCG_STATUS_RIPV | (MCG_STATUS_EIPV if ar else 0)
    if amd:
        status = base | MCI_STATUS_POISON | (MCI_STATUS_UC if ar else MCI_STATUS_DEFERRED)
        return ForwardedMce(code, status, mcg, MCI_MISC_PHYS_LSB12, raises_mc=ar)
    status = base | MCI_STATUS_S | MCI_STATUS_UC | (MCI_STATUS_AR | MCA_CODE_DATA_LOAD if ar else MCA_CODE_SCRUB)
    return ForwardedMce(code, status, mcg, MCI_MISC_PHYS_LSB12, raises_mc=True)


# target/i386/kvm/kvm.c kvm_arch_on_sigbus_vcpu: error_report (AR) / warn_report (AO).
_FORWARDED_LINE = re.compile(r"Guest MCE Memory Error at QEMU addr (0x[0-9a-fA-F]+|\(nil\)) and GUEST addr "
                             r"(0x[0-9a-fA-F]+) of type (BUS_MCEERR_A[OR]) injected")


@dataclass(frozen=True)
class ForwardedLine:
    """One "Guest MCE Memory Error at QEMU addr ... injected" line of QEMU's stderr."""

    code: str
    hva: int
    gpa: int


def parse_forwarded_lines(stderr: str) -> list[ForwardedLine]:
    """Pure: every forwarded-MCE line in QEMU's stderr, in order."""
    return [ForwardedLine(m.group(3), 0 if m.group(1) == "(nil)" else int(m.group(1), 16), int(m.group(2), 16))
            for m in _FORWARDED_LINE.finditer(stderr)]


def mce_kind(name: str) -> MceKind:
    """Look a kind up by name (case-insensitive)."""
    kind = MCE_KINDS.get(name.upper())
    if kind is None:
        raise ValueError(f"unknown MCE kind {name!r}; valid kinds: {', '.join(MCE_KINDS)}")
    return kind


def mce_command_line(kind: MceKind, gpa: int, cpu: int, bank: int, broadcast: bool) -> str:
    """The HMP ``mce [-b] cpu bank status mcg_status addr misc`` line."""
    flag = "-b " if broadcast else ""
    return (f"mce {flag}{cpu} {bank} {kind.status:#x} {kind.mcg_status:#x} "
            f"{gpa:#x} {kind.misc:#x}")


@dataclass(frozen=True)
class MceInjection:
    """What was injected and when: the evidence a verdict needs about the injection.

    ``t_mono_before``/``t_mono_after`` bracket the HMP command (``time.monotonic()``);
    ``event_mark`` is the event-log mark taken before it, to wait for MEMORY_FAILURE
    without a race. ``guest_reset`` is True when QEMU answered that it raised a triple
    fault instead of delivering #MC (guest CR4.MCE clear or an MCE already in progress).
    ``landing`` is the vCPU state the #MC interrupted when the injection was made into a
    stopped VM at a checked position (``QemuMachine.inject_mce_at``), found at stop number
    ``landing_tries``, after the stops that found no vCPU there (``landing_skipped``: where the
    vCPUs were); None for an injection into a running VM (it lands wherever the vCPU is).
    """

    kind: MceKind
    gpa: int
    cpu: int
    bank: int
    broadcast: bool
    command_line: str
    monitor_text: str
    t_mono_before: float
    t_mono_after: float
    event_mark: int
    landing: VcpuState | None = None
    landing_tries: int = 0
    landing_skipped: tuple[str, ...] = ()

    @property
    def guest_reset(self) -> bool:
        """QEMU reset the guest instead of delivering the machine check."""
        return "raising triple fault" in self.monitor_text
