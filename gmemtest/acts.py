"""How a scenario's trigger is carried out: one small unit per (source, trigger), as a table.

This is the kernel selftests' ``FIXTURE_VARIANT { .inject = fn }`` shape. An act gets the
prepared :class:`Stage` (the probe with its mapping, the expectation, the host poison where the
row has one), arms the probe, injects, and reads the probe's reply. It records the injection on
the stage the moment it happens, so a guest that dies halfway is still judged on what reached
it. The expectation half of each trigger (which SIGBUS the program must get) is in the oracle's
table of the same name, ``oracle.SIGBUS_OF_TRIGGER``.

Adding a trigger: one function here, one row in :data:`ACTS`, one row in the oracle's table.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from gmemtest.errors import ScenarioError
from gmemtest.evidence import Evidence
from gmemtest.guest_run import GuestRun
from gmemtest.host_poison import HostInjection, HostPoison
from gmemtest.observations import Observations, hardware_corrupted_kb
from gmemtest.oracle import Expectation, HostExpectation, MappingLayout
from gmemtest.scenarios import ScenarioSpec, Source, Trigger
from guests.probe_client import Mapping, ProbeClient, SigbusReport
from host_stack import mm_uapi
from polling import poll_until
from qmp_helpers import MachineStateError, MceInjection, MceKind, VcpuState

LOG = logging.getLogger(__name__)

# Seconds the probe is told to wait or spin; the injection happens well inside this window.
PROBE_WINDOW_S = 15
# How long the guest gets to handle an action-optional MCE before the probe touches the page.
RECOVERY_TIMEOUT_S = 15.0
# How long QEMU gets to forward a host poison (its SIGBUS handler, then the MEMORY_FAILURE event).
FORWARD_TIMEOUT_S = 10.0

Injection = MceInjection | HostInjection


@dataclass
class Stage:
    """Everything an act works on: prepared by the runner, filled in by the act."""

    spec: ScenarioSpec
    guest: GuestRun
    probe: ProbeClient
    kind: MceKind
    layout: MappingLayout
    exp: Expectation
    obs: Observations
    ev: Evidence
    mapping: Mapping | None = None
    poison: HostPoison | None = None
    hexp: HostExpectation | None = None
    setup: dict[str, Any] = field(default_factory=dict)
    injection: Injection | None = None

    def need_mapping(self) -> Mapping:
        if self.mapping is None:
            raise ScenarioError(f"{self.spec.name}: trigger {self.spec.trigger.value} touches the probe's mapping, "
                                f"but page kind {self.spec.page_kind!r} has none")
        return self.mapping

    def inject_mce(self, gpa: int) -> MceInjection:
        """QMP ``mce`` at ``gpa`` into the bank the oracle expects the record in."""
        injection = self.guest.machine.inject_mce(self.kind, gpa, bank=self.exp.mce_bank,
                                                  broadcast=self.spec.broadcast)
        if self.injection is None:
            self.injection = injection
        return injection

    def inject_mce_at(self, pick: Callable[[VcpuState], bool], *, what: str) -> MceInjection:
        """QMP ``mce`` at the row's gpa once a vCPU stands where ``pick`` says (``inject_mce_at``)."""
        injection = self.guest.machine.inject_mce_at(self.kind, self.exp.poison_gpa, pick, what=what,
                                                     bank=self.exp.mce_bank, broadcast=self.spec.broadcast)
        self.injection = injection
        return injection


ActFn = Callable[[Stage], object]


@dataclass(frozen=True)
class Act:
    """How one (source, trigger) is carried out; ``run`` returns the probe's reply (or None)."""

    source: Source
    trigger: Trigger
    summary: str
    run: ActFn


# ----- what the acts wait for in the guest ------------------------------------------------------

def wait_recovery(guest: GuestRun, before_kb: int, pages: int = 1) -> None:
    """Action-optional MCEs are handled from a work queue: wait until the guest counted the pages."""
    if poll_until(lambda: hardware_corrupted_kb(guest) >= before_kb + pages * 4, timeout=RECOVERY_TIMEOUT_S,
                  interval=0.05):
        return
    LOG.warning("guest did not count %d corrupted page(s) within %.0fs; going on", pages, RECOVERY_TIMEOUT_S)


