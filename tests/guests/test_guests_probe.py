"""The probe, built for this host and run for real, checked against the kernel's own view.

Raw protocol checks talk to the probe over pipes; everything through ProbeClient goes over a
real SSH session (local dropbear, root), the same path the guest uses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guests_testlib import Dropbear, wait_until_sleeping

from guests.probe_client import (
    Mapping,
    ProbeClient,
    ProbeCommandError,
    ProbeExitedError,
    ProbeTimeoutError,
    SigbusReport,
    TouchResult,
    pattern_byte,
)
from guests.ssh import SshSession
from host_stack.mm_uapi import (
    BUS_ADRERR,
    KPF_HUGE,
    KPF_HWPOISON,
    KPF_THP,
    PM_PFN_MASK,
    PM_PRESENT,
    PR_MCE_KILL_EARLY,
    PR_MCE_KILL_LATE,
    SI_USER,
)

HUGE_2M = 2 * 1024 * 1024


def pagemap_pfn(pid: int, va: int) -> int:
    with open(f"/proc/{pid}/pagemap", "rb") as fh:
        fh.seek(va // 4096 * 8)
        entry = int.from_bytes(fh.read(8), "little")
    assert entry & PM_PRESENT, f"expected va {va:#x} of pid {pid} present, entry {entry:#x}"
    return entry & PM_PFN_MASK


def kpageflags(pfn: int) -> int:
    with open("/proc/kpageflags", "rb") as fh:
        fh.seek(pfn * 8)
        return int.from_bytes(fh.read(8), "little")


# -- raw protocol over pipes -------------------------------------------------------------

def converse(binary: Path, lines: list[str], timeout: float = 20) -> list[dict[str, object]]:
    out = subprocess.run([str(binary)], input="".join(f"{line}\n" for line in lines),
                         capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, f"probe exit status {out.returncode}, stderr {out.stderr!r}"
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.parametrize(("command", "needle"), [
    ("frobnicate", "unknown command 'frobnicate'; valid: map, touch, locate, flags, lock, fill, check, spin, "
                   "wait, kill, refresh, readphys, quit"),
    ("map", "valid KIND: anon4k, thp, hugetlb2m, memfd4k"),
    ("map huge 1", "unknown map kind 'huge'; valid: anon4k, thp, hugetlb2m, memfd4k"),
    ("map anon4k 0", "bad NPAGES '0'"),
    ("map anon4k -1", "bad NPAGES '-1'"),
    ("map anon4k 4097", "bad NPAGES '4097'; valid: an integer from 1 to 4096"),
    ("map anon4k 1 extra", "too many arguments for 'map'"),
    ("touch 5 0", "unknown mapping id '5'"),
    ("touch 0 4096", "bad OFFSET '4096'; valid: an integer from 0 to the mapping's size - 1"),
    ("touch 0 12abc", "bad OFFSET '12abc'"),
    ("flags x", "unknown mapping id 'x'"),
    ("spin 3601", "bad SECONDS '3601'; valid: an integer from 0 to 3600"),
    ("wait soon", "bad SECONDS 'soon'"),
    ("kill maybe", "bad kill mode 'maybe'; valid: early, late"),
    ("readphys zz", "bad GPA 'zz'; valid: a guest-physical address"),
    ("x" * 300, "line too long"),
])
def test_bad_input_gives_error_event(probe_binary: Path, command: str, needle: str) -> None:
    events = converse(probe_binary, ["map anon4k 1", command, "touch 0 7", "quit"])
    assert [e["event"] for e in events] == ["ready", "mapped", "error", "touched", "bye"]
    assert needle in str(events[2]["message"])
    assert events[3]["value"] == pattern_byte(0, 7), "probe must keep serving after an error"


def test_error_event_quotes_hostile_input_as_valid_json(probe_binary: Path) -> None:
    events = converse(probe_binary, ['bad"cmd\\ \x01'])
    assert events[1] == {"event": "error", "input": 'bad"cmd\\ \x01',
                         "message": "unknown command 'bad\"cmd\\'; valid: map, touch, locate, "
                                    "flags, lock, fill, check, spin, wait, kill, refresh, readphys, quit"}


def test_ready_blank_lines_and_eof(probe_binary: Path) -> None:
    events = converse(probe_binary, ["", "   "])
    assert events[0]["event"] == "ready" and events[0]["page_size"] == 4096
    assert events[0]["kpageflags"] is True
    assert events[1:] == [{"event": "bye", "reason": "eof"}]


# -- through SSH and ProbeClient ---------------------------------------------------------

@pytest.fixture
def ssh(dropbear: Dropbear) -> Iterator[SshSession]:
    with SshSession.connect("127.0.0.1", dropbear.port, dropbear.client.private,
                            deadline_s=15) as session:
        yield session


@pytest.fixture
def probe(ssh: SshSession, probe_binary: Path, tmp_path: Path) -> Iterator[ProbeClient]:
    client = ProbeClient(ssh.start(str(probe_binary)), timeout=20)
    try:
        yield client
    finally:
        client.close()
        client.write_transcript(tmp_path / "probe.jsonl")


def check_pages_against_kernel(client: ProbeClient, mapping: Mapping) -> None:
    for index, page in enumerate(mapping.pages):
        assert page.va == mapping.va + index * mapping.page_size
        pfn = pagemap_pfn(client.pid, page.va)
        assert page.pfn == pfn, f"page {index}: probe pfn {page.pfn:#x}, pagemap says {pfn:#x}"
        assert page.gpa == pfn << 12
        assert page.flags is not None
        assert page.flags >> KPF_HWPOISON & 1 == 0


def test_anon4k_pages_match_pagemap_and_values(probe: ProbeClient) -> None:
    m = probe.map("anon4k", 3)
    assert (m.kind, m.page_size, m.npages, m.size, len(m.pages)) == ("anon4k", 4096, 3, 3 * 4096, 3)
    assert m.va % 4096 == 0
    check_pages_against_kernel(probe, m)
    for offset in (0, 1, 4095, 4096 + 250, 3 * 4096 - 1):
        touched = probe.touch(m.id, offset)
        assert isinstance(touched, TouchResult), f"expected a touch at {offset}, got {touched}"
        assert (touched.va, touched.value) == (m.va_at(offset), m.expected_value(offset))
    where = probe.locate(m.id, 5000)
    assert where.present and where.va == m.va + 5000
    assert where.gpa == (m.pages[1].pfn << 12) + 5000 - 4096


def test_thp_claim_matches_kpageflags(probe: ProbeClient) -> None:
    m = probe.map("thp", 1)
    assert m.va % HUGE_2M == 0 and m.page_size == HUGE_2M and m.thp is not None
    check_pages_against_kernel(probe, m)
    head = m.pages[0].pfn
    is_thp = bool(kpageflags(head) >> KPF_THP & 1)
    assert m.thp is is_thp, f"probe says thp={m.thp}, /proc/kpageflags of pfn {head:#x} says {is_thp}"
    if is_thp:
        assert head % 512 == 0
        tail = probe.locate(m.id, HUGE_2M - 1)
        assert tail.pfn == head + 511 and tail.gpa == ((head + 511) << 12) + 4095
    touched = probe.touch(m.id, HUGE_2M - 3)
    assert isinstance(touched, TouchResult) and touched.value == m.expected_value(HUGE_2M - 3)


@pytest.fixture
def hugepages_reserved() -> Iterator[int]:
    path = Path("/proc/sys/vm/nr_hugepages")
    old = int(path.read_text())
    want = old + 2
    try:
        path.write_text(f"{want}\n")
    except OSError as exc:
        pytest.skip(f"cannot reserve 2 MiB huge pages via {path}: {exc}")
    try:
        got = int(path.read_text())
        if got < want:
            pytest.skip(f"asked {path} for {want} huge pages, the kernel reserved {got}")
        yield want - old
    finally:
        path.write_text(f"{old}\n")


def test_hugetlb2m_is_a_huge_page(probe: ProbeClient, hugepages_reserved: int) -> None:
    m = probe.map("hugetlb2m", 1)
    assert m.va % HUGE_2M == 0 and m.page_size == HUGE_2M
    check_pages_against_kernel(probe, m)
    page = m.pages[0]
    assert page.pfn % 512 == 0
    assert page.flags is not None and page.flags >> KPF_HUGE & 1, f"flags {page.flags:#x} lack KPF_HUGE"
    touched = probe.touch(m.id, HUGE_2M - 1)
    assert isinstance(touched, TouchResult) and touched.value == m.expected_value(HUGE_2M - 1)
    report = probe.flags(m.id)
    assert report.pages[0].pfn == page.pfn and report.pages[0].hwpoison is False
    assert report.hwpoison_frames == ()


def test_truncated_file_gives_exact_sigbus_and_probe_survives(probe: ProbeClient) -> None:
    m = probe.map("memfd4k", 2)
    assert m.fd is not None
    os.truncate(f"/proc/{probe.pid}/fd/{m.fd}", 4096)  # the second page is now beyond EOF
    t0 = time.monotonic_ns()
    for _ in range(2):  # a second fault proves the handler unblocked SIGBUS on its way out
        report = probe.touch(m.id, 4096 + 123)
        assert isinstance(report, SigbusReport), f"expected a SIGBUS, got {report}"
        assert (report.si_signo, report.si_code, report.si_addr, report.si_addr_lsb, report.during) \
            == (signal.SIGBUS, BUS_ADRERR, m.va + 4096 + 123, 0, "touch")
        assert t0 <= report.t_mono_ns <= time.monotonic_ns()
    healthy = probe.touch(m.id, 17)
    assert isinstance(healthy, TouchResult) and healthy.value == m.expected_value(17)
    assert len(probe.sigbus_reports) == 2 and probe.pending_sigbus() == []


def test_async_sigbus_during_wait_is_read(probe: ProbeClient) -> None:
    probe.begin_wait(20)
    wait_until_sleeping(lambda: Path(f"/proc/{probe.pid}/syscall").read_text())
    sent = time.monotonic_ns()
    os.kill(probe.pid, signal.SIGBUS)
    report = probe.wait_sigbus(timeout=10)
    assert (report.si_code, report.during) == (SI_USER, "wait")
    assert probe.pending_sigbus() == [], "wait_sigbus handed this report out; it must not be queued again"
    assert sent <= report.t_mono_ns, "the handler's CLOCK_MONOTONIC stamp precedes the kill"
    assert time.monotonic_ns() - sent < 5e9, "the wait must end with the signal, not run 20 s"
    assert probe.set_kill("late").prctl_get == PR_MCE_KILL_LATE


def test_sigbus_after_a_reply_is_idle_not_that_command(probe: ProbeClient) -> None:
    """A signal sent right after a reply arrived must not be blamed on the replied command.

    The probe marks the command done while SIGBUS is blocked around the reply; without that,
    a loaded machine (the probe preempted right after write()) reported "during": "map".
    """
    m = probe.map("anon4k", 1)
    for i in range(20):
        os.kill(probe.pid, signal.SIGBUS)
        touched = probe.touch(m.id, i)
        assert isinstance(touched, TouchResult), f"round {i}: touch was hit by the signal: {touched}"
        assert touched.value == pattern_byte(m.id, i)
    queued = [probe.wait_sigbus(timeout=5) for _ in range(20)]
    assert {(q.si_code, q.during) for q in queued} == {(SI_USER, "idle")}
    assert probe.pending_sigbus() == []


def test_kill_spin_wait_flags(probe: ProbeClient) -> None:
    assert probe.set_kill("early").prctl_get == PR_MCE_KILL_EARLY
    assert probe.set_kill("late").prctl_get == PR_MCE_KILL_LATE
    t0 = time.monotonic()
    spun = probe.spin(1)
    assert not isinstance(spun, SigbusReport) and spun.iterations > 0
    waited = probe.wait(1)
    assert not isinstance(waited, SigbusReport) and waited.seconds == 1
    assert time.monotonic() - t0 >= 2.0
    m = probe.map("anon4k", 2)
    report = probe.flags(m.id)
    assert [p.pfn for p in report.pages] == [p.pfn for p in m.pages]
    assert all(p.hwpoison is False for p in report.pages) and report.hwpoison_frames == ()


def test_command_errors_raise_with_probe_message(probe: ProbeClient) -> None:
    with pytest.raises(ProbeCommandError, match="unknown mapping id '42'") as info:
        probe.touch(42, 0)
    assert "touch 42 0" in str(info.value)
    with pytest.raises(ValueError, match="valid: anon4k, thp, hugetlb2m, memfd4k"):
        probe.map("1g", 1)
    with pytest.raises(ValueError, match="valid: early, late"):
        probe.set_kill("never")


def test_transcript_records_both_directions(probe: ProbeClient, tmp_path: Path) -> None:
    probe.map("anon4k", 1)
    probe.touch(0, 1)
    path = probe.write_transcript(tmp_path / "t.jsonl")
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["dir"], e["line"].split('"')[3] if e["dir"] == "recv" else e["line"])
            for e in entries] == [("recv", "ready"), ("send", "map anon4k 1"), ("recv", "mapped"),
                                  ("send", "touch 0 1"), ("recv", "touched")]
    stamps = [e["t_mono"] for e in entries]
    assert stamps == sorted(stamps) and all(e["t_wall"] > 1.6e9 for e in entries)


def test_unexpected_lines_are_kept_not_fatal(ssh: SshSession, probe_binary: Path) -> None:
    channel = ssh.start(f"echo 'kernel: noise on the tty'; echo '{{\"no_event\": 1}}'; exec {probe_binary}")
    with ProbeClient(channel) as client:
        assert client.map("anon4k", 1).npages == 1
        odd = [e["line"] for e in client.transcript if e["dir"] == "recv" and not e["json"]]
        assert odd == ["kernel: noise on the tty", '{"no_event": 1}']


def test_silent_program_times_out_naming_expectation_and_lines(ssh: SshSession) -> None:
    channel = ssh.start("echo hello-from-a-stuck-program; sleep 30")
    t0 = time.monotonic()
    with pytest.raises(ProbeTimeoutError) as info:
        ProbeClient(channel, ready_timeout=1.0)
    assert time.monotonic() - t0 < 5
    assert "'ready'" in str(info.value) and "hello-from-a-stuck-program" in str(info.value)
    channel.close()


def test_exiting_program_is_reported(ssh: SshSession) -> None:
    channel = ssh.start("echo 'gmem-probe: not found'; exit 127")
    with pytest.raises(ProbeExitedError, match="output ended") as info:
        ProbeClient(channel, ready_timeout=5)
    assert "gmem-probe: not found" in str(info.value)
    channel.close()


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except (FileNotFoundError, ProcessLookupError):  # gone before or while /proc was read
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_close_quits_the_probe(ssh: SshSession, probe_binary: Path) -> None:
    client = ProbeClient(ssh.start(str(probe_binary)))
    client.map("anon4k", 1)
    client.close()
    assert client.transcript[-1]["line"] == '{"event":"bye","reason":"quit"}'
    assert wait_gone(client.pid), f"probe pid {client.pid} still alive after close()"


def test_closing_the_session_ends_a_started_probe(dropbear: Dropbear, probe_binary: Path) -> None:
    session = SshSession.connect("127.0.0.1", dropbear.port, dropbear.client.private, deadline_s=15)
    client = ProbeClient(session.start(str(probe_binary)))
    session.close()
    assert wait_gone(client.pid), f"probe pid {client.pid} outlived its SSH session"


# Only the refusals run here: a valid refresh steps CLOCK_REALTIME and reseeds the CRNG of the
# machine it runs on, so it runs in guests only (tests/gmemtest/test_snapshot_guests.py).
@pytest.mark.parametrize(("line", "message"), [
    ("refresh", "bad realtime ''; want nanoseconds since the epoch"),
    ("refresh -5 00", "bad realtime '-5'; want nanoseconds since the epoch"),
    ("refresh 5", "bad entropy: want 2..128 hex digits (1..64 bytes)"),
    ("refresh 5 abc", "bad entropy: want 2..128 hex digits (1..64 bytes)"),
    ("refresh 5 " + "00" * 65, "bad entropy: want 2..128 hex digits (1..64 bytes)"),
    ("refresh 5 0G", "bad entropy: want lower-case hex digits"),
])
def test_refresh_refuses_bad_arguments(probe_binary: Path, line: str, message: str) -> None:
    events = converse(probe_binary, [line])
    assert events[1]["event"] == "error" and events[1]["message"] == message, events


def test_refresh_one_shot_form_exit_codes(probe_binary: Path) -> None:
    bad = subprocess.run([str(probe_binary), "refresh", "5", "zz"], capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and json.loads(bad.stdout)["message"] == "bad entropy: want lower-case hex digits"
    usage = subprocess.run([str(probe_binary), "frobnicate"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "usage: gmem-probe" in json.loads(usage.stdout)["message"]


def test_lock_fill_and_check_agree_with_the_client_formula(probe_binary: Path) -> None:
    """What ``fill`` writes is what ``fill_page`` says (the host compares the gpa's bytes with it)."""
    from guests.probe_client import PAGE_4K, fill_byte, fill_page

    events = converse(probe_binary, ["map anon4k 2", "lock 0", "fill 0 4100 7", "check 0 4096 7", "check 0 0 7",
                                     "check 0 4096 8"])
    assert events[2] == {"event": "locked", "id": 0, "pages": 2, "moved": 0}
    assert events[3] == {"event": "filled", "id": 0, "offset": 4096, "seed": 7}
    filled, other_page, other_seed = events[4], events[5], events[6]
    page = fill_page(7)
    assert filled["matches"] == PAGE_4K and filled["zeros"] == page.count(0)
    assert filled["first"] == int.from_bytes(page[:8], "little")
    assert fill_byte(7, 0) == 7 and other_page["matches"] < PAGE_4K
    assert other_seed["matches"] == sum(1 for i in range(PAGE_4K) if fill_byte(8, i) == page[i])


@pytest.mark.parametrize(("command", "needle"), [
    ("fill 0 0 0", "bad SEED '0'; valid: an integer from 1 to 255"),
    ("fill 0 0 256", "bad SEED '256'"),
    ("check 0 8192 1", "bad OFFSET '8192'"),
    ("check 0 0 1 2", "too many arguments for 'check'"),
    ("lock 0 1", "too many arguments for 'lock'"),
    ("lock 3", "unknown mapping id '3'"),
])
def test_bad_fill_check_lock_input_names_the_value(probe_binary: Path, command: str, needle: str) -> None:
    events = converse(probe_binary, ["map anon4k 2", command])
    assert events[2]["event"] == "error" and needle in str(events[2]["message"]), events[2]
