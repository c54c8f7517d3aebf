"""The host observers of a host-poison row: /dev/kmsg from a point on, and signal_generate."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from host_stack.kmsg import KmsgCursor, parse_kmsg_record
from host_stack.mm_uapi import SIGBUS
from host_stack.pagemap import PagemapError, read_memory
from host_stack.signal_trace import SignalTrace, parse_signal_generate

ROOT = os.geteuid() == 0


def test_parse_kmsg_record_takes_the_first_line_only() -> None:
    rec = parse_kmsg_record(b"4,1234,5678901,-;Memory failure: 0x117961: recovery action for dirty LRU page: "
                            b"Recovered\n SUBSYSTEM=x\n")
    assert (rec.level, rec.seq, rec.usec) == (4, 1234, 5678901)
    assert rec.text == "Memory failure: 0x117961: recovery action for dirty LRU page: Recovered"
    with pytest.raises(ValueError, match="not a /dev/kmsg record"):
        parse_kmsg_record(b"garbage")


@pytest.mark.skipif(not ROOT, reason="/dev/kmsg is written as root")
def test_kmsg_cursor_sees_only_what_comes_after_it() -> None:
    marker = f"gmemtest kmsg test {os.getpid()} {time.monotonic_ns()}"
    with Path("/dev/kmsg").open("w") as kmsg:
        kmsg.write(f"{marker} before\n")
    with KmsgCursor() as cursor:
        with Path("/dev/kmsg").open("w") as kmsg:
            kmsg.write(f"{marker} after\n")
        texts = [r.text for r in cursor.read_new()]
    assert f"{marker} after" in texts and f"{marker} before" not in texts


def test_parse_signal_generate_reads_the_receiving_thread_and_code() -> None:
    text = ("  qemu-system-x86-207  [001] d..1.  101.5: signal_generate: sig=7 errno=0 code=5 "
            "comm=qemu-system-x86 pid=207 grp=0 res=0\n"
            "  CPU 0/KVM-214 [000] d..1.  101.6: signal_generate: sig=7 errno=0 code=4 comm=CPU 0/KVM pid=214 "
            "grp=0 res=0\n")
    got = parse_signal_generate(text)
    assert [(g.code, g.tid, g.comm, g.group, g.result) for g in got] == [
        (5, 207, "qemu-system-x86", False, "delivered"), (4, 214, "CPU 0/KVM", False, "delivered")]


@pytest.mark.skipif(not ROOT, reason="tracefs instances need root")
def test_signal_trace_records_a_real_sigbus_and_leaves_nothing_behind() -> None:
    previous = signal.signal(signal.SIGBUS, lambda *_: None)
    try:
        with SignalTrace(SIGBUS) as trace:
            os.kill(os.getpid(), signal.SIGBUS)
            time.sleep(0.05)
            mine = [g for g in trace.records() if g.tid == os.getpid()]
    finally:
        signal.signal(signal.SIGBUS, previous)
    assert mine and mine[0].sig == SIGBUS and mine[0].code == 0 and mine[0].group  # SI_USER, process-wide
    instances = Path("/sys/kernel/tracing/instances")
    assert not (instances / f"gmemtest-{os.getpid()}").exists()


def test_read_memory_reads_this_process_and_names_a_bad_pid() -> None:
    import ctypes

    buf = ctypes.create_string_buffer(b"interlock bytes")
    assert read_memory(os.getpid(), ctypes.addressof(buf), 15) == b"interlock bytes"
    with pytest.raises(PagemapError, match="/proc/999999999/mem"):
        read_memory(999999999, 0x1000, 8)
    with pytest.raises(ValueError, match="size >= 1"):
        read_memory(os.getpid(), 0x1000, 0)
