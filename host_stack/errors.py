"""The root of every exception host_stack raises, so a caller can catch "the host side failed"
in one clause; each concrete error also keeps its standard base (``OSError`` with an errno,
``RuntimeError``), so existing ``except OSError`` handlers still see what they saw."""

from __future__ import annotations

__all__ = ["HostStackError"]


class HostStackError(Exception):
    """Something on the host side (KVM, memory failure, tracing, a child program) failed or refused."""
