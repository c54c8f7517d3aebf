"""Run one scenario on a booted guest: prepare -> act -> observe -> judge, keeping evidence.

The order is symmetric with the kernel's memory-failure selftest: the probe maps and reports the
layout, the oracle derives the expectation from that layout, the row's act (``gmemtest.acts``)
injects, and only then are the observers read. Every file written lands in the scenario's
evidence directory.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from gmemtest.acts import (
    Injection,
    Stage,
    act_for,
    act_name,
    guest_panicked,
)
from gmemtest.conversion_oracle import step_checks
from gmemtest.conversion_row import run_conversion_row
from gmemtest.errors import ScenarioError
from gmemtest.evidence import Evidence, set_aside
from gmemtest.guest_run import GuestRun, booted_guest
from gmemtest.host_poison import HostPoison, resolve_host_frame
from gmemtest.observations import (
    GUEST_TRACE_DIR,
    HostObservations,
    Observations,
    collect_events,
    hardware_corrupted_kb,
    kvm_trace,
    observe_panic,
    observe_recovery,
    parse_kvm_trace,
    read_kpageflags_words,
)
from gmemtest.oracle import (
    Expectation,
    HostExpectation,
    MappingLayout,
    PageLayout,
    expect,
    expect_host,
    free_page_layout,
)
from gmemtest.private_host_poison import run_private_host_poison
from gmemtest.private_page import PageViews, PrivatePage, make_private, page_views, share_all
from gmemtest.scenarios import KillPolicy, ScenarioSpec, Source
from gmemtest.under_test import UnderTest
from gmemtest.verdict import judge
from guests.probe_client import Mapping, ProbeClient, ProbeError, SigbusReport
from guests.ssh import SshError
from host_stack import mm_uapi
from host_stack.attribute_trace import AttributeTrace
from host_stack.kvm_uapi import KVM_EXIT_SHUTDOWN
from images.build import GuestImage
from outcome import Verdict
from qmp_helpers import STUCK_RUN_STATES, MachineStuck, MceInjection, mce_kind
from qmp_helpers.trace_log import TRACE_PREFIX

__all__ = ["ScenarioError", "ScenarioResult", "run_in_fresh_guest", "run_scenario"]

LOG = logging.getLogger(__name__)

PROBE_PATH = "/usr/bin/gmem-probe"
# The guest's MCE poll interval (arch/x86/kernel/cpu/mce/core.c, check_interval; 0 = no polling).
MCE_POLL_PATH = "/sys/devices/system/machinecheck/machinecheck0/check_interval"
# The bank QEMU's mce command writes and the oracle reads the record from (QEMU's last bank).
MCE_BANK = 9
# What the probe is asked (prctl PR_MCE_KILL) per kill policy; the sysctl policy asks the kernel.
_PRCTL_KILL = {KillPolicy.EARLY_PRCTL: "early", KillPolicy.LATE_PRCTL: "late"}


@dataclass
class ScenarioResult:
    """A judged row; a conversion row (``Source.CONVERSION``) injects nothing and has no expectation."""

    spec: ScenarioSpec
    expectation: Expectation | None
    observations: Observations
    verdict: Verdict
    injection: Injection | None
    evidence_dir: Path
    host: tuple[HostExpectation, HostObservations] | None = None


# The seed a private row's guest fills its page with once it is private (then reads it back).
PRIVATE_FILL_SEED = 0x5A


@dataclass
class PrivateRun:
    """A private row's page: how it was made private, what each layer saw then, and the clean-up's warnings."""

    page: PrivatePage
    views: PageViews
    warnings: list[str]


def layout_of(mapping: Mapping) -> MappingLayout:
    return MappingLayout(
        kind=mapping.kind, base_va=mapping.va, size=mapping.size, page_size=mapping.page_size,
        pages=tuple(PageLayout(p.va, p.pfn) for p in mapping.pages), is_thp=mapping.thp,
    )


def _find_free_pfn(guest: GuestRun) -> int:
    """A frame at the head of a free buddy block (KPF_BUDDY) high in guest RAM, nothing else set.

    Heads of 2 MiB-aligned blocks high up are the least likely to be allocated in the moment
    between this read and the injection; the runner reads the flag again right before injecting.
    """
    top = guest.profile.memory_mib << (20 - 12)
    candidates = list(range(top - 512, top // 2, -512))[:32]
    for pfn, flags in read_kpageflags_words(guest, candidates).items():
        if flags == 1 << mm_uapi.KPF_BUDDY:
            return pfn
    raise ScenarioError(f"no free buddy block head among pfns {candidates[-1]:#x}..{candidates[0]:#x} "
                        "(/proc/kpageflags): the guest has no free 2 MiB block to poison")


def _confirm_pattern_at_gpa(guest: GuestRun, mapping: Mapping, offset: int, gpa: int, ev: Evidence) -> None:
    """QEMU's own read of ``gpa`` must hold the probe's pattern before anything is injected there.

    The GPA comes from the guest kernel's pagemap; a guest that reported a wrong frame would make
    the oracle and the injection agree on the wrong page and the verdict pass. QEMU's ``pmemsave``
    is an independent witness that this GPA backs the probe's bytes.
    """
    size = min(64, mapping.size - offset, 4096 - (gpa & 0xFFF))
    expected = bytes(mapping.expected_value(offset + i) for i in range(size))
    actual = guest.machine.read_physical(gpa, size)
    ev.json("gpa-interlock.json", {"gpa": gpa, "offset": offset, "size": size,
                                   "expected": expected.hex(), "qemu_read": actual.hex()})
    if actual != expected:
        raise ScenarioError(f"QEMU reads {actual[:16].hex()}... at gpa {gpa:#x}, but the probe wrote "
                            f"{expected[:16].hex()}... at offset {offset:#x} of mapping {mapping.id}: the guest's "
                            "pagemap does not name the frame behind the probe's page; refusing to inject")


_VENDOR_RE = re.compile(r"^vendor_id\s*:\s*(\S+)", re.MULTILINE)


def _cpu_vendor(guest: GuestRun) -> str:
    """The guest vCPU's vendor as the guest kernel sees it (the oracle grades MCEs by it)."""
    text = guest.guest_text("grep -m1 vendor_id /proc/cpuinfo")
    match = _VENDOR_RE.search(text)
    if match is None:
        raise ScenarioError(f"no vendor_id line in the guest's /proc/cpuinfo: {text!r}")
    return match.group(1)


