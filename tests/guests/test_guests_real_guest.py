"""The guest side end to end in the real default guest under TCG (one QEMU at a time).

SSH is gated on the console marker through ``connect(ready=...)``; the probe's GPAs are
checked against guest memory read by QEMU itself (HMP ``xp``), and one SRAO late-kill and
one SRAO early-kill injection check the probe's SIGBUS reporting inside a real guest.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from guests_testlib import wait_until_sleeping

from guests.probe_client import ProbeClient, ProbeCommandError, SigbusReport
from guests.profiles import get_profile
from guests.ssh import SshSession
from host_stack.mm_uapi import BUS_MCEERR_AO, BUS_MCEERR_AR, PR_MCE_KILL_EARLY

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

READY = "GMEMTEST-READY"
HUGE_2M = 2 << 20


@dataclass
class Guest:
    machine: Any
    ssh: SshSession
    workdir: Path


@pytest.fixture(scope="module")
def guest(default_image: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    from gmemtest.guest_run import guest_argv
    from qmp_helpers import QemuMachine

    workdir = tmp_path_factory.mktemp("guest")
    args = guest_argv(default_image, get_profile("tcg-default"))
    with QemuMachine(args, workdir, name="guests-test") as machine:
        machine.launch()
        with SshSession.connect(
                "127.0.0.1", machine.ssh_port, default_image.ssh_key, deadline_s=120,
                console_log=machine.console_log,
                ready=lambda timeout: machine.wait_console(READY, timeout=timeout)) as ssh:
            yield Guest(machine, ssh, workdir)


def hardware_corrupted_kb(guest: Guest) -> int:
    meminfo = guest.ssh.run_checked("cat /proc/meminfo", timeout=20).stdout
    match = re.search(r"^HardwareCorrupted:\s+(\d+) kB", meminfo, re.MULTILINE)
    assert match, f"guest /proc/meminfo has no HardwareCorrupted line: {meminfo!r}"
    return int(match.group(1))


def wait_page_retired(guest: Guest, before_kb: int, timeout: float = 15.0) -> None:
    """An action-optional MCE is handled from a work queue: poll until the guest counted the page."""
    deadline = time.monotonic() + timeout
    now = before_kb
    while time.monotonic() < deadline:
        now = hardware_corrupted_kb(guest)
        if now > before_kb:
            return
        time.sleep(0.05)
    raise AssertionError(f"expected HardwareCorrupted above {before_kb} kB within {timeout}s, still {now} kB")


def xp_byte(machine: Any, gpa: int) -> int:
    text = machine.hmp(f"xp /1bx {gpa:#x}")
    match = re.search(r":\s*0x([0-9a-f]+)", text)
    assert match, f"unexpected xp reply for {gpa:#x}: {text!r}"
    return int(match.group(1), 16)


@pytest.fixture
def probe(guest: Guest, request: pytest.FixtureRequest) -> Iterator[ProbeClient]:
    client = ProbeClient(guest.ssh.start("/usr/bin/gmem-probe"), timeout=30)
    try:
        yield client
    finally:
        client.close()
        client.write_transcript(guest.workdir / f"{request.node.name}.probe.jsonl")


def test_ssh_login_is_root_in_the_guest(guest: Guest) -> None:
    assert guest.ssh.run_checked("id -u", timeout=20).stdout == "0\n"
    assert READY in guest.machine.console_text()


def test_probe_gpas_hold_the_pattern(guest: Guest, probe: ProbeClient) -> None:
    for kind, offset in (("anon4k", 4096 + 77), ("thp", HUGE_2M - 5), ("hugetlb2m", 123457)):
        m = probe.map(kind, 2)
        where = probe.locate(m.id, offset)
        assert where.present and where.va == m.va_at(offset)
        seen = xp_byte(guest.machine, where.gpa)
        assert seen == m.expected_value(offset), (
            f"{kind}: guest-physical {where.gpa:#x} holds {seen:#x}, the probe wrote "
            f"{m.expected_value(offset):#x} at va {where.va:#x}")
        if kind == "hugetlb2m":
            assert where.pfn == m.pages[0].pfn + offset // 4096


def test_readphys_loads_the_byte_the_probe_wrote_at_its_gpa(guest: Guest, probe: ProbeClient) -> None:
    """The guest kernel's own load at a gpa (/proc/kcore) sees the probe's pattern: the reset row's witness."""
    m = probe.map("anon4k", 1)
    where = probe.locate(m.id, 0x123)
    got = probe.readphys(where.gpa)
    assert not isinstance(got, SigbusReport) and got.gpa == where.gpa
    assert got.value == m.expected_value(0x123), f"kcore read {got.value:#x} at gpa {where.gpa:#x}"
    with pytest.raises(ProbeCommandError, match="no /proc/kcore segment maps gpa"):
        probe.readphys(1 << 46)


