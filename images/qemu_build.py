"""The QEMU under test, built by the project: Debian's QEMU source plus the project's own patch series.

No Debian QEMU can put an ordinary KVM guest's RAM on guest_memfd (upstream has it since 11.2:
``memory-backend-memfd,guest-memfd=on``), so the project builds its own from Debian's newest QEMU
source that downloads (the archive has listed sources whose files answer 404; such a version is
remembered and skipped for a day) with the series under ``images/patches/qemu`` (``series`` lists
them in order; each is QEMU's licence, GPL-2.0-or-later, and says so).

The recipe applies the patches one at a time: each must pass QEMU's own ``scripts/checkpatch.pl``
and the tree must build after each (the first build is the full one, the next ones incremental);
the manifest records every answer, and any failure is a ``BuildError`` naming the patch. The
binary is built for the host's libraries (it runs on this machine, and inside the lab host,
which shares this machine's root), for ``x86_64-softmmu`` with KVM only: it only ever runs
guests under KVM inside L1 (``CONFIGURE``). Firmware comes from the host's QEMU data
(``--firmwarepath``); ``--with-pkgversion`` names the series, so ``query-version`` says which
QEMU this is. Bookworm's meson is too old: sid's, unpacked privately, configures it.

The cache key is the source version, the series' digest, the configure line and this recipe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

from images import debs, manifest
from images.build import BuildError, cached_build, default_cache_root, indexed_apt

__all__ = ["CONFIGURE", "HOST_CACHE_ENV", "BuiltQemu", "PatchSeries", "build_qemu", "built_in_cache", "patch_series",
           "project_qemu"]

_log = logging.getLogger(__name__)

SOURCE_PACKAGE: Final = "qemu"
# Where Debian's QEMU sources are listed, newest first (sid carries the newest; the archive has
# served the .dsc of versions whose files answer 404).
SOURCE_SUITES: Final = ("sid", "trixie-backports", "trixie")
MESON_SUITE: Final = "sid"
# Set by the lab host (gmemtest.lab.host) for every command in L1: the cache of the host it runs in,
# read-only at the same path, where the project's QEMU was built.
HOST_CACHE_ENV: Final = "GMEMTEST_HOST_CACHE"
TARGET: Final = "qemu-system-x86_64"
CONFIGURE: Final = (
    "--target-list=x86_64-softmmu", "--enable-kvm", "--disable-tcg", "--enable-slirp", "--disable-docs",
    "--disable-tools", "--disable-user", "--disable-werror", "--disable-download", "--disable-install-blobs",
    "--prefix=/usr", "--disable-relocatable",
    "--firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu",
)
BUILD_DEPS: Final = ("ninja", "pkg-config", "gcc", "make", "patch", "perl", "dpkg-source", "flex", "bison")
NOT_SERVED_RETRY_S: Final = 86400.0
INDEX_FRESH_S: Final = 3600.0
BINARY: Final = "bin/qemu-system-x86_64"
_BUILDER_MODULES: Final = ("qemu_build.py", "debs.py", "build.py", "manifest.py")


@dataclass(frozen=True)
class PatchSeries:
    """The project's QEMU patches in order, and the digest that names the series."""

    patches: tuple[Path, ...]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for patch in self.patches:
            h.update(patch.name.encode() + b"\0" + patch.read_bytes() + b"\0")
        return h.hexdigest()

    @property
    def identity(self) -> str:
        """What ``--with-pkgversion`` says: the series' size and digest prefix."""
        return f"gmemtest series {len(self.patches)} patches {self.digest[:12]}"


def patch_series(directory: Path | None = None) -> PatchSeries:
    """The series listed in ``series`` (comments and blank lines skipped); a listed patch that is
    missing, or a patch file the list leaves out, is a ``BuildError``."""
    where = directory if directory is not None else Path(str(resources.files("images").joinpath("patches", "qemu")))
    listed = [line.strip() for line in (where / "series").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    missing = [name for name in listed if not (where / name).is_file()]
    unlisted = sorted({p.name for p in where.glob("*.patch")} - set(listed))
    if missing or unlisted:
        raise BuildError(f"QEMU patch series {where}: listed but missing {missing}, present but unlisted {unlisted}")
    return PatchSeries(tuple(where / name for name in listed))


@dataclass(frozen=True)
class BuiltQemu:
    """The built binary and what it is made of."""

    binary: Path
    source_version: str
    series: tuple[str, ...]
    series_digest: str
    pkgversion: str
    manifest: Path
    cache_hit: bool

    def as_json(self) -> dict[str, Any]:
        return {"binary": str(self.binary), "source_version": self.source_version, "series": list(self.series),
                "series_digest": self.series_digest, "pkgversion": self.pkgversion, "manifest": str(self.manifest),
                "cache_hit": self.cache_hit}


def _missing_tools() -> list[str]:
    return [tool for tool in BUILD_DEPS if shutil.which(tool) is None]


def _not_served(record: Path) -> dict[str, float]:
    try:
        doc = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in doc.items()} if isinstance(doc, dict) else {}