# ----- prepare ----------------------------------------------------------------------------------

def _prepare_guest(spec: ScenarioSpec, guest: GuestRun, ev: Evidence) -> dict[str, Any]:
    """The guest-wide settings the row asks for; returns the setup record (setup.json)."""
    setup: dict[str, Any] = {"variant": f"{spec.name}/{guest.profile.name}", **guest.launch_record()}
    ev.json("setup.json", setup)
    if spec.kill is KillPolicy.EARLY_SYSCTL:
        guest.guest_text("echo 1 > /proc/sys/vm/memory_failure_early_kill")
    if spec.guest_mce_poll_s is not None:
        guest.guest_text(f"echo {spec.guest_mce_poll_s} > {MCE_POLL_PATH}")
        setup["guest_mce_poll_s"] = int(guest.guest_text(f"cat {MCE_POLL_PATH}").strip())
    guest.guest_text(f"echo > {GUEST_TRACE_DIR}/trace")
    setup["guest_cpu_vendor"] = _cpu_vendor(guest)
    ev.json("setup.json", setup)
    return setup


def _target(spec: ScenarioSpec, guest: GuestRun, probe: ProbeClient) -> tuple[Mapping | None, MappingLayout]:
    """The probe's mapping (or, for a free page, none) and the layout the oracle reads."""
    if spec.page_kind == "free":
        return None, free_page_layout(_find_free_pfn(guest))
    mapping = probe.map(spec.page_kind, spec.npages)
    if spec.page_kind == "thp" and not mapping.thp:
        raise ScenarioError(f"{spec.name}: the probe's region is not backed by a THP (kpageflags); "
                            "is transparent_hugepage=madvise set and memory unfragmented?")
    return mapping, layout_of(mapping)


