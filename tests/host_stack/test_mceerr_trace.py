"""The kernel's mceerr senders as kprobe events: parsed on recorded lines everywhere; live where the
kernel has kprobe events and memory failure (the lab host: the test command's lab-host batch)."""

from __future__ import annotations

import mmap

import pytest

from host_stack.injectors import MadviseInjector
from host_stack.kernelfs import DEBUGFS, mounted
from host_stack.mceerr_trace import UNKNOWN_TID, MceerrTrace, SentMceerr, parse_mceerr
from host_stack.mm_uapi import BUS_MCEERR_AO, BUS_MCEERR_AR

# As 7.3.4's tracefs prints them: the senders' arguments, and the signal_generate line each send
# is followed by from the same sender (it names the receiver).
TRACE = """\
   python3-1234    [001] d..1.  31.57: send: (send_sig_mceerr+0x0/0x90) code=5 addr=0x7f8692761000 lsb=21
   python3-1234    [001] d..2.  31.57: signal_generate: sig=7 errno=0 code=5 comm=qemu-system-x86 pid=207 grp=0 res=0
   python3-1234    [000] d..1.  31.60: force: (force_sig_mceerr+0x0/0x70) code=4 addr=0x7f161dff6000 lsb=12
   python3-1234    [000] d..2.  31.60: signal_generate: sig=7 errno=0 code=4 comm=python3 pid=1234 grp=0 res=0
 CPU 0/KVM-211     [000] d..1.  31.70: send: (send_sig_mceerr+0x0/0x90) code=4 addr=0x7f8692761000 lsb=12
 CPU 0/KVM-211     [000] d..2.  31.70: signal_generate: sig=7 errno=0 code=4 comm=CPU 0/KVM pid=211 grp=0 res=0
   python3-1234    [001] d..1.  32.00: send: (send_sig_mceerr+0x0/0x90) code=5 addr=0x7f0000000000 lsb=12
"""


def test_each_sent_sigbus_is_read_with_its_receiver_address_and_order() -> None:
    assert parse_mceerr(TRACE) == [
        SentMceerr("send", 207, BUS_MCEERR_AO, 0x7F8692761000, 21, 1234),
        SentMceerr("force", 1234, BUS_MCEERR_AR, 0x7F161DFF6000, 12, 1234),
        SentMceerr("send", 211, BUS_MCEERR_AR, 0x7F8692761000, 12, 211),
        SentMceerr("send", UNKNOWN_TID, BUS_MCEERR_AO, 0x7F0000000000, 12, 1234),  # no signal_generate line
    ]
    assert parse_mceerr(TRACE)[0].describe() == "BUS_MCEERR_AO at 0x7f8692761000 lsb 21 to thread 207 (send_sig_mceerr)"


@pytest.mark.host_requires("kprobes", "hwpoison", "hwpoison_inject")
def test_the_ar_an_injector_gets_for_its_own_dirty_page_is_seen_with_address_and_order() -> None:
    import threading

    from host_stack.kvm import HostMapping

    page = HostMapping.anonymous(mmap.PAGESIZE, "poisoned scratch page")
    page.write(0, b"dirt")
    addr = page.addr
    with mounted(DEBUGFS) as debugfs, MceerrTrace() as trace:
        injector = MadviseInjector(debugfs)
        try:
            record = injector.inject(addr, mmap.PAGESIZE)
        finally:
            page.close()  # the page is unpoisoned once nothing maps it
            done = injector.cleanup()
        sent = [s for s in trace.records() if s.tid == threading.get_native_id()]
    assert not any(r.cleanup_failed for r in done), [r.cleanup for r in done]
    assert record.sigbus_during_call == 1
    assert [(s.sender, s.si_code, s.si_addr, s.si_addr_lsb) for s in sent] == [
        ("force", BUS_MCEERR_AR, addr, 12)]
