"""Qualify the kernel inside the lab host: the host-side checks, run for real in L1.

One L1 boot runs two commands of this very checkout inside L1 (the same code a real lab host
runs): ``gmemtest preflight --json`` and ``gmemtest qualify --no-guest``. Their files come back
through L1's results share; the qualification of the L1 kernel is then read here like any other.

The Avocado lab-host tests share one such run per job and per L1 image (:func:`shared_run`):
L1 costs a boot of about 7 s and every check inside it cleans up after itself (unpoisoning what it
poisoned, a failed clean-up being a visible warning), so isolation does not need one boot each.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gmemtest.labhost import RESULTS_IN_L1, LabhostError, LabhostTimings, booted_labhost
from images.build import build_lock
from images.labhost import LabhostImage

__all__ = ["LabhostQualification", "qualify_in_labhost", "shared_run"]

LOG = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PREFLIGHT_NAME = "preflight.json"
QUAL_DIR = "qual"
RESULT_NAME = "labhost-qualification.json"
# Inside L1 (TCG, 2 vCPUs) the host checks and the seed regression take well under a minute.
INNER_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class LabhostQualification:
    """What one L1 run produced: the inner reports and where their evidence lies."""

    out: Path
    kernel_release: str
    image_manifest: str
    preflight: dict[str, Any]
    qualification: dict[str, Any]
    preflight_rc: int
    qualify_rc: int
    timings: dict[str, Any]

    @property
    def items(self) -> dict[str, dict[str, Any]]:
        return {str(i["name"]): i for i in self.qualification.get("items", [])}

    def to_json(self) -> dict[str, Any]:
        return {"kernel_release": self.kernel_release, "image_manifest": self.image_manifest,
                "preflight_rc": self.preflight_rc, "qualify_rc": self.qualify_rc,
                "timings": self.timings, "out": str(self.out),
                "outcome": self.qualification.get("outcome")}

    @classmethod
    def load(cls, out: Path) -> LabhostQualification:
        doc = json.loads((out / RESULT_NAME).read_text())
        return cls(out=out, kernel_release=doc["kernel_release"], image_manifest=doc["image_manifest"],
                   preflight=json.loads((out / PREFLIGHT_NAME).read_text()),
                   qualification=json.loads((out / "qualification.json").read_text()),
                   preflight_rc=doc["preflight_rc"], qualify_rc=doc["qualify_rc"], timings=doc["timings"])


def _read_json(path: Path, what: str, output: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LabhostError(f"{what} inside L1 left no readable {path.name} ({exc}); its output ended:\n"
                           f"{output[-2000:]}") from exc
    if not isinstance(data, dict):
        raise LabhostError(f"{what} inside L1 wrote {path.name} that is not a JSON object")
    return data


def qualify_in_labhost(image: LabhostImage, out: Path, *, timeout: float = INNER_TIMEOUT_S,
                       on_output: Callable[[str], None] | None = None) -> LabhostQualification:
    """Boot L1 from ``image``, run preflight and the host qualification in it, keep everything in ``out``.

    ``out`` gets ``qualification.json``/``.html`` (the L1 kernel's qualification), ``preflight.json``,
    ``labhost/`` (L1 console, command output, dmesg) and ``labhost-qualification.json``.
    """
    out = out.absolute()
    share = out / "l1-results"
    workdir = out / "labhost"
    if share.exists():
        shutil.rmtree(share)
    python = [sys.executable, "-m", "gmemtest.cli"]
    inner_qual = f"{RESULTS_IN_L1}/{QUAL_DIR}"
    timings: LabhostTimings
    with booted_labhost(image, workdir, share_dir=share, cwd=REPO) as run:
        pre = run.run(["sh", "-c", f'exec "$@" > {RESULTS_IN_L1}/{PREFLIGHT_NAME}', "sh",
                       *python, "preflight", "--json"], timeout, on_output=on_output)
        qual = run.run([*python, "qualify", "--no-guest", "--out", inner_qual], timeout, on_output=on_output)
        timings = run.timings
    preflight = _read_json(share / PREFLIGHT_NAME, "gmemtest preflight", pre.output)
    qualification = _read_json(share / QUAL_DIR / "qualification.json", "gmemtest qualify", qual.output)
    for name in ("qualification.json", "qualification.html"):
        shutil.copyfile(share / QUAL_DIR / name, out / name)
    shutil.copyfile(share / PREFLIGHT_NAME, out / PREFLIGHT_NAME)
    for extra in (share / QUAL_DIR).iterdir():  # evidence the checks wrote next to the report
        if extra.name not in ("qualification.json", "qualification.html"):
            dest = out / extra.name
            if extra.is_dir():
                shutil.copytree(extra, dest, dirs_exist_ok=True)
            else:
                shutil.copyfile(extra, dest)
    result = LabhostQualification(
        out=out, kernel_release=image.kernel_release, image_manifest=str(image.manifest),
        preflight=preflight, qualification=qualification, preflight_rc=pre.returncode,
        qualify_rc=qual.returncode,
        timings={**timings.as_json(), "preflight_s": round(pre.seconds, 2), "qualify_s": round(qual.seconds, 2)})
    (out / RESULT_NAME).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result



def shared_run(image: LabhostImage, batch_root: Path) -> LabhostQualification:
    """The L1 run of ``image`` under ``batch_root``: made by the first caller, read by the others.

    Callers are the lab-host tests of one Avocado job (separate processes): a lock serialises
    them, the first boots L1, the rest read its files. A run that failed is not cached: the next
    caller tries again, and each test reports the failure it met.
    """
    key = Path(image.manifest).parent.name
    out = batch_root / f"labhost-{key}"
    with build_lock(batch_root / f".labhost-{key}.lock"):
        if (out / RESULT_NAME).is_file():
            LOG.info("lab-host run %s reused", out)
            return LabhostQualification.load(out)
        t0 = time.monotonic()
        result = qualify_in_labhost(image, out)
        LOG.info("lab-host run %s took %.1f s", out, time.monotonic() - t0)
        return result