def _interlock(st: Stage) -> None:
    """Refuse to inject unless the gpa the oracle chose still holds what the row poisons (a private
    page's bytes were confirmed before it was converted: QEMU cannot see them now, by design)."""
    spec, exp = st.spec, st.exp
    if st.mapping is not None:
        located = st.probe.locate(st.mapping.id, spec.poison_offset)
        if located.gpa != exp.poison_gpa:
            raise ScenarioError(f"{spec.name}: layout changed before injection: oracle gpa {exp.poison_gpa:#x}, "
                                f"probe locate gpa {located.gpa:#x}")
        if not spec.private:
            _confirm_pattern_at_gpa(st.guest, st.mapping, spec.poison_offset, exp.poison_gpa, st.ev)
        if exp.more_poison:  # none where the oracle expects a panic at the first injection
            assert spec.second_poison_offset is not None
            _confirm_pattern_at_gpa(st.guest, st.mapping, spec.second_poison_offset, exp.more_poison[0][0], st.ev)
        return
    flags = read_kpageflags_words(st.guest, [exp.poison_pfn])[exp.poison_pfn]
    st.ev.json("free-page.json", {"pfn": exp.poison_pfn, "kpageflags": flags})
    if flags != 1 << mm_uapi.KPF_BUDDY:
        raise ScenarioError(f"{spec.name}: pfn {exp.poison_pfn:#x} was allocated before the injection "
                            f"(kpageflags {flags:#x}, expected only KPF_BUDDY); refusing to inject")


def _hold_host_frame(st: Stage, stack: contextlib.ExitStack) -> None:
    """A host-poison row: find the host frame behind the gpa, expect the whole chain, hold the poisoner."""
    mapping = st.need_mapping()
    machine = st.guest.machine
    frame = resolve_host_frame(machine, st.exp.poison_gpa, _pattern(mapping, st.spec.poison_offset))
    st.exp, st.hexp = expect_host(st.spec, st.layout, frame, vendor=st.setup["guest_cpu_vendor"], mce_bank=MCE_BANK,
                                  ram_guest_memfd=st.guest.profile.ram_guest_memfd)
    st.ev.json("host-frame.json", asdict(frame))
    st.poison = stack.enter_context(HostPoison(machine, frame))


def _make_private(spec: ScenarioSpec, guest: GuestRun, probe: ProbeClient, mapping: Mapping | None, *,
                  ev: Evidence, stack: contextlib.ExitStack) -> PrivateRun:
    """Lock the mapping, convert one of its pages through QMP (its pattern confirmed at the gpa first),
    read every layer's view of it, and shared it again when the row ends (a failure is a warning)."""
    if mapping is None:
        raise ScenarioError(f"{spec.name}: a private row converts a page of the probe's mapping, and has none")
    kvm = stack.enter_context(AttributeTrace())
    probe.lock(mapping.id)
    page = make_private(guest, probe, mapping,
                        confirm=lambda offset, gpa: _confirm_pattern_at_gpa(guest, mapping, offset, gpa, ev))
    private = PrivateRun(page, page_views("made private", guest, probe, page, conversion=page.first, kvm=kvm,
                                          previous_seed=PRIVATE_FILL_SEED ^ 0xFF, fill_seed=PRIVATE_FILL_SEED),
                         [])
    ev.json("private-page.json", {"gpa": page.gpa, "hva": page.hva, "offset": page.offset,
                                  "refused_first": [asdict(r) for r in page.refusals], "views": asdict(private.views)})
    stack.callback(lambda: private.warnings.extend(share_all(guest)))
    return private


