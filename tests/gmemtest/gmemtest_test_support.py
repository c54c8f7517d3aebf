"""Shared pieces of the gmemtest tests (a plain module, like qmp_helpers' qmp_test_support)."""

from __future__ import annotations

from guests.probe_client import SigbusReport


def probe_sigbus(si_code: int, si_addr: int, si_addr_lsb: int, during: str) -> SigbusReport:
    """A SIGBUS as the probe reports it; the fields the verdict does not judge are fixed."""
    return SigbusReport(si_signo=7, si_code=si_code, si_addr=si_addr, si_addr_lsb=si_addr_lsb, during=during,
                        seq=1, t_mono_ns=0, host_time=0.0, host_monotonic=0.0)
