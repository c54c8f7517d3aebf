"""QMP conversion round trips in a kvm-swprot guest: ``python -m gmemtest.conversion_bench N OUT``.

Run inside the software-protected lab host (``gmemtest bench --conversions N`` starts it there): a
kvm-swprot guest under the project's QEMU, one probe page made private (``private_page``), then N
round trips private -> shared -> private, each conversion timed from the QMP command to QEMU's
``kvm_convert_memory`` trace line read (``qmp_helpers.conversions``); the guest's reads are not
included. The page is shared again at the end. Samples and medians go to OUT as JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from gmemtest.guest_run import booted_guest
from gmemtest.private_page import make_private
from gmemtest.scenarios import PRIVATE_NPAGES
from gmemtest.under_test import PROJECT_QEMU, UnderTest
from guests.probe_client import PAGE_4K, ProbeClient
from guests.profiles import kvm_swprot_profile
from qmp_helpers.conversions import convert

__all__ = ["measure"]

PROBE_PATH = "/usr/bin/gmem-probe"


def measure(round_trips: int, workdir: Path) -> dict[str, Any]:
    if round_trips < 1:
        raise ValueError(f"round trips must be >= 1, got {round_trips}")
    chosen = UnderTest.from_params(lambda name: PROJECT_QEMU if name == "qemu" else None)
    problems = chosen.problems()
    if problems:
        raise ValueError("; ".join(problems))
    image = chosen.guest_image()
    samples: list[float] = []
    replies: list[float] = []
    with booted_guest(image, workdir, profile=kvm_swprot_profile(), binary=chosen.qemu, snapshot=False) as guest:
        probe = ProbeClient(guest.ssh.start(PROBE_PATH))
        try:
            mapping = probe.map("anon4k", PRIVATE_NPAGES)
            probe.lock(mapping.id)
            page = make_private(guest, probe, mapping)
            for _ in range(round_trips):
                way_back = convert(guest.machine, page.gpa, PAGE_4K, False)
                way_there = convert(guest.machine, page.gpa, PAGE_4K, True)
                if not (way_back.ok and way_there.ok) or way_back.traced_ms is None or way_there.traced_ms is None:
                    raise RuntimeError(f"a round trip failed: {way_back.describe()}; {way_there.describe()}")
                samples.append(way_back.traced_ms + way_there.traced_ms)
                replies.append(way_back.reply_ms + way_there.reply_ms)
            convert(guest.machine, page.gpa, PAGE_4K, False)
        finally:
            probe.close()
        qemu = guest.launch_record().get("qemu", {})
    return {"round_trips": round_trips, "gpa": page.gpa, "qemu": qemu,
            "round_trip_to_trace_ms": {"median": round(statistics.median(samples), 2), "min": round(min(samples), 2),
                                       "max": round(max(samples), 2), "samples": samples},
            "round_trip_to_reply_ms": {"median": round(statistics.median(replies), 2), "samples": replies}}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m gmemtest.conversion_bench ROUND_TRIPS OUT.json", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gmemtest-conv-") as tmp:
        result = measure(int(argv[0]), Path(tmp))
    Path(argv[1]).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.endswith("_ms")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
