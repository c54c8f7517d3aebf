"""Qualify the kernel inside the lab host: the host-side checks, run for real in L1.

One L1 boot runs commands of this very checkout inside L1 (the same code a real lab host
runs): ``gmemtest preflight --json``, ``gmemtest qualify --no-guest --memory shared`` and, given
a guest image, the whole chain (``gmemtest run`` of every host-poison row under each KVM profile,
each L2 guest a QEMU inside L1), all under Debian's stock KVM modules. Then the private-memory
section: L1 swaps its KVM for the pair rebuilt with ``CONFIG_KVM_SW_PROTECTED_VM``
(``gmemtest.lab.kvm``; about 1 s) and runs ``preflight`` and ``qualify --memory private`` again.
One boot serves both, so the stock kernel's qualification never runs on the rebuilt modules.
Their files come back through L1's results share; the qualification of the L1 kernel is then
read here like any other (the private section's items added to it), the chain per profile from
``chain/<profile>/``.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gmemtest.lab.host import (
    L1_FAILURES,
    RESULTS_IN_L1,
    LabhostError,
    LabhostTimings,
    booted_labhost,
    l1_attempt_name,
)
from gmemtest.lab.kvm import SW_PROTECTED, kvm_command
from gmemtest.report_model import Item, Qualification
from gmemtest.scenarios import SCENARIOS, Source, unsupported_under
from guests.profiles import get_profile
from images.build import build_lock
from images.labhost import LabhostImage
from outcome import Verdict

__all__ = ["ChainVariant", "LabhostQualification", "chain_variants", "first_qemu_with", "lab_chain_variants",
           "qualify_in_labhost", "shared_run"]

LOG = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]  # gmemtest/lab/qualify.py -> the checkout
PREFLIGHT_NAME = "preflight.json"
QUAL_DIR = "qual"
PRIVATE_QUAL_DIR = "qual-private"
PRIVATE_PREFLIGHT_NAME = "preflight-private.json"
RESULT_NAME = "labhost-qualification.json"
# Inside L1 (TCG, 2 vCPUs) the host checks and the seed regression take well under a minute.
INNER_TIMEOUT_S = 600.0
CHAIN_DIR = "chain"
NEWER_QEMU = "newer-qemu"
GMEM_VARIANT = "kvm-gmem"  # the chain variant on guest_memfd RAM, under the first QEMU that offers it
# The software-protected VM's rows, under the first QEMU that has the object, and under L1's
# private-memory KVM (the rebuilt modules), after the private section.
SWPROT_VARIANT = "kvm-swprot"


@dataclass(frozen=True)
class ChainVariant:
    """One run of the chain rows inside L1: a KVM profile under one QEMU.

    ``label`` names the evidence directory (``chain/<label>/``) and the report items
    (``<scenario>/<label>``); ``qemu`` None is L1's own ``qemu-system-x86_64`` (the host's).
    """

    label: str
    profile: str
    qemu: Path | None = None
    # Runs under L1's private-memory KVM (``qualify_once``'s ``private_kvm``), not Debian's stock one.
    private_kvm: bool = False

    @property
    def scenarios(self) -> tuple[str, ...]:
        """The chain rows that mean something under this profile (gmemtest.scenarios.unsupported_under)."""
        profile = get_profile(self.profile)
        return tuple(s.name for s in SCENARIOS
                     if (s.source is Source.HOST or s.private) and unsupported_under(s, profile) is None)


def chain_variants(newer_qemu: Path | None, built_qemu: Path | None = None) -> tuple[ChainVariant, ...]:
    """Every KVM profile a lab host can have (plain RAM, RAM on the host's 2 MiB hugetlb pages,
    guest_memfd RAM, a software-protected VM); with a newer QEMU (images.qemu_root) also kvm-default
    under it. kvm-gmem and kvm-swprot run under the first QEMU that offers what they need (QOM,
    probed here: L1 runs the same files): the project's own (images.qemu_build), Debian's newest;
    with none, under Debian's newest, whose lack of it the rows then report."""
    variants = [ChainVariant("kvm-default", "kvm-default")]
    if newer_qemu is not None:
        variants.append(ChainVariant(f"kvm-default+{NEWER_QEMU}", "kvm-default", newer_qemu))
    variants.append(ChainVariant("kvm-hugetlb", "kvm-hugetlb"))
    candidates = (built_qemu, newer_qemu)
    variants.append(ChainVariant(GMEM_VARIANT, "kvm-gmem", first_qemu_with("guest-memfd", candidates, newer_qemu)))
    variants.append(ChainVariant(SWPROT_VARIANT, "kvm-swprot", first_qemu_with("x-sw-protected-vm", candidates,
                                                                                  newer_qemu), private_kvm=True))
    return tuple(variants)


