"""What a lab puts under test: its QEMU, profile, firmware, guest kernel or image, lab-host kernel.

One home for the parameters that Avocado (``-p qemu=PATH``) and the CLI (``--qemu PATH``) both
take, so a test and ``gmemtest run`` mean the same thing by them, check them the same way and
resolve the guest image the same way. Every value is checked before a guest boots: a missing
binary or firmware file, an unknown profile, is a sentence naming it, never a boot that fails
a minute later for a reason nobody reads.

The guest image is resolved once per job: resolving package pins costs two apt-cache calls, so
the first test of a job resolves it and records the manifest in the job directory, and every
other test loads that manifest, checked by ``images.build.image_from_manifest`` (key and
output hashes), which never reuses a stale image silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gmemtest.lab.kvm import KVM_CHOICES, SW_PROTECTED
from gmemtest.scenarios import ScenarioSpec
from guests.profiles import PROFILES, GuestProfile, get_profile
from images.build import BuildError, GuestImage, build_default_image, build_lock, image_from_manifest, newest_image_in
from images.debs import PackageError
from images.qemu_build import HOST_CACHE_ENV
from qmp_helpers import DEFAULT_QEMU, QemuError, resolve_binary

LOG = logging.getLogger(__name__)

# Set by ci/run-job.sh to the manifest it has just built or verified, so no test of the job
# resolves package pins again; also the default of ``-p guest_manifest`` / ``--guest-manifest``.
MANIFEST_ENV = "GMEMTEST_GUEST_MANIFEST"
# The per-job record of the resolved guest image, in the Avocado job directory.
JOB_IMAGE_DIR = "gmemtest-image"

# Avocado parameter name -> what it means (the CLI option is --NAME with '-' for '_').
PARAMETERS: dict[str, str] = {
    "qemu": "QEMU binary (a path, a name looked up on PATH, or 'project': the project's own build)",
    "profile": "guest profile to run every scenario under (gmemtest.scenarios' own by default)",
    "firmware": "firmware file for the profile's -bios (e.g. an SNP- or TDX-capable OVMF)",
    "guest_kernel": "a guest kernel of the lab's own (replaces the image's kernel)",
    "guest_initrd": "a guest initrd of the lab's own (replaces the image's initrd)",
    "guest_ssh_key": "the SSH private key the lab's initrd accepts (default: the image's key)",
    "guest_kernel_version": "a Debian guest kernel ABI version like 6.1.0-28 (default: the newest)",
    "guest_manifest": f"a built guest image's manifest.json (default: ${MANIFEST_ENV})",
    "labhost_kernel_version": "the lab host's Debian kernel version like 7.3.4+deb13",
    "labhost_kernel_suite": "the Debian suite the lab host's kernel comes from",
    "labhost_kvm": "the lab host's KVM for its private-memory checks: sw-protected (default; Debian's modules "
                   "rebuilt with CONFIG_KVM_SW_PROTECTED_VM) or stock (they cannot run)",
    "snapshot": "on (default): restore guests from a saved boot where one exists; off: boot every guest",
}
_SWITCH = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}
# The lab host's own QEMU arguments (an L1 under TCG) are a profile too, but no guest scenario's.
_NOT_GUEST_PROFILES = ("labhost-svm",)
_KERNEL_VERSION = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+-[0-9]+$")
# ``-p qemu=project`` / ``--qemu project``: the project's QEMU (images.qemu_build), cached or built.
PROJECT_QEMU = "project"


def _qemu(value: str | None) -> str:
    """The QEMU a lab named; ``project`` resolved to the project's build (kept as the word when that
    fails: ``problems`` then says why)."""
    if value != PROJECT_QEMU:
        return value or DEFAULT_QEMU
    from images.qemu_build import project_qemu

    try:
        return str(project_qemu())
    except (BuildError, PackageError) as exc:
        LOG.error("--qemu project: %s", exc)
        return PROJECT_QEMU


def _path(value: object) -> Path | None:
    return None if value is None or str(value) == "" else Path(str(value))


def _text(value: object) -> str | None:
    return None if value is None or str(value) == "" else str(value)


@dataclass(frozen=True)
class UnderTest:
    """The lab's choices; None means the built-in default."""

    qemu: str = DEFAULT_QEMU
    profile: str | None = None
    firmware: Path | None = None
    guest_kernel: Path | None = None
    guest_initrd: Path | None = None
    guest_ssh_key: Path | None = None
    guest_kernel_version: str | None = None
    guest_manifest: Path | None = None
    labhost_kernel_version: str | None = None
    labhost_kernel_suite: str | None = None
    labhost_kvm: str = SW_PROTECTED
    snapshot_value: str | None = None  # the raw parameter ("on"/"off"...), named when it is bad

    @classmethod
    def from_params(cls, get: Callable[[str], object]) -> UnderTest:
        """From a lookup by parameter name (Avocado's ``self.params.get``, an argparse namespace)."""
        manifest = _path(get("guest_manifest")) or _path(os.environ.get(MANIFEST_ENV))
        return cls(
            qemu=_qemu(_text(get("qemu"))), profile=_text(get("profile")),
            firmware=_path(get("firmware")), guest_kernel=_path(get("guest_kernel")),
            guest_initrd=_path(get("guest_initrd")), guest_ssh_key=_path(get("guest_ssh_key")),
            guest_kernel_version=_text(get("guest_kernel_version")), guest_manifest=manifest,
            labhost_kernel_version=_text(get("labhost_kernel_version")),
            labhost_kernel_suite=_text(get("labhost_kernel_suite")),
            labhost_kvm=_text(get("labhost_kvm")) or SW_PROTECTED,
            snapshot_value=_text(get("snapshot")),
        )

    @property
    def snapshot(self) -> bool:
        """Whether guests may be restored from a saved boot (on unless the lab switched it off)."""
        return _SWITCH.get((self.snapshot_value or "on").lower(), True)

    def problems(self) -> list[str]:
        """One sentence per bad value, checked without booting anything; empty when all are usable."""
        found: list[str] = []
        if self.qemu == PROJECT_QEMU:
            found.append("QEMU 'project' (qemu): the project's QEMU could not be had (python -m images qemu-build "
                         "builds it; the log above says why)")
        else:
            try:
                resolve_binary(self.qemu)
            except QemuError:
                found.append(f"QEMU binary {self.qemu!r} (qemu) does not exist or is not executable"
                             + ("" if os.sep in self.qemu else " and is not on PATH"))
        guest_profiles = [name for name in PROFILES if name not in _NOT_GUEST_PROFILES]
        if self.profile is not None and self.profile not in guest_profiles:
            found.append(f"unknown guest profile {self.profile!r} (profile); valid: {', '.join(guest_profiles)}")
        for name in ("firmware", "guest_kernel", "guest_initrd", "guest_ssh_key", "guest_manifest"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                found.append(f"{name.replace('_', ' ')} file {str(path)!r} ({name}) does not exist")
        if self.labhost_kvm not in KVM_CHOICES:
            found.append(f"lab host KVM {self.labhost_kvm!r} (labhost_kvm) is not one of {', '.join(KVM_CHOICES)}")
        if self.snapshot_value is not None and self.snapshot_value.lower() not in _SWITCH:
            found.append(f"snapshot {self.snapshot_value!r} (snapshot) is not a switch; valid: on, off")
        if self.guest_kernel_version is not None:
            if not _KERNEL_VERSION.match(self.guest_kernel_version):
                found.append(f"guest kernel version {self.guest_kernel_version!r} (guest_kernel_version) is "
                             "not a Debian kernel ABI version like 6.1.0-28")
            if self.guest_manifest is not None:
                found.append("give guest_kernel_version or guest_manifest, not both: a manifest already "
                             "names its kernel")
        return found

    def profile_for(self, spec: ScenarioSpec) -> GuestProfile:
        """The profile `spec` runs under here: the lab's choice or the scenario's, with its firmware, and
        QEMU's switch the row needs (x-private-hwpoison-mce, which the QEMU is then required to have)."""
        profile = self.profile_or(spec.profile)
        if spec.qemu_private_hwpoison_mce:
            profile = dataclasses.replace(
                profile, accel_options=(*profile.accel_options, "x-private-hwpoison-mce=on"),
                requirements=(*profile.requirements, "qemu:x-private-hwpoison-mce"))
        return profile

    def profile_or(self, default: str) -> GuestProfile:
        """The lab's profile choice, else ``default``, with the lab's firmware."""
        profile = get_profile(self.profile or default)
        if self.firmware is not None:
            profile = dataclasses.replace(profile, firmware=self.firmware.absolute())
        return profile

    def _image_key(self) -> str:
        doc = {"kernel_version": self.guest_kernel_version}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def _base_image(self, job_dir: Path | None) -> GuestImage:
        if self.guest_manifest is not None:
            return image_from_manifest(self.guest_manifest)
        kernel_package = (None if self.guest_kernel_version is None
                          else f"linux-image-{self.guest_kernel_version}-amd64-unsigned")
        host_cache = os.environ.get(HOST_CACHE_ENV)
        if host_cache and kernel_package is None:  # inside a lab host: the image its host built
            return newest_image_in(Path(host_cache))
        if job_dir is None:
            return build_default_image(kernel_package=kernel_package)
        record = job_dir / JOB_IMAGE_DIR / f"guest-{self._image_key()}.json"
        with build_lock(record.with_suffix(".lock")):
            if record.is_file():
                manifest = Path(json.loads(record.read_text())["manifest"])
                try:
                    return image_from_manifest(manifest)
                except BuildError as exc:  # said out loud, then resolved afresh
                    LOG.warning("the job's guest image record is no longer valid, resolving again: %s", exc)
            image = build_default_image(kernel_package=kernel_package)
            record.write_text(json.dumps({"manifest": str(image.manifest)}) + "\n")
            return image

    def guest_image(self, job_dir: Path | None = None) -> GuestImage:
        """The guest image under test; with `job_dir`, resolved once for the whole job.

        Raises BuildError (or PackageError for an unknown kernel version) with the reason.
        """
        try:
            image = self._base_image(job_dir)
        except PackageError as exc:
            raise BuildError(f"guest kernel version {self.guest_kernel_version!r}: {exc}") from exc
        if self.guest_kernel is None and self.guest_initrd is None and self.guest_ssh_key is None:
            return image
        kernel = self.guest_kernel.absolute() if self.guest_kernel else image.kernel
        return dataclasses.replace(
            image, kernel=kernel,
            initrd=self.guest_initrd.absolute() if self.guest_initrd else image.initrd,
            ssh_key=self.guest_ssh_key.absolute() if self.guest_ssh_key else image.ssh_key,
            kernel_release=f"lab kernel {kernel.name}" if self.guest_kernel else image.kernel_release,
        )

    def as_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