def _wait_probe_syscall(guest: GuestRun, pid: int, accept: Callable[[str], bool], *, doing: str, expected: str,
                        timeout: float = 10.0) -> None:
    """Poll the guest's /proc/PID/syscall of the probe until ``accept`` takes what it says."""
    seen = [""]

    def accepted() -> bool:
        seen[0] = guest.guest_text(f"cat /proc/{pid}/syscall").strip()
        return accept(seen[0])

    if poll_until(accepted, timeout=timeout, interval=0.02):
        return
    state = seen[0]
    raise ScenarioError(f"the probe (pid {pid}) did not {doing} within {timeout:.0f}s: "
                        f"/proc/{pid}/syscall last said {state!r}, expected {expected}")


def _wait_probe_in_user_mode(guest: GuestRun, pid: int) -> None:
    """Until the probe runs its spin loop: /proc/PID/syscall says ``running`` in user mode."""
    _wait_probe_syscall(guest, pid, lambda state: state == "running", doing="start spinning", expected="'running'")


_SLEEP_SYSCALLS = (str(mm_uapi.SYS_CLOCK_NANOSLEEP), str(mm_uapi.SYS_NANOSLEEP))


def _wait_probe_sleeping(guest: GuestRun, pid: int) -> None:
    """Until the probe sleeps in its 'wait' (clock_nanosleep in /proc/PID/syscall).

    Injecting right after sending 'wait' raced the probe's read of the command: in restored
    guests (cold code) the AO often arrived while the probe was still idle, so the wait then ran
    its whole window (15 s) after the signal. The window must start before the injection.
    """
    _wait_probe_syscall(guest, pid, lambda state: state.split(" ", 1)[0] in _SLEEP_SYSCALLS,
                        doing="sleep in its wait",
                        expected=f"syscall {mm_uapi.SYS_CLOCK_NANOSLEEP} (clock_nanosleep) or {mm_uapi.SYS_NANOSLEEP}")


@dataclass(frozen=True)
class ProbeCode:
    """The probe's executable mappings (its text and the vDSO it reads the clock through)."""

    ranges: tuple[tuple[int, int, str], ...]

    def holds(self, rip: int) -> bool:
        return any(start <= rip < end for start, end, _ in self.ranges)

    def __str__(self) -> str:
        return ", ".join(f"{name} {start:#x}-{end:#x}" for start, end, name in self.ranges)


def parse_probe_code(maps: str) -> ProbeCode:
    """The executable (``r-xp``) lines of a /proc/PID/maps text."""
    ranges: list[tuple[int, int, str]] = []
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) >= 2 and "x" in fields[1]:
            start, end = (int(v, 16) for v in fields[0].split("-"))
            ranges.append((start, end, fields[5] if len(fields) > 5 else "anonymous"))
    if not ranges:
        raise ScenarioError(f"no executable mapping in the probe's /proc/PID/maps: {maps[:300]!r}")
    return ProbeCode(tuple(ranges))


def guest_panicked(guest: GuestRun) -> str | None:
    """Why waiting on the guest is pointless, or None while it has not panicked."""
    if any(e.name == "GUEST_PANICKED" for e in guest.machine.events):
        return "the guest panicked (QMP GUEST_PANICKED)"
    return None


def _await_reply_or_panic(st: Stage, *, timeout: float) -> None:
    """Wait until the probe has something to say, or the guest panicked instead.

    Polling both keeps the host-side injection-to-SIGBUS time honest (the reply is read as soon
    as it arrives) and ends the wait at once when the guest panics: the injection landed where
    the row says (``inject_mce_at``), so a panic is the guest's answer, judged like any other.
    """
    assert st.injection is not None
    mark = st.injection.event_mark
    poll_until(lambda: st.probe.has_output() or any(e.name == "GUEST_PANICKED" for e in st.guest.machine.events[mark:]),
               timeout=timeout, interval=0.002)