def lab_chain_variants() -> tuple[ChainVariant, ...]:
    """``chain_variants`` with the QEMUs the project provides: Debian's newest in its own root and
    the project's own build (both cached; built here when they are not)."""
    from images.qemu_build import build_qemu
    from images.qemu_root import build_qemu_root

    return chain_variants(build_qemu_root().binary, build_qemu().binary)


def first_qemu_with(requirement: str, candidates: Sequence[Path | None], fallback: Path | None) -> Path | None:
    """The first of ``candidates`` that has ``qemu:<requirement>`` (gmemtest.requirements), else ``fallback``."""
    from gmemtest.requirements import qemu_missing, qemu_report

    for qemu in candidates:
        if qemu is None:
            continue
        caps = qemu_report(str(qemu))
        if not isinstance(caps, str) and qemu_missing(requirement, caps) is None:
            return qemu
    return fallback


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
    chain_rc: dict[str, int] | None = None
    private_kvm: str = SW_PROTECTED  # L1's KVM for the private-memory section
    private_rc: int | None = None

    @property
    def items(self) -> dict[str, dict[str, Any]]:
        return {str(i["name"]): i for i in self.qualification.get("items", [])}

    def to_json(self) -> dict[str, Any]:
        return {"kernel_release": self.kernel_release, "image_manifest": self.image_manifest,
                "preflight_rc": self.preflight_rc, "qualify_rc": self.qualify_rc,
                "timings": self.timings, "out": str(self.out), "chain_rc": self.chain_rc,
                "private_kvm": self.private_kvm, "private_rc": self.private_rc,
                "outcome": self.qualification.get("outcome")}

    @classmethod
    def load(cls, out: Path) -> LabhostQualification:
        doc = json.loads((out / RESULT_NAME).read_text())
        return cls(out=out, kernel_release=doc["kernel_release"], image_manifest=doc["image_manifest"],
                   preflight=json.loads((out / PREFLIGHT_NAME).read_text()),
                   qualification=json.loads((out / "qualification.json").read_text()),
                   preflight_rc=doc["preflight_rc"], qualify_rc=doc["qualify_rc"], timings=doc["timings"],
                   chain_rc=doc.get("chain_rc"), private_kvm=doc.get("private_kvm", SW_PROTECTED),
                   private_rc=doc.get("private_rc"))