def _prepare(spec: ScenarioSpec, guest: GuestRun, probe: ProbeClient, *, obs: Observations, ev: Evidence,
             setup: dict[str, Any], stack: contextlib.ExitStack) -> tuple[Stage, PrivateRun | None]:
    """Map, (private rows) convert, expect, interlock, and (host rows) hold the host frame: everything
    before the act."""
    if spec.kill in _PRCTL_KILL:
        probe.set_kill(_PRCTL_KILL[spec.kill])
    mapping, layout = _target(spec, guest, probe)
    private = None
    if spec.private:
        private = _make_private(spec, guest, probe, mapping, ev=ev, stack=stack)
        spec = spec.at_page(private.page.offset)
    kind = mce_kind(spec.mce_kind)
    exp = expect(spec, layout, vcpus=guest.profile.smp, mce_status=kind.status, mce_misc=kind.misc,
                 mce_bank=MCE_BANK, vendor=setup["guest_cpu_vendor"])
    st = Stage(spec=spec, guest=guest, probe=probe, kind=kind, layout=layout, exp=exp, obs=obs, ev=ev,
               mapping=mapping, setup=setup)
    LOG.info("%s: %s page at gpa %#x (pfn %#x) is the target", spec.name, spec.page_kind, exp.poison_gpa,
             exp.poison_pfn)
    st.ev.json("layout.json", asdict(layout))
    _interlock(st)
    if guest.profile.accel == "kvm":  # what QEMU told KVM its guest memory is (qmp_helpers.memslots)
        st.ev.text("memslots.txt", "".join(s.describe() + "\n" for s in guest.machine.memslots()) or
                   "<no kvm_set_user_memory line in QEMU's stderr>\n")
    if spec.source is Source.HOST:
        _hold_host_frame(st, stack)
    st.ev.json("expectation.json", asdict(st.exp) if st.hexp is None else {**asdict(st.exp), "host": asdict(st.hexp)})
    if guest.profile.guest_converts:
        st.exp = replace(st.exp, conversions=None)  # the guest converts as it likes: recorded, not judged
    return st, private


# ----- act and observe --------------------------------------------------------------------------

def _act_and_observe(st: Stage) -> None:
    """The row's act, then every observer; a guest that panics unexpectedly is judged, not raised."""
    spec, guest, exp, obs = st.spec, st.guest, st.exp, st.obs
    act = act_for(spec, exp)
    st.setup["act"] = act_name(act)
    st.ev.json("setup.json", st.setup)
    trace_mark = kvm_trace(guest, on=True)
    try:
        reply = act.run(st)
        injection = st.injection
        assert injection is not None, f"act {act_name(act)} returned without injecting"
        st.ev.json("injection.json", asdict(injection))
        LOG.info("%s: %s injected at gpa %#x%s; observing", spec.name, spec.mce_kind, exp.poison_gpa,
                 _landing(injection))
        if isinstance(reply, SigbusReport):
            obs.injection_to_sigbus_ms = (reply.host_monotonic - injection.t_mono_after) * 1000.0
        if exp.panic:
            observe_panic(guest, injection.event_mark, obs)
        else:
            observe_recovery(guest, st.probe, st.mapping, poison_pfns=exp.poison_pfns, obs=obs, ev=st.ev)
            # 'quit' is answered only after every line the probe wrote before it: a late SIGBUS
            # (one the probe reported after its last reply) is read here, not lost.
            st.probe.close()
            if st.poison is not None and spec.reset_after:
                _reset_and_reread(guest, st.poison, st.ev)
    except (ProbeError, SshError) as exc:
        _judge_unexpected_panic(st, exc)
    assert st.injection is not None
    collect_events(guest, st.injection.event_mark, obs, expected=len(exp.memory_failure_events))
    if trace_mark is not None and guest_panicked(guest) is None:
        kvm_trace(guest, on=False)
        text = guest.machine.stderr_since(trace_mark)
        st.ev.text("qemu-kvm-trace.txt", text)
        obs.conversions, obs.memory_faults, obs.run_exits = parse_kvm_trace(text)
    if st.poison is not None:
        _observe_host(st, st.poison)


