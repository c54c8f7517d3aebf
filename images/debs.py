"""Debian packages as build inputs: resolve candidates, download, verify, extract.

Versions come from the machine's apt configuration at build time (the candidate
version), never from what happens to be installed on the host: the host's libc
may be newer than the suite the guest is assembled from. apt's own SHA256 of each
``.deb`` is part of the pin, so a cached download is checked against the index it
was resolved from. Extraction is ``dpkg-deb -x`` into a plain directory: no root,
no chroot, no maintainer scripts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = [
    "KERNEL_METAPACKAGE",
    "PackageError",
    "PackagePin",
    "download",
    "extract",
    "resolve",
    "resolve_kernel",
    "sha256_file",
]

_log = logging.getLogger(__name__)

# Depends on the current generic-flavour image package; the unsigned twin of that
# package carries the same kernel without the signed-bootloader plumbing.
KERNEL_METAPACKAGE = "linux-image-amd64"
_APT_TIMEOUT_S = 120.0


class PackageError(RuntimeError):
    """A package that apt cannot resolve, download or that fails verification."""


@dataclass(frozen=True, order=True)
class PackagePin:
    """One resolved package: what the cache key and the manifest record."""

    name: str
    version: str
    sha256: str
    filename: str  # basename of the .deb in the archive pool

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "filename": self.filename}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _run(argv: Sequence[str], cwd: Path | None = None) -> str:
    _log.debug("running %s", argv)
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                              timeout=_APT_TIMEOUT_S, env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError as exc:
        raise PackageError(f"{argv[0]} not found: building images needs apt and dpkg") from exc
    if done.returncode != 0:
        raise PackageError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _records(text: str) -> list[dict[str, str]]:
    records: list[dict[str, str]] = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            records.append(fields)
    return records


def resolve(names: Iterable[str]) -> tuple[PackagePin, ...]:
    """Candidate version of each package in one ``apt-cache show`` call."""
    wanted = list(dict.fromkeys(names))
    text = _run(["apt-cache", "show", "--no-all-versions", *wanted])
    found: dict[str, PackagePin] = {}
    for rec in _records(text):
        if rec["Package"] in found or rec["Package"] not in wanted:
            continue
        missing = [f for f in ("Version", "SHA256", "Filename") if f not in rec]
        if missing:
            raise PackageError(f"apt record of {rec['Package']} lacks {', '.join(missing)}")
        found[rec["Package"]] = PackagePin(rec["Package"], rec["Version"], rec["SHA256"],
                                           rec["Filename"].rsplit("/", 1)[-1])
    absent = [n for n in wanted if n not in found]
    if absent:
        raise PackageError(f"apt has no candidate for {', '.join(absent)}; "
                           "run 'apt-get update' or check the configured suites")
    return tuple(found[n] for n in wanted)


def resolve_kernel(metapackage: str = KERNEL_METAPACKAGE) -> str:
    """Name of the unsigned generic-flavour image package the metapackage points at."""
    text = _run(["apt-cache", "show", "--no-all-versions", metapackage])
    for rec in _records(text):
        for dep in rec.get("Depends", "").split(","):
            name = dep.strip().split(" ", 1)[0]
            if name.startswith("linux-image-") and name != metapackage:
                return name if name.endswith("-unsigned") else f"{name}-unsigned"
    raise PackageError(f"{metapackage} has no linux-image-* dependency in apt's candidate")


def download(pins: Iterable[PackagePin], deb_dir: Path) -> dict[str, Path]:
    """Fetch the missing ``.deb`` files into ``deb_dir``; verify every one by SHA256.

    Each download lands in a private temporary directory and is renamed into place,
    so parallel builds sharing ``deb_dir`` never see a partial file.
    """
    deb_dir.mkdir(parents=True, exist_ok=True)
    paths = {pin.name: deb_dir / pin.filename for pin in pins}
    pins = list(pins)
    missing = [pin for pin in pins if not paths[pin.name].is_file()]
    if missing:
        with tempfile.TemporaryDirectory(dir=deb_dir, prefix=".dl-") as tmp:
            _run(["apt-get", "download", "-q", *(f"{p.name}={p.version}" for p in missing)],
                 cwd=Path(tmp))
            for pin in missing:
                # apt names the file name_version_arch with ':' of the epoch as %3a.
                got = sorted(Path(tmp).glob(f"{pin.name}_*.deb"))
                if len(got) != 1:
                    raise PackageError(f"apt-get download of {pin.name}={pin.version} gave "
                                       f"{[g.name for g in got]}, expected one .deb")
                os.replace(got[0], paths[pin.name])
    for pin in pins:
        actual = sha256_file(paths[pin.name])
        if actual != pin.sha256:
            paths[pin.name].unlink()
            raise PackageError(f"{pin.filename}: sha256 {actual}, apt index says {pin.sha256}")
    return paths


def extract(deb: Path, dest: Path) -> None:
    """Unpack the data part of ``deb`` under ``dest`` (no maintainer scripts run)."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