def _read_json(path: Path, what: str, output: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LabhostError(f"{what} inside L1 left no readable {path.name} ({exc}); its output ended:\n"
                           f"{output[-2000:]}") from exc
    if not isinstance(data, dict):
        raise LabhostError(f"{what} inside L1 wrote {path.name} that is not a JSON object")
    return data


def _chain_command(variant: ChainVariant, guest_manifest: Path) -> list[str]:
    """``gmemtest run`` of the chain rows of ``variant`` inside L1, its evidence copied to the share.

    QEMU's logs stay on L1's tmpfs while it runs (a file appended to on the 9p share reads back
    ENODATA) and are copied out afterwards, whatever the exit status.
    """
    inner = f"/tmp/{CHAIN_DIR}-{variant.label}"  # noqa: S108 - the tmpfs of L1 itself, private to this run
    dest = f"{RESULTS_IN_L1}/{CHAIN_DIR}/{variant.label}"
    script = (f'"$@" --out {inner}; rc=$?; mkdir -p {RESULTS_IN_L1}/{CHAIN_DIR}; rm -rf {dest}; '
              f'cp -r {inner} {dest}; exit $rc')
    qemu = ["--qemu", str(variant.qemu)] if variant.qemu is not None else []
    return ["sh", "-c", script, "sh", sys.executable, "-m", "gmemtest.cli", "run", "--profile", variant.profile,
            *qemu, "--guest-manifest", str(guest_manifest), *variant.scenarios]


def _private_command(kvm: str, kernel_release: str) -> list[str]:
    """Under ``kvm``: preflight (which KVM L1 now runs, its VM types) and the private-memory checks."""
    inner = (f'"$@" preflight --json --no-plan > {RESULTS_IN_L1}/{PRIVATE_PREFLIGHT_NAME}; '
             f'exec "$@" qualify --no-guest --memory private --out {RESULTS_IN_L1}/{PRIVATE_QUAL_DIR}')
    return kvm_command(kvm, ["sh", "-c", inner, "sh", sys.executable, "-m", "gmemtest.cli"], kernel_release)


def qualify_in_labhost(image: LabhostImage, out: Path, *, timeout: float = INNER_TIMEOUT_S,
                       on_output: Callable[[str], None] | None = None,
                       guest_manifest: Path | None = None,
                       variants: Sequence[ChainVariant] = (), private_kvm: str = SW_PROTECTED) -> LabhostQualification:
    """:func:`qualify_once`, retried once in a fresh L1 if the first one froze, never got ready or its kernel died.

    Both are failures of the nested stack under TCG, not of the host under test (seen: an L1
    freeze about once in 20 chain runs; an L1 oops, a kernel stack overflow of recursive page
    faults in the exception entry while a vCPU thread ran KVM_RUN, twice in about ten shared runs
    that ran beside the TCG guest tests). The failed attempt's evidence (L1 console with the oops,
    output, ``labhost/frozen.txt`` for a freeze) is kept in ``out/<frozen|died>-attempt-1/``.
    """
    from gmemtest.evidence import retry_once

    return retry_once(lambda: qualify_once(image, out, timeout=timeout, on_output=on_output,
                                           guest_manifest=guest_manifest, variants=variants,
                                           private_kvm=private_kvm),
                      retry_on=L1_FAILURES, workdir=out.absolute(),
                      set_aside_as=l1_attempt_name, only=["labhost", "l1-results"])




def qualify_once(image: LabhostImage, out: Path, *, timeout: float = INNER_TIMEOUT_S,
                 on_output: Callable[[str], None] | None = None,
                 guest_manifest: Path | None = None,
                 variants: Sequence[ChainVariant] = (), private_kvm: str = SW_PROTECTED) -> LabhostQualification:
    """Boot L1 from ``image``, run preflight and the host qualification in it, keep everything in ``out``.

    ``out`` gets ``qualification.json``/``.html`` (the L1 kernel's qualification), ``preflight.json``,
    ``labhost/`` (L1 console, command output, dmesg) and ``labhost-qualification.json``; with a
    ``guest_manifest`` (the L2 guest image) also ``chain/<label>/`` for every chain variant. The
    private-memory section runs last under ``private_kvm`` (its preflight in ``preflight-private.json``).
    """
    private_argv = _private_command(private_kvm, image.kernel_release)  # builds the modules before L1 boots
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
                       *python, "preflight", "--json", "--no-plan"], timeout, on_output=on_output)
        qual = run.run([*python, "qualify", "--no-guest", "--memory", "shared", "--out", inner_qual], timeout,
                       on_output=on_output)
        chain_rc: dict[str, int] | None = None if guest_manifest is None else {}
        chain_s: dict[str, float] = {}

        def chain(stage: Sequence[ChainVariant]) -> None:
            if guest_manifest is None or chain_rc is None:
                return
            for variant in stage:
                argv = _chain_command(variant, guest_manifest.absolute())
                if variant.private_kvm:
                    argv = kvm_command(private_kvm, argv, image.kernel_release)
                done = run.run(argv, timeout, on_output=on_output)
                chain_rc[variant.label] = done.returncode
                chain_s[variant.label] = round(done.seconds, 2)

        chain([v for v in variants if not v.private_kvm])
        private = run.run(private_argv, timeout, on_output=on_output)
        chain([v for v in variants if v.private_kvm])  # L1 runs the private-memory KVM from here on
        timings = run.timings
    preflight = _read_json(share / PREFLIGHT_NAME, "gmemtest preflight", pre.output)
    qualification = _read_json(share / QUAL_DIR / "qualification.json", "gmemtest qualify", qual.output)
    _copy_back(share, out)  # the report itself is written by _merge, with the other sections in it
    private_items = _private_section(share, out, private.output, private_kvm)
    qualification = _merge(qualification, out, variants if chain_rc is not None else (), private_items)
    result = LabhostQualification(
        out=out, kernel_release=image.kernel_release, image_manifest=str(image.manifest),
        preflight=preflight, qualification=qualification, preflight_rc=pre.returncode,
        qualify_rc=qual.returncode, chain_rc=chain_rc, private_kvm=private_kvm, private_rc=private.returncode,
        timings={**timings.as_json(), "preflight_s": round(pre.seconds, 2), "qualify_s": round(qual.seconds, 2),
                 "private_s": round(private.seconds, 2), "chain_s": chain_s})
    (out / RESULT_NAME).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def chain_item(row: dict[str, Any], label: str, out: Path) -> Item:
    """One chain row of ``gmemtest run``'s summary as a qualification item (section "chain"),
    made from the row's verdict as L1 judged it, every check listed; its evidence (beside it in
    ``verdict.json``) is linked unless the row could not run."""
    name = f"{row['scenario']}/{label}"
    evidence = f"{CHAIN_DIR}/{label}/{row['scenario']}"
    if "verdict" not in row:
        verdict = Verdict.did_not_run(name, "ERROR", f"gmemtest run's summary row has no verdict: {row}")
    else:
        verdict = Verdict.from_dict(row["verdict"])
    if verdict.not_run == "CANNOT RUN":
        return Item.from_verdict("chain", name, verdict, "")
    qemu = verdict.setup.get("qemu") or {}
    under = f" (QEMU {qemu.get('version')}, {qemu.get('package')})" if qemu else ""
    return Item.from_verdict("chain", name, verdict, f"{len(verdict.checks)} checks at the host, QEMU and guest{under}",
                             evidence=evidence, all_checks=True)