def _landing(injection: Injection) -> str:
    """Where an SRAR landed (``inject_mce_at``), for the log; nothing for other injections."""
    if not isinstance(injection, MceInjection) or injection.landing is None:
        return ""
    return f" into {injection.landing.where()} (stop {injection.landing_tries})"


def _judge_unexpected_panic(st: Stage, exc: ProbeError | SshError) -> None:
    """A guest that panicked where the row expects it to survive is a verdict (the 'guest panicked'
    check fails), not a broken run; any other failure of the probe or SSH is raised again."""
    if st.injection is None and st.poison is not None:
        st.injection = st.poison.injection  # poisoned, then the guest died before the row went on
    if st.injection is None or st.exp.panic or guest_panicked(st.guest) is None:
        raise exc
    LOG.warning("%s: the guest panicked after the injection (%s); judging what was observed", st.spec.name, exc)
    st.ev.text("unexpected-panic.txt", f"{type(exc).__name__}: {exc}\n")
    observe_panic(st.guest, st.injection.event_mark, st.obs)


def _observe_host(st: Stage, poison: HostPoison) -> None:
    hobs = poison.observe()
    poison.cleanup()
    st.ev.text("host-kernel-log.txt", "\n".join(hobs.kernel_log) + "\n")
    st.ev.text("qemu-forwarded.txt", poison.forwarded_text())
    st.ev.json("host-observations.json", asdict(hobs))


# ----- the whole row ----------------------------------------------------------------------------

def run_scenario(spec: ScenarioSpec, guest: GuestRun, evidence_dir: Path) -> ScenarioResult:
    """Carry out `spec` on `guest` and judge it. Raises ScenarioError when a precondition fails."""
    if guest.profile.mce_broadcast and not spec.broadcast:
        # The profile's CPU takes MCEs only as a broadcast; the scenario is otherwise the same,
        # and the oracle then expects one MEMORY_FAILURE per vCPU.
        spec = replace(spec, broadcast=True)
    ev = Evidence(evidence_dir)
    setup = _prepare_guest(spec, guest, ev)
    obs = Observations(hardware_corrupted_before_kb=hardware_corrupted_kb(guest))
    start = guest.machine.event_mark()
    probe = ProbeClient(guest.ssh.start(PROBE_PATH),
                        abort=lambda: guest_panicked(guest) or (_vm_stopped(guest, start) if spec.private else None))
    if spec.source is Source.CONVERSION or (spec.private and spec.source is Source.HOST):
        return _run_whole_row(spec, guest, probe, ev=ev, setup=setup, obs=obs)
    with contextlib.ExitStack() as stack:
        stack.callback(_close_probe, guest, probe, evidence_dir / "probe.jsonl")
        # Entered after the probe's callback, so left first: the host frame is unpoisoned and
        # the witness detached before the probe is asked to quit.
        st, private = _prepare(spec, guest, probe, obs=obs, ev=ev, setup=setup, stack=stack)
        _act_and_observe(st)
    assert st.injection is not None, "every path that reaches the verdict has injected"
    # Every SIGBUS the probe ever reported is judged, in arrival order: replies and strays alike.
    obs.sigbus = list(probe.sigbus_reports)
    host = None if st.hexp is None or st.poison is None else (st.hexp, st.poison.obs)
    verdict = replace(judge(st.exp, obs, host), setup=setup)
    if private is not None:  # the page was private when the act began: every layer said so
        verdict = replace(verdict, checks=(*step_checks(private.page.gpa, private.views), *verdict.checks),
                          warnings=(*verdict.warnings, *private.warnings))
    ev.json("observations.json", asdict(obs))
    ev.text("verdict.txt", verdict.summary() + "\n")
    ev.text("verdict.json", verdict.to_json() + "\n")
    LOG.info("%s", verdict.summary())
    return ScenarioResult(spec, st.exp, obs, verdict, st.injection, evidence_dir, host)


