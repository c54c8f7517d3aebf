"""Debian packages as build inputs: resolve candidates, download, verify, extract.

Versions come from an apt configuration at build time (the candidate version): the
machine's own, or a private one (:func:`private_apt`) that adds a suite for downloads
only. Never from what happens to be installed on the host: the host's libc
may be newer than the suite the guest is assembled from. apt's own SHA256 of each
``.deb`` is part of the pin, so a cached download is checked against the index it
was resolved from. Extraction is ``dpkg-deb -x`` into a plain directory: no root,
no chroot, no maintainer scripts.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from images.errors import ImageError

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "KERNEL_METAPACKAGE",
    "SYSTEM_APT",
    "AptConfig",
    "PackageError",
    "PackagePin",
    "deb_pin",
    "debian_uri",
    "download",
    "extract",
    "package_depends",
    "package_names",
    "private_apt",
    "resolve",
    "resolve_kernel",
    "sha256_file",
    "update",
]

_log = logging.getLogger(__name__)

# Depends on the current generic-flavour image package; the unsigned twin of that
# package carries the same kernel without the signed-bootloader plumbing.
KERNEL_METAPACKAGE = "linux-image-amd64"
_APT_TIMEOUT_S = 120.0
_DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
_SUITE_RE = re.compile(r"^[a-z][a-z0-9.-]*$")


@dataclass(frozen=True)
class AptConfig:
    """Which apt configuration a call uses: the system's, or a private one.

    A private configuration adds a suite for downloads only (a trixie kernel for a
    bookworm host) without touching ``/etc/apt``: every ``Dir::*`` apt reads or writes
    points into a directory the builder owns.
    """

    options: tuple[str, ...] = ()
    label: str = "system apt"

    def args(self) -> list[str]:
        return [arg for opt in self.options for arg in ("-o", opt)]


SYSTEM_APT = AptConfig()


class PackageError(ImageError, RuntimeError):
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


def _deb822_uri(text: str, suite: str) -> str | None:
    for stanza in text.split("\n\n"):
        fields = {k.strip(): v.strip() for k, _, v in
                  (line.partition(":") for line in stanza.splitlines() if ":" in line)}
        if suite in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
            uris = fields.get("URIs", "").split()
            if uris:
                return uris[0]
    return None


def _one_line_uri(text: str, suite: str) -> str | None:
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb" or suite not in words:
            continue
        for word in words[1:]:
            if re.match(r"^[a-z+]+://", word):
                return word
    return None


def debian_uri(etc_apt: Path = Path("/etc/apt"), suite: str = "bookworm") -> str:
    """URI of the machine's own Debian source for ``suite`` (deb822 first, then .list).

    The same rule as ``debian_uri`` in ``ci/bootstrap-host.sh``: a suite added for
    downloads comes from the mirror the machine already uses, so no mirror host name
    lives in the repository.
    """
    parts = etc_apt / "sources.list.d"
    for path in sorted(parts.glob("*.sources")):
        if uri := _deb822_uri(path.read_text(errors="replace"), suite):
            return uri
    for path in [etc_apt / "sources.list", *sorted(parts.glob("*.list"))]:
        if path.is_file() and (uri := _one_line_uri(path.read_text(errors="replace"), suite)):
            return uri
    raise PackageError(f"no Debian apt source for suite {suite!r} under {etc_apt} "
                       "(sources.list.d/*.sources or *.list) to take the mirror URI from")


def private_apt(root: Path, suite: str, *, uri: str | None = None,
                components: Sequence[str] = ("main",), keyring: str = _DEBIAN_KEYRING,
                base: Sequence[str] = (), source: bool = False) -> AptConfig:
    """An apt configuration under ``root`` that lists only ``suite`` of ``uri`` (and ``base``).

    Sources, lists, cache, preferences and the dpkg status all live under ``root``,
    so the candidate depends on those suites alone (not on what the host has installed
    or pinned) and ``/etc/apt`` is never written. ``base`` suites (e.g. trixie under
    trixie-backports) supply dependencies; ``suite`` is pinned above them, so its
    version is the candidate wherever it has one. ``source`` lists the suites' source
    packages (``deb-src``) instead of their binaries.
    """
    for name in (suite, *base):
        if not _SUITE_RE.match(name):
            raise PackageError(f"suite {name!r} is not a Debian suite name "
                               "(lower-case letters, digits, '.', '-'; e.g. trixie-backports)")
    uri = uri if uri is not None else debian_uri()
    root = root.absolute()
    for sub in ("etc/sources.list.d", "etc/preferences.d", "lists/partial", "cache/archives/partial"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    sources = root / "etc" / "sources.list"
    kind = "deb-src" if source else "deb"
    line = "".join(f"{kind} [signed-by={keyring}] {uri} {name} {' '.join(components)}\n" for name in (suite, *base))
    if not sources.is_file() or sources.read_text() != line:
        sources.write_text(line)
    preferences = root / "etc" / "preferences"
    pin = f"Package: *\nPin: release n={suite}\nPin-Priority: 990\n" if base else ""  # n: the codename
    if not preferences.is_file() or preferences.read_text() != pin:
        preferences.write_text(pin)
    status = root / "status"
    if not status.exists():
        status.write_text("")
    options = (
        f"Dir::Etc::SourceList={sources}",
        f"Dir::Etc::SourceParts={root / 'etc' / 'sources.list.d'}",
        f"Dir::Etc::Preferences={root / 'etc' / 'preferences'}",
        f"Dir::Etc::PreferencesParts={root / 'etc' / 'preferences.d'}",
        f"Dir::State::Lists={root / 'lists'}",
        f"Dir::State::status={status}",
        f"Dir::Cache={root / 'cache'}",
        "APT::Architectures::=amd64",
        "Acquire::Languages=none",
    )
    return AptConfig(options, label=f"private apt ({suite})")


def update(apt: AptConfig) -> None:
    """``apt-get update`` of a private configuration (the system's is the admin's job)."""
    if apt == SYSTEM_APT:
        raise PackageError("refusing to run apt-get update on the system configuration")
    _run(["apt-get", *apt.args(), "-q", "update"])


def resolve(names: Iterable[str], apt: AptConfig = SYSTEM_APT) -> tuple[PackagePin, ...]:
    """Candidate version of each package in one ``apt-cache show`` call."""
    wanted = list(dict.fromkeys(names))
    text = _run(["apt-cache", *apt.args(), "show", "--no-all-versions", *wanted])
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
        raise PackageError(f"{apt.label} has no candidate for {', '.join(absent)}; "
                           "run 'apt-get update' or check the configured suites")
    return tuple(found[n] for n in wanted)


_INST_RE = re.compile(r"^Inst (\S+) \((\S+) ", re.MULTILINE)


def install_closure(names: Iterable[str], apt: AptConfig) -> tuple[PackagePin, ...]:
    """Pins of every package an install of ``names`` into an empty system needs (no recommends).

    apt itself resolves the dependencies (``apt-get -s install`` against the private, empty
    dpkg status), so the set is what a real install would unpack: a root that runs a program
    built for another release (QEMU of trixie-backports on a bookworm host) with its own libc.
    """
    if apt == SYSTEM_APT:
        raise PackageError("a closure is resolved against a private apt configuration (empty dpkg status)")
    wanted = list(dict.fromkeys(names))
    text = _run(["apt-get", *apt.args(), "-o", "Debug::NoLocking=1", "-s", "-q", "--no-install-recommends",
                 "install", *wanted])
    chosen = dict(_INST_RE.findall(text))
    absent = [n for n in wanted if n not in chosen]
    if absent:
        raise PackageError(f"{apt.label}: an install of {', '.join(wanted)} would not install {', '.join(absent)}")
    records = _records(_run(["apt-cache", *apt.args(), "show", *(f"{n}={v}" for n, v in chosen.items())]))
    pins: dict[str, PackagePin] = {}
    for rec in records:
        name = rec.get("Package", "")
        if chosen.get(name) == rec.get("Version") and name not in pins:
            pins[name] = PackagePin(name, rec["Version"], rec["SHA256"], rec["Filename"].rsplit("/", 1)[-1])
    missing = sorted(set(chosen) - set(pins))
    if missing:
        raise PackageError(f"{apt.label}: no index record for {', '.join(missing)}")
    return tuple(pins[n] for n in sorted(pins))


def package_names(prefix: str, apt: AptConfig = SYSTEM_APT) -> tuple[str, ...]:
    """Every package name apt knows that starts with ``prefix`` (``apt-cache pkgnames``)."""
    return tuple(sorted(_run(["apt-cache", *apt.args(), "pkgnames", prefix]).split()))


def package_depends(name: str, apt: AptConfig = SYSTEM_APT) -> tuple[str, ...]:
    """Names in the candidate's ``Depends`` (first alternative of each, no versions)."""
    text = _run(["apt-cache", *apt.args(), "show", "--no-all-versions", name])
    for rec in _records(text):
        if rec["Package"] == name:
            return tuple(dep.split("|")[0].strip().split(" ", 1)[0]
                         for dep in rec.get("Depends", "").split(",") if dep.strip())
    raise PackageError(f"{apt.label} has no candidate for {name}")