def _copy_evidence(report_dir: Path, out: Path) -> None:
    """What the checks of a ``qualify`` run wrote next to its report (the report itself is merged)."""
    for extra in report_dir.iterdir():
        if extra.name not in ("qualification.json", "qualification.html"):
            dest = out / extra.name
            if extra.is_dir():
                shutil.copytree(extra, dest, dirs_exist_ok=True)
            else:
                shutil.copyfile(extra, dest)


def _copy_back(share: Path, out: Path) -> None:
    """The stock section's preflight, chain and the evidence its checks wrote next to the report."""
    shutil.copyfile(share / PREFLIGHT_NAME, out / PREFLIGHT_NAME)
    if (share / CHAIN_DIR).is_dir():
        shutil.copytree(share / CHAIN_DIR, out / CHAIN_DIR, dirs_exist_ok=True)
    _copy_evidence(share / QUAL_DIR, out)


def _private_section(share: Path, out: Path, output: str, kvm: str) -> Qualification:
    """The private-memory section's qualification, its evidence and preflight copied into ``out``,
    each item's summary naming L1's ``kvm``; a section that left no report is one ERROR item saying so."""
    where = share / PRIVATE_QUAL_DIR
    if (share / PRIVATE_PREFLIGHT_NAME).is_file():
        shutil.copyfile(share / PRIVATE_PREFLIGHT_NAME, out / PRIVATE_PREFLIGHT_NAME)
    try:
        doc = _read_json(where / "qualification.json", "gmemtest qualify --memory private", output)
    except LabhostError as exc:
        broke = Verdict.did_not_run("private-memory section", "ERROR", str(exc)[:1500])
        return Qualification(started="", items=[Item.from_verdict("host", broke.scenario, broke, "")])
    _copy_evidence(where, out)
    section = Qualification.from_json(doc)
    for item in section.items:
        item.summary = f"{item.summary} [L1 KVM: {kvm}]"
    return section