def _source(root: Path, say: Callable[[str], None]) -> tuple[str, list[Path]]:
    """The newest QEMU source that downloads, from the cache or the archive: (version, files)."""
    apt = indexed_apt(root / "apt" / "qemu-source", SOURCE_SUITES[0], base=SOURCE_SUITES[1:],
                      fresh_for_s=INDEX_FRESH_S, source=True)
    record = root / "apt" / "qemu-source" / "not-served.json"
    not_served = _not_served(record)
    tried = []
    for version in debs.source_versions(SOURCE_PACKAGE, apt):
        where = root / "debs" / "qemu-source" / version.replace(":", "%3a")
        dsc = sorted(where.glob("*.dsc")) if where.is_dir() else []
        if dsc:
            return version, sorted(where.iterdir(), key=lambda p: (p.suffix != ".dsc", p.name))
        if time.time() - not_served.get(version, 0.0) < NOT_SERVED_RETRY_S:
            tried.append(f"{version} (not served when tried)")
            continue
        say(f"qemu source {version}: downloading")
        try:
            return version, debs.download_source(SOURCE_PACKAGE, version, where, apt)
        except debs.PackageError as exc:
            shutil.rmtree(where, ignore_errors=True)
            not_served[version] = time.time()
            record.write_text(json.dumps(not_served, indent=1) + "\n")
            tried.append(f"{version} ({str(exc)[-160:]})")
            say(f"qemu source {version}: not served, trying an older one")
    raise BuildError(f"no QEMU source of {', '.join(SOURCE_SUITES)} downloads: {'; '.join(tried)}")


def _meson(root: Path, work: Path) -> tuple[debs.PackagePin, Path]:
    """sid's meson (pure Python), unpacked under ``work``: its pin and the module directory."""
    apt = indexed_apt(root / "apt" / MESON_SUITE, MESON_SUITE, fresh_for_s=INDEX_FRESH_S)
    (pin,) = debs.resolve(["meson"], apt)
    deb = debs.download([pin], root / "debs", apt)[pin.name]
    debs.extract(deb, work / "meson")
    return pin, work / "meson" / "usr" / "lib" / "python3" / "dist-packages"


def _run(argv: list[str], cwd: Path, log: Path, env: dict[str, str], what: str) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        done = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False,
                              timeout=3600)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise BuildError(f"{what} failed (exit {done.returncode}); the end of {log.name}:\n{tail}")


def _no_warnings(log: Path, start: int, patch: str) -> None:
    """A patch must build without a compiler warning (QEMU builds with -Werror; the recipe does not,
    so that Debian's own source never fails it): BuildError quoting them."""
    with log.open("rb") as fh:
        fh.seek(start)
        warnings = [line for line in fh.read().decode(errors="replace").splitlines() if ": warning: " in line]
    if warnings:
        raise BuildError(f"building with {patch} gave {len(warnings)} compiler warning(s): " + "; ".join(warnings[:5]))


def _checkpatch(src: Path, patch: Path) -> str:
    """QEMU's own style check of one patch: its summary line; a BuildError with its report if it fails."""
    done = subprocess.run(["perl", "scripts/checkpatch.pl", str(patch)], cwd=src,
                          capture_output=True, text=True, check=False, timeout=300)
    summary = next((line for line in done.stdout.splitlines() if line.startswith("total:")), "no summary")
    if done.returncode != 0:
        raise BuildError(f"{patch.name} fails QEMU's checkpatch.pl: {summary}\n{done.stdout[-2500:]}")
    return summary


def _build(work: Path, out: Path, *, root: Path, series: PatchSeries, source: tuple[str, list[Path]],
           meson: Path, say: Callable[[str], None]) -> dict[str, Any]:
    version, files = source
    log = out / "build.log"
    env = {**os.environ, "PYTHONPATH": str(meson), "LC_ALL": "C"}
    say(f"qemu {version}: unpacking with Debian's patches")
    _run(["dpkg-source", "--no-check", "-x", str(files[0]), str(work / "src")], work, log, env, "dpkg-source -x")
    src, build = work / "src", work / "src" / "build"
    steps: list[dict[str, Any]] = []
    configure = [*CONFIGURE, f"--with-pkgversion={series.identity}", "--python=/usr/bin/python3"]
    for n, patch in enumerate(series.patches, 1):
        t0 = time.monotonic()
        _run(["patch", "-p1", "--forward", "--batch", "-i", str(patch)], src, log, env, f"applying {patch.name}")
        summary = _checkpatch(src, patch)
        if n == 1:
            say(f"qemu {version}: configure ({' '.join(CONFIGURE[:3])} ...)")
            _run(["./configure", *configure], src, log, env, "configure")
        say(f"qemu {version}: building with patches 1-{n} of {len(series.patches)} ({patch.name})")
        start = log.stat().st_size
        _run(["ninja", "-C", str(build), "-j", str(os.cpu_count() or 2), TARGET], src, log, env,
             f"building with {patch.name}")
        _no_warnings(log, start, patch.name)
        steps.append({"patch": patch.name, "checkpatch": summary, "builds": True,
                      "seconds": round(time.monotonic() - t0, 1)})
    if not series.patches:
        _run(["./configure", *configure], src, log, env, "configure")
        _run(["ninja", "-C", str(build), "-j", str(os.cpu_count() or 2), TARGET], src, log, env, "building")
    binary = out / BINARY
    binary.parent.mkdir(parents=True)
    shutil.copyfile(build / TARGET, binary)
    _run(["strip", str(binary)], out, log, env, "strip")
    binary.chmod(0o755)
    return {"source_version": version, "series": [p.name for p in series.patches], "series_digest": series.digest,
            "pkgversion": series.identity, "configure": configure, "patches": steps,
            "outputs": {name: debs.sha256_file(out / name) for name in (BINARY, "build.log")}}