def _vm_stopped(guest: GuestRun, since: int) -> str | None:
    """Why waiting on a private row's guest is pointless: QEMU stopped its VM for good (KVM_RUN failed).
    A STOP the row's own injection makes (``inject_mce_at`` stops to look at the vCPU) is followed by a
    RESUME, so the run state decides, asked only after a STOP."""
    if not any(e.name == "STOP" for e in guest.machine.events[since:]):
        return None
    state = guest.machine.status()
    return f"QEMU stopped the VM (QMP STOP, run state {state!r})" if state in STUCK_RUN_STATES else None


def _run_whole_row(spec: ScenarioSpec, guest: GuestRun, probe: ProbeClient, *, ev: Evidence, setup: dict[str, Any],
                   obs: Observations) -> ScenarioResult:
    """A row judged by its own module (a conversion row, a private host-poison row), its probe's transcript kept;
    both end with a guest the probe cannot talk to any more (reset, or stopped)."""
    run = run_conversion_row if spec.source is Source.CONVERSION else run_private_host_poison
    try:
        verdict = run(spec, guest, probe, ev, setup)
    finally:
        probe.abandon()
        probe.write_transcript(ev.dir / "probe.jsonl")
    ev.text("verdict.txt", verdict.summary() + "\n")
    ev.text("verdict.json", verdict.to_json() + "\n")
    LOG.info("%s", verdict.summary())
    return ScenarioResult(spec, None, obs, verdict, None, ev.dir)


def _close_probe(guest: GuestRun, probe: ProbeClient, transcript: Path) -> None:
    if guest_panicked(guest) is not None:
        probe.abandon()  # nobody is left to answer 'quit'
    else:
        probe.close()
    probe.write_transcript(transcript)


def _reset_and_reread(guest: GuestRun, poison: HostPoison, ev: Evidence) -> None:
    """system_reset with the host frame still poisoned; then the rebooted kernel loads the gpa."""
    hobs = poison.obs
    gpa = poison.frame.gpa
    ev.text("console-before-reset.log", guest.machine.console_text())
    hobs.reset_to_ssh_s = round(guest.reboot(), 2)
    channel = guest.ssh.start(PROBE_PATH)
    probe = ProbeClient(channel, abort=lambda: guest_panicked(guest))
    try:
        got = probe.readphys(gpa)
        hobs.guest_read_after_reset = ("read" if not isinstance(got, SigbusReport)
                                       else f"SIGBUS si_code {got.si_code} at {got.si_addr:#x}")
    except (ProbeError, SshError) as exc:
        hobs.guest_read_after_reset = f"{type(exc).__name__}: {exc}" + (
            f" ({guest_panicked(guest)})" if guest_panicked(guest) else "")
    finally:
        probe.close()
        probe.write_transcript(ev.dir / "probe-after-reset.jsonl")
    hobs.pfn_after_reset, hobs.hwpoison_after_reset = poison.frame_now()
    LOG.info("after system_reset: gpa %#x read by the guest: %s; hva %#x now pfn %s", gpa,
             hobs.guest_read_after_reset, poison.frame.hva,
             "none" if hobs.pfn_after_reset is None else hex(hobs.pfn_after_reset))


def _pattern(mapping: Mapping, offset: int, size: int = 64) -> bytes:
    """The bytes the probe wrote from ``offset`` on, up to the end of that page."""
    size = min(size, mapping.size - offset, 4096 - (offset & 0xFFF))
    return bytes(mapping.expected_value(offset + i) for i in range(size))


_ATTEMPT_PREFIXES = ("stuck-attempt-", "guest-reset-attempt-")
_RUN_EXIT_SHUTDOWN = re.compile(rf"^{TRACE_PREFIX}kvm_run_exit cpu_index (\d+), reason {KVM_EXIT_SHUTDOWN}\b",
                                re.MULTILINE)


class GuestResetItself(ScenarioError):
    """The guest reset on its own while a row ran (QMP RESET with guest=true, which no row asks for)."""


