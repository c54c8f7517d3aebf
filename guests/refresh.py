"""Make a guest restored from a snapshot its own: wall clock stepped, RNG reseeded.

Every guest restored from one snapshot wakes with the snapshot's wall clock (as old as the
snapshot) and the snapshot's RNG state (the same for all of them), so two restored guests
would hand out the same ``/dev/urandom`` bytes and the same ASLR layouts. The probe's
``refresh`` verb steps CLOCK_REALTIME to the host's time and credits host entropy with a
forced CRNG reseed; this module sends it over the guest's SSH session and reads the
evidence back. It runs before anything of the test runs in the guest.

The first SSH session itself was set up by dropbear before the reseed. Its session keys are
still unique per guest: the client (paramiko) brings its own ephemeral key from the host's
RNG, and dropbear mixes ``getrandom()`` into its pool on every accept.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from guests.errors import GuestError
from guests.ssh import SshSession

__all__ = ["PROBE_PATH", "GuestRefresh", "RefreshError", "refresh_guest"]

PROBE_PATH = "/usr/bin/gmem-probe"
ENTROPY_BYTES = 32


class RefreshError(GuestError, RuntimeError):
    """The guest did not take the clock step or the reseed; the message says which step."""


@dataclass(frozen=True)
class GuestRefresh:
    """What the guest reported, and the clock offsets the host derived from it.

    ``skew_before_s``: guest wall clock minus host wall clock before the step (negative: the
    guest was behind by the snapshot's age). ``skew_after_s``: the same after the step,
    estimated at the midpoint of the command's round trip.
    """

    realtime_before_ns: int
    realtime_set_ns: int
    realtime_after_ns: int
    entropy_bytes: int
    skew_before_s: float
    skew_after_s: float
    round_trip_s: float

    def record(self) -> dict[str, Any]:
        return asdict(self)


def refresh_guest(ssh: SshSession, *, timeout: float = 20.0) -> GuestRefresh:
    """Step the guest's clock to the host's and reseed its CRNG with host entropy.

    The clock is set to the host's time when the command is sent; the time the command takes to
    reach the probe (tens of ms under TCG) stays as the residual ``skew_after_s``.
    """
    entropy = os.urandom(ENTROPY_BYTES).hex()
    sent_wall = time.time()
    sent = time.monotonic()
    target_ns = int(sent_wall * 1e9)
    result = ssh.run(f"{PROBE_PATH} refresh {target_ns} {entropy}", timeout=timeout)
    round_trip = time.monotonic() - sent
    received_wall = sent_wall + round_trip
    replies = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    reply = next((r for r in replies if r.get("event") == "refresh"), None)
    if result.exit_status != 0 or reply is None:
        raise RefreshError(f"gmem-probe refresh: expected a 'refresh' reply and exit 0, got exit "
                           f"{result.exit_status}, stdout {result.stdout!r}, stderr {result.stderr!r}")
    for step in ("settime_errno", "addentropy_errno", "reseed_errno"):
        if reply[step] != 0:
            raise RefreshError(f"gmem-probe refresh: expected {step} 0, got {reply[step]} "
                               f"({os.strerror(int(reply[step]))}); reply {reply}")
    if reply["entropy_bytes"] != ENTROPY_BYTES:
        raise RefreshError(f"gmem-probe refresh: expected {ENTROPY_BYTES} entropy bytes credited, "
                           f"got {reply['entropy_bytes']}")
    return GuestRefresh(
        realtime_before_ns=int(reply["realtime_before_ns"]),
        realtime_set_ns=int(reply["realtime_set_ns"]),
        realtime_after_ns=int(reply["realtime_after_ns"]),
        entropy_bytes=int(reply["entropy_bytes"]),
        skew_before_s=round(int(reply["realtime_before_ns"]) / 1e9 - sent_wall, 4),
        skew_after_s=round(int(reply["realtime_after_ns"]) / 1e9 - (received_wall - round_trip / 2), 4),
        round_trip_s=round(round_trip, 4),
    )