def build_qemu(cache_root: Path | None = None, *, series: PatchSeries | None = None, force: bool = False,
               progress: Callable[[str], None] | None = None) -> BuiltQemu:
    """The project's QEMU (cached): Debian's newest QEMU source that downloads, plus ``series``
    (default: the project's own)."""
    started = time.monotonic()
    say = progress or (lambda line: _log.info("%s", line))
    root = (cache_root if cache_root is not None else default_cache_root()).absolute()
    series = series if series is not None else patch_series()
    source = _source(root, say)
    builder = manifest.builder_source_hashes(_BUILDER_MODULES, ())
    extra = {"image": "qemu-build", "source": source[0], "series": series.digest, "configure": list(CONFIGURE)}
    key = manifest.cache_key((), builder, "", extra)

    def build(work: Path, out: Path) -> dict[str, Any]:
        missing = _missing_tools()
        if missing:
            raise BuildError(f"building QEMU needs {', '.join(missing)} on the host (ci/bootstrap-host.sh "
                             "installs them)")
        work.mkdir(parents=True, exist_ok=True)
        meson_pin, meson = _meson(root, work)
        doc = _build(work, out, root=root, series=series, source=source, meson=meson, say=say)
        return {**doc, "meson": meson_pin.as_json()}

    out_dir, doc, hit = cached_build(root, key, build, force=force, started=started)
    say(f"qemu {doc['source_version']} + {len(doc['series'])} patches {'reused' if hit else 'built'} in "
        f"{time.monotonic() - started:.1f} s: {out_dir / BINARY}")
    return _built(out_dir, doc, hit)


def project_qemu() -> Path:
    """The project's QEMU binary (``--qemu project``): from the cache, else built now; inside a lab host,
    which cannot build it, from the cache of the host it runs in, or a BuildError saying so."""
    built = built_in_cache()
    if built is not None:
        return built.binary
    if os.environ.get(HOST_CACHE_ENV):
        raise BuildError(f"the project's QEMU is not in this lab host's view of the host's cache "
                         f"({os.environ[HOST_CACHE_ENV]}): build it on the host first (python -m images qemu-build)")
    return build_qemu().binary


def _built(out_dir: Path, doc: dict[str, Any], hit: bool) -> BuiltQemu:
    return BuiltQemu(binary=out_dir / BINARY, source_version=str(doc["source_version"]),
                     series=tuple(doc["series"]), series_digest=str(doc["series_digest"]),
                     pkgversion=str(doc["pkgversion"]), manifest=out_dir / manifest.MANIFEST_NAME, cache_hit=hit)


def built_in_cache(cache_root: Path | None = None, series: PatchSeries | None = None) -> BuiltQemu | None:
    """The newest build of ``series`` (default: the project's) already in the cache, whole; None if
    there is none. Asks no network and builds nothing (for preflight). Without ``cache_root``, the
    cache of this host, then that of the host a lab host runs in (``HOST_CACHE_ENV``)."""
    if cache_root is None:
        host = os.environ.get(HOST_CACHE_ENV)
        for root in (default_cache_root(), *([Path(host)] if host else [])):
            if (built := built_in_cache(root, series)) is not None:
                return built
        return None
    root = cache_root.absolute()
    digest = (series if series is not None else patch_series()).digest
    found: list[tuple[float, Path, dict[str, Any]]] = []
    for path in (root / "images").glob(f"*/{manifest.MANIFEST_NAME}"):
        try:
            doc = manifest.read_manifest(path)
        except (OSError, ValueError):
            continue
        if doc.get("series_digest") == digest and doc.get("configure", [])[:len(CONFIGURE)] == list(CONFIGURE) \
                and not manifest.verify_outputs(path.parent, doc):
            found.append((path.stat().st_mtime, path.parent, doc))
    if not found:
        return None
    _, out_dir, doc = max(found, key=lambda entry: entry[0])
    return _built(out_dir, doc, True)