@pytest.mark.parametrize("kind", ["anon4k", "thp"])
def test_srao_late_kill_then_touch_reports_ar(guest: Guest, probe: ProbeClient, kind: str) -> None:
    m = probe.map(kind, 1)
    offset = 0x3123 if kind == "thp" else 0x123
    where = probe.locate(m.id, offset)
    gpa = where.gpa & ~0xFFF
    before = hardware_corrupted_kb(guest)
    guest.machine.inject_mce("SRAO", gpa)
    wait_page_retired(guest, before)
    report = probe.touch(m.id, offset)
    assert isinstance(report, SigbusReport), f"expected SIGBUS after SRAO at {gpa:#x}, got {report}"
    assert (report.si_code, report.si_addr, report.si_addr_lsb, report.during) == \
        (BUS_MCEERR_AR, m.va + offset, 12, "touch")
    flags = probe.flags(m.id)
    assert flags.pages[0].hwpoison is True
    assert [(f.offset, f.gpa) for f in flags.hwpoison_frames] == [(offset & ~0xFFF, gpa)]
    assert probe.spin(0) is not None  # still answering


def test_srao_early_kill_gives_ao_while_waiting(guest: Guest, probe: ProbeClient) -> None:
    assert probe.set_kill("early").prctl_get == PR_MCE_KILL_EARLY
    m = probe.map("hugetlb2m", 1)
    probe.begin_wait(20)
    wait_until_sleeping(lambda: guest.ssh.run_checked(f"cat /proc/{probe.pid}/syscall", timeout=20).stdout)
    guest.machine.inject_mce("SRAO", m.pages[0].gpa + 0x5000)
    report = probe.wait_sigbus(timeout=15)
    assert (report.si_code, report.si_addr_lsb, report.during) == (BUS_MCEERR_AO, 21, "wait")
    assert report.si_addr == m.va, f"expected si_addr {m.va:#x}, got {report.si_addr:#x}"


def test_hugetlb_srao_then_touch_names_the_exact_4k_frame(guest: Guest, probe: ProbeClient) -> None:
    m = probe.map("hugetlb2m", 1)
    gpa = m.pages[0].gpa + 0x5000
    before = hardware_corrupted_kb(guest)
    guest.machine.inject_mce("SRAO", gpa)
    wait_page_retired(guest, before)
    report = probe.touch(m.id, 0x5000 + 9)
    assert isinstance(report, SigbusReport), f"expected SIGBUS after SRAO at {gpa:#x}, got {report}"
    assert (report.si_code, report.si_addr, report.si_addr_lsb) == (BUS_MCEERR_AR, m.va + 0x5009, 21)
    flags = probe.flags(m.id)
    # The huge page is dissolved: KPF_HWPOISON sits on the one 4 KiB frame that was hit.
    assert flags.pages[0].hwpoison is True
    assert [(f.offset, f.gpa) for f in flags.hwpoison_frames] == [(0x5000, gpa)]