def deb_pin(deb: Path) -> PackagePin:
    """A pin for a ``.deb`` the user supplied: its control fields and its own sha256."""
    fields = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"])
    values = dict(line.split(": ", 1) for line in fields.splitlines() if ": " in line)
    if "Package" not in values or "Version" not in values:
        raise PackageError(f"{deb}: not a Debian package (dpkg-deb -f gave {fields!r})")
    return PackagePin(values["Package"], values["Version"], sha256_file(deb), deb.name)


def resolve_kernel(metapackage: str = KERNEL_METAPACKAGE) -> str:
    """Name of the unsigned generic-flavour image package the metapackage points at."""
    text = _run(["apt-cache", "show", "--no-all-versions", metapackage])
    for rec in _records(text):
        for dep in rec.get("Depends", "").split(","):
            name = dep.strip().split(" ", 1)[0]
            if name.startswith("linux-image-") and name != metapackage:
                return name if name.endswith("-unsigned") else f"{name}-unsigned"
    raise PackageError(f"{metapackage} has no linux-image-* dependency in apt's candidate")


def download(pins: Iterable[PackagePin], deb_dir: Path,
             apt: AptConfig = SYSTEM_APT) -> dict[str, Path]:
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
            _run(["apt-get", *apt.args(), "download", "-q",
                  *(f"{p.name}={p.version}" for p in missing)],
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


def source_versions(package: str, apt: AptConfig) -> list[str]:
    """Every version of source ``package`` the configuration's Sources list, newest first."""
    text = _run(["apt-cache", *apt.args(), "showsrc", package])
    versions = {rec["Version"] for rec in _records(text) if rec.get("Package") == package and "Version" in rec}
    if not versions:
        raise PackageError(f"{apt.label} lists no source package {package!r}")

    def compare(a: str, b: str) -> int:
        newer = subprocess.run(["dpkg", "--compare-versions", a, "gt", b], check=False).returncode == 0
        return 1 if newer else (0 if a == b else -1)

    return sorted(versions, key=functools.cmp_to_key(compare), reverse=True)


def download_source(package: str, version: str, dest: Path, apt: AptConfig) -> list[Path]:
    """``apt-get source --download-only package=version`` into ``dest`` (apt checks every file
    against the Sources index); the .dsc first. A file the archive does not serve (it has
    listed sources whose files answer 404) is a ``PackageError`` naming the version."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".dl-") as tmp:
        try:
            _run(["apt-get", *apt.args(), "-q", "source", "--download-only", f"{package}={version}"], cwd=Path(tmp))
        except PackageError as exc:
            raise PackageError(f"source {package} {version} does not download: {exc}") from exc
        got = sorted(Path(tmp).iterdir(), key=lambda p: (not p.name.endswith(".dsc"), p.name))
        for path in got:
            os.replace(path, dest / path.name)
    return [dest / path.name for path in got]


def extract(deb: Path, dest: Path) -> None:
    """Unpack the data part of ``deb`` under ``dest`` (no maintainer scripts run)."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