def _merge(qualification: dict[str, Any], out: Path, variants: Sequence[ChainVariant],
           private: Qualification) -> dict[str, Any]:
    """The L1 kernel's qualification with the private section's items and findings and one item
    per chain row and variant; the report re-rendered."""
    from gmemtest.report_html import render

    q = Qualification.from_json(qualification)
    q.items.extend(private.items)
    q.add_findings(private.findings)
    for variant in variants:
        path = out / CHAIN_DIR / variant.label / "summary.json"
        if not path.is_file():
            broke = Verdict.did_not_run(f"chain/{variant.label}", "ERROR",
                                        f"gmemtest run inside L1 left no {path.name}")
            q.items.append(Item.from_verdict("chain", broke.scenario, broke, ""))
            continue
        rows = json.loads(path.read_text())
        q.items.extend(chain_item(row, variant.label, out) for row in rows)
        # What the chain found (guest_memfd's delayed recovery, QEMU dropping the lsb): in the report too.
        q.add_findings(f for row in rows for f in (row.get("verdict") or {}).get("findings", []))
    doc = q.to_json()
    (out / "qualification.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "qualification.html").write_text(render(q))
    return doc


# A shared run that failed is tried again by the next caller (a transient failure should not fail
# every lab-host test of the job); after this many failures the rest fail at once with the reason.
SHARED_RUN_ATTEMPTS = 2


def shared_run(image: LabhostImage, batch_root: Path, guest_manifest: Path | None = None,
               variants: Sequence[ChainVariant] = (), private_kvm: str = SW_PROTECTED) -> LabhostQualification:
    """The L1 run of ``image`` under ``batch_root``: made by the first caller, read by the others.

    Callers are the lab-host tests of one Avocado job (separate processes): a lock serialises
    them, the first boots L1, the rest read its files. A run that failed keeps its evidence in
    ``failed-attempt-N/`` (with why.txt) and is tried again by the next caller, up to
    ``SHARED_RUN_ATTEMPTS`` times; each test reports the failure it met.
    """
    from gmemtest.evidence import set_aside

    key = Path(image.manifest).parent.name + ("" if private_kvm == SW_PROTECTED else f"-{private_kvm}")
    out = batch_root / f"labhost-{key}"
    with build_lock(batch_root / f".labhost-{key}.lock"):
        if (out / RESULT_NAME).is_file():
            LOG.info("lab-host run %s reused", out)
            return LabhostQualification.load(out)
        failed = sorted(out.glob("failed-attempt-*/why.txt")) if out.is_dir() else []
        if len(failed) >= SHARED_RUN_ATTEMPTS:
            raise LabhostError(f"the job's shared L1 run failed {len(failed)} times; the last time: "
                               f"{failed[-1].read_text()[:1500]} (evidence in {failed[-1].parent})")
        t0 = time.monotonic()
        try:
            result = qualify_in_labhost(image, out, guest_manifest=guest_manifest, variants=variants,
                                        private_kvm=private_kvm)
        except LabhostError as exc:
            set_aside(out, f"failed-attempt-{len(failed) + 1}", f"{type(exc).__name__}: {exc}",
                      only=["labhost", "l1-results"])
            raise
        LOG.info("lab-host run %s took %.1f s", out, time.monotonic() - t0)
        return result