def _check_intact(st: Stage, mapping: Mapping) -> None:
    """Read one byte of every piece that must have survived; record the ones that did not."""
    for offset in st.exp.intact_offsets:
        reply = st.probe.touch(mapping.id, offset)
        st.obs.intact_checked += 1
        if isinstance(reply, SigbusReport):
            st.obs.intact_mismatches.append(f"offset {offset:#x}: SIGBUS (si_addr {reply.si_addr:#x})")
        elif reply.value != mapping.expected_value(offset):
            st.obs.intact_mismatches.append(f"offset {offset:#x}: read {reply.value:#04x}, "
                                            f"pattern {mapping.expected_value(offset):#04x}")


def _begin_wait(st: Stage) -> None:
    st.probe.begin_wait(PROBE_WINDOW_S)
    _wait_probe_sleeping(st.guest, st.probe.pid)


def _before_kb(st: Stage) -> int:
    return st.obs.hardware_corrupted_before_kb or 0


# ----- QEMU's `mce` command puts the machine check into the guest -------------------------------

def _qmp_touch(st: Stage) -> object:
    """Late kill: inject (one page at a time), let the guest recover, then the probe touches."""
    mapping = st.need_mapping()
    assert st.spec.touch_offset is not None
    st.inject_mce(st.exp.poison_gpa)
    more: list[MceInjection] = []
    for n, (gpa, _) in enumerate(st.exp.more_poison, start=1):
        # One MCE at a time: a second one while the guest still handles the first
        # (MCG_STATUS.MCIP set) is recursive, and QEMU resets the guest (measured:
        # MEMORY_FAILURE action 'reset', then RESET).
        wait_recovery(st.guest, _before_kb(st), pages=n)
        more.append(st.inject_mce(gpa))
    if more:
        st.ev.json("injection-more.json", [asdict(m) for m in more])
    wait_recovery(st.guest, _before_kb(st), pages=1 + len(more))
    reply = st.probe.touch(mapping.id, st.spec.touch_offset)
    if st.spec.second_touch_offset is not None:
        st.probe.touch(mapping.id, st.spec.second_touch_offset)
    _check_intact(st, mapping)
    return reply


def _qmp_wait(st: Stage) -> object:
    """Early kill: the probe sleeps, the AO arrives, the kernel signals without a touch."""
    _begin_wait(st)
    st.inject_mce(st.exp.poison_gpa)
    return st.probe.finish_wait(PROBE_WINDOW_S + 10)


def _qmp_spin(st: Stage) -> object:
    """SRAR while the probe's own loop runs on the vCPU that takes it."""
    code = parse_probe_code(st.guest.guest_text(f"cat /proc/{st.probe.pid}/maps"))
    st.probe.begin_spin(PROBE_WINDOW_S)
    _wait_probe_in_user_mode(st.guest, st.probe.pid)
    # The SRAR must interrupt the probe's own loop, on the vCPU that runs it: landed in the
    # kernel the guest panics (with 2 vCPUs: always, in native_safe_halt), landed in another
    # program (sshd finishing the last command) nobody that maps the page is signalled (CI saw
    # that: sigbus count 0). So the VM is stopped until a vCPU is there.
    st.inject_mce_at(lambda state: state.cpl == 3 and code.holds(state.rip),
                     what=f"in the probe's user-mode code ({code})")
    _await_reply_or_panic(st, timeout=PROBE_WINDOW_S + 10)
    return st.probe.finish_spin(PROBE_WINDOW_S + 10)


def _qmp_none(st: Stage) -> object:
    """Nobody maps the page: the guest kernel handles it alone."""
    st.inject_mce(st.exp.poison_gpa)
    wait_recovery(st.guest, _before_kb(st))
    return None


def _qmp_kernel(st: Stage) -> object:
    """SRAR while the vCPU is in the kernel: the oracle's panic assumes it, so it is made so."""
    st.inject_mce_at(lambda state: state.cpl == 0, what="in the kernel (CPL 0)")
    return None


def _qmp_where_fatal(st: Stage) -> object:
    """The oracle says this guest cannot recover here (an AMD vCPU idling in the kernel).

    Inject as the row says, then only watch the panic.
    """
    if st.spec.trigger is Trigger.WAIT:
        _begin_wait(st)
    st.inject_mce_at(lambda state: state.cpl == 0, what="in the kernel (CPL 0), where the oracle grades it fatal")
    return None


