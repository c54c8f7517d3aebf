"""The one exception root of the guests package (SSH, the probe, the refresh of a restored guest)."""

from __future__ import annotations


class GuestError(Exception):
    """Talking to the guest, or to the program inside it, failed."""