def guest_reset_itself(guest: GuestRun) -> str | None:
    """Why the row could not finish, if the guest reset on its own; None otherwise.

    The runner resets a guest only through QMP ``system_reset`` (RESET guest=false); a RESET
    with guest=true is the guest's doing: a triple fault (KVM_EXIT_SHUTDOWN under KVM), or its
    kernel writing the reset register.
    """
    resets = [e for e in guest.machine.events if e.name == "RESET" and e.data.get("guest")]
    if not resets:
        return None
    shutdowns = sorted({int(m[1]) for m in _RUN_EXIT_SHUTDOWN.finditer(guest.machine.stderr_since(0))})
    how = (f"; QEMU's kvm_run_exit trace shows KVM_EXIT_SHUTDOWN (a triple fault) on vCPU "
           f"{', '.join(map(str, shutdowns))}" if shutdowns else "")
    return (f"the guest reset on its own (QMP RESET reason {resets[0].data.get('reason')!r}, "
            f"{len(resets)} time(s)){how}; console tail: {guest.machine.console_text()[-300:]!r}")


def run_in_fresh_guest(spec: ScenarioSpec, image: GuestImage, outdir: Path, *,
                       under: UnderTest | None = None,
                       extra_qemu_args: Sequence[str] = (),
                       after_verdict: Callable[[GuestRun, ScenarioResult], None] | None = None) -> ScenarioResult:
    """Boot a guest for `spec`, run it, tear the guest down; retry only a VM stuck at boot.

    `under` is what the lab chose, whole (default: the built-in choices): its QEMU, the profile
    for the row (its own or the lab's, with the lab's firmware) and whether a guest may be
    restored from a saved boot;
    `after_verdict` runs while the judged guest is still up (``gmemtest run --keep`` holds it
    there until Ctrl-C; whatever it raises still tears the guest down). The evidence
    of the final attempt is in `outdir`; a stuck VM's (retried once) in `outdir/stuck-attempt-N/`
    with a `why.txt`, and a guest's that reset on its own during the row (``GuestResetItself``,
    retried once) in `outdir/guest-reset-attempt-N/`. An SRAR is injected where its row says
    (``inject_mce_at``): there is no missed landing to retry.
    """
    under = UnderTest() if under is None else under
    attempt = stuck = resets = 0
    while True:
        attempt += 1
        try:
            with booted_guest(image, outdir, profile=under.profile_for(spec), binary=under.qemu,
                              extra_qemu_args=extra_qemu_args, snapshot=under.snapshot) as guest:
                try:
                    result = run_scenario(spec, guest, outdir)
                except Exception as exc:
                    if (why := guest_reset_itself(guest)) is not None:
                        raise GuestResetItself(f"{spec.name}: {why} (then: {type(exc).__name__}: {exc})") from exc
                    raise
                if after_verdict is not None:
                    after_verdict(guest, result)
                return result
        except GuestResetItself as exc:
            # Seen once inside the lab host: an L2 under nested SVM triple-faulted about 2 s after
            # a host poison's AO was forwarded and recovered (QEMU 11.1.3, Debian 7.3.4 L1); its
            # attempt is kept, and a second self-reset of the same row fails it.
            if resets:
                raise
            resets += 1
            LOG.warning("%s: attempt %d: %s; retrying once", spec.name, attempt, exc)
            set_aside(outdir, f"guest-reset-attempt-{attempt}", str(exc), skip_prefixes=_ATTEMPT_PREFIXES)
        except MachineStuck as exc:
            # A nested guest's KVM stopping at boot (internal-error, seen under nested SVM in
            # the lab host) is retried once; the stuck attempt's evidence is kept.
            if stuck:
                raise
            stuck += 1
            LOG.warning("%s: attempt %d: the guest's VM is stuck (%s); retrying once", spec.name, attempt,
                        exc.state)
            set_aside(outdir, f"stuck-attempt-{attempt}", str(exc), skip_prefixes=_ATTEMPT_PREFIXES)