# ----- the host kernel poisons the frame behind the gpa; QEMU forwards what it gets ----------

def _host_poison(st: Stage) -> tuple[HostPoison, HostExpectation]:
    if st.poison is None or st.hexp is None:
        raise ScenarioError(f"{st.spec.name}: a host-poison act needs the host frame resolved and held")
    return st.poison, st.hexp


def _host_inject(st: Stage, poison: HostPoison) -> HostInjection:
    injection = poison.inject()
    st.injection = injection
    return injection


def _host_wait(st: Stage) -> object:
    """Early kill through the whole chain: the probe sleeps while the host frame is poisoned."""
    poison, hexp = _host_poison(st)
    _begin_wait(st)
    _host_inject(st, poison)
    reply = st.probe.finish_wait(PROBE_WINDOW_S + 10)
    poison.wait_qemu_sigbus(len(hexp.qemu_sigbus), FORWARD_TIMEOUT_S)
    return reply


def _host_touch(st: Stage) -> object:
    """Poison the host frame, wait until QEMU forwarded the AO, then the probe touches."""
    poison, hexp = _host_poison(st)
    mapping = st.need_mapping()
    assert st.spec.touch_offset is not None
    injection = _host_inject(st, poison)
    # The touch must come after QEMU forwarded the AO: before it, the guest's access would race
    # QEMU's handler for the same frame.
    poison.wait_qemu_sigbus(1, FORWARD_TIMEOUT_S)
    with contextlib.suppress(MachineStateError, TimeoutError):
        st.guest.machine.wait_event("MEMORY_FAILURE", timeout=FORWARD_TIMEOUT_S, since=injection.event_mark)
    if hexp.guest_recovers_first:
        wait_recovery(st.guest, _before_kb(st))
    reply = st.probe.touch(mapping.id, st.spec.touch_offset)
    poison.wait_qemu_sigbus(len(hexp.qemu_sigbus), FORWARD_TIMEOUT_S)
    return reply


ACTS: dict[tuple[Source, Trigger], Act] = {
    (act.source, act.trigger): act for act in (
        Act(Source.QMP, Trigger.TOUCH, "inject, wait for the guest's recovery, then the probe touches", _qmp_touch),
        Act(Source.QMP, Trigger.WAIT, "the probe sleeps; the AO arrives during its wait", _qmp_wait),
        Act(Source.QMP, Trigger.SPIN, "SRAR landed in the probe's own user-mode loop", _qmp_spin),
        Act(Source.QMP, Trigger.NONE, "inject on a free page; the guest kernel recovers alone", _qmp_none),
        Act(Source.QMP, Trigger.KERNEL, "SRAR landed while the vCPU is in the kernel", _qmp_kernel),
        Act(Source.HOST, Trigger.TOUCH, "poison the host frame, QEMU forwards, then the probe touches", _host_touch),
        Act(Source.HOST, Trigger.WAIT, "the probe sleeps while the host frame is poisoned", _host_wait),
    )
}
# Where the oracle grades the row fatal although the row itself does not ask for a panic.
WHERE_FATAL = Act(Source.QMP, Trigger.KERNEL, "inject where the oracle grades it fatal; watch the panic",
                  _qmp_where_fatal)

_KNOWN = ", ".join(f"{s.value}/{t.value}" for s, t in ACTS)


def act_for(spec: ScenarioSpec, exp: Expectation) -> Act:
    """The act that carries out ``spec`` against what the oracle expects of it."""
    if spec.source is Source.QMP and exp.panic and not spec.expects_panic:
        return WHERE_FATAL
    act = ACTS.get((spec.source, spec.trigger))
    if act is None:
        raise ScenarioError(f"{spec.name}: no act for source {spec.source.value!r} with trigger "
                            f"{spec.trigger.value!r}; the acts are {_KNOWN}")
    return act


def act_name(act: Act) -> str:
    """The act's unit name, e.g. ``host_touch``: which unit carried the row out (setup.json, logs)."""
    return act.run.__name__.lstrip("_")
