"""Builds the default guest (Debian generic kernel + initramfs), cached by its inputs.

Flow: resolve package pins with apt -> cache key over pins, builder source and
probe source -> under a per-key file lock either verify the cached image (a hit)
or build it in a temporary directory next to its final place and rename it in.
The rename is atomic, so a concurrent reader sees no image or a complete one.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from images import debs, initramfs, kconfig, keys, kmod, manifest, vmlinux
from images.errors import ImageError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "READY_MARKER",
    "USERLAND_PACKAGES",
    "BuildError",
    "GuestImage",
    "build_default_image",
    "build_lock",
    "cached_build",
    "default_cache_root",
    "default_probe_source",
    "image_from_manifest",
    "indexed_apt",
]

_log = logging.getLogger(__name__)

# busybox for the shell and tools; dropbear and exactly the libraries its binary
# links (ld.so --list checks this at build time).
USERLAND_PACKAGES: tuple[str, ...] = (
    "busybox-static", "dropbear-bin", "libtomcrypt1", "libtommath1", "libgmp10",
    "zlib1g", "libcrypt1", "libc6",
)
# The kernel QEMU gets with -kernel: the uncompressed ELF when the kernel has a PVH
# entry (saves the in-guest decompression, see vmlinux.py), else the bzImage.
KERNEL_NAME = "kernel"
INITRD_NAME = "initrd.img"
SSH_KEY_NAME = "id_ecdsa"
# The line the image's init (files/rcS) prints on the first serial port once dropbear listens on
# TCP 22 and eth0 is configured: the image's half of the guest contract (docs/architecture.md).
READY_MARKER = "GMEMTEST-READY"
# "none" or "gzip": measured by measure_boot.py (guests/profiles.py has the figures).
INITRD_COMPRESSION = "none"
_CACHE_ENV = "GMEMTEST_CACHE"


class BuildError(ImageError, RuntimeError):
    """The image could not be built; the message names the failing step."""


@dataclass(frozen=True)
class GuestImage:
    """A built image; all paths live inside the image's cache directory."""

    kernel: Path
    initrd: Path
    ssh_key: Path
    manifest: Path
    kernel_release: str
    cache_hit: bool
    packages: tuple[debs.PackagePin, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "kernel": str(self.kernel), "initrd": str(self.initrd),
            "ssh_key": str(self.ssh_key), "manifest": str(self.manifest),
            "kernel_release": self.kernel_release, "cache_hit": self.cache_hit,
            "packages": [pin.as_json() for pin in self.packages],
        }


def default_cache_root() -> Path:
    """``$GMEMTEST_CACHE``, else ``~/.cache/gmemtest``."""
    env = os.environ.get(_CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "gmemtest"


def default_probe_source() -> Path:
    from guests import probe_source_path

    return probe_source_path()


@contextmanager
def build_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive flock on ``lock_path``: one builder per cache key at a time."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started = time.monotonic()
        fcntl.flock(fd, fcntl.LOCK_EX)
        waited = time.monotonic() - started
        if waited > 0.1:
            _log.info("waited %.1f s for %s (another build)", waited, lock_path)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def indexed_apt(where: Path, suite: str, *, base: tuple[str, ...] = (), fresh_for_s: float = 0.0,
                source: bool = False) -> debs.AptConfig:
    """A private apt configuration of ``suite`` under ``where`` with its package index (``source``:
    its source index): updated
    unless younger than ``fresh_for_s`` seconds (0: always); when the update fails, the lists from
    before serve, and without any a ``BuildError`` says so."""
    apt = debs.private_apt(where, suite, base=base, source=source)
    index = "*_Sources*" if source else "*_Packages*"
    # When the index was last brought up to date: apt keeps a list's mtime when the mirror answers
    # "not modified", so the lists' own times say when the suite last changed, not when it was read.
    stamp = where / "updated.stamp"
    lists = list((where / "lists").glob(index))
    if fresh_for_s > 0 and lists and stamp.is_file() and time.time() - stamp.stat().st_mtime < fresh_for_s:
        return apt
    try:
        debs.update(apt)
        stamp.touch()
    except debs.PackageError as exc:
        if not any((where / "lists").glob(index)):
            raise BuildError(f"cannot read the {suite} index: {exc}") from exc
        _log.warning("apt-get update of %s failed, using the lists from before: %s", suite, exc)
    return apt


def cached_build(root: Path, key: str, build: Callable[[Path, Path], dict[str, Any]], *,
                 force: bool = False, started: float | None = None) -> tuple[Path, dict[str, Any], bool]:
    """The cache protocol every image shares; returns (image dir, manifest, cache hit).

    Under the key's flock: a valid manifest whose outputs still hash right is a hit;
    otherwise ``build(work, out)`` fills ``out`` and returns the manifest fields, and
    ``out`` is renamed into place, so a reader sees no image or a complete one.
    """
    t0 = started if started is not None else time.monotonic()
    images_dir = root / "images"
    image_dir = images_dir / key[:24]
    manifest_path = image_dir / manifest.MANIFEST_NAME
    with build_lock(root / "locks" / f"{key[:24]}.lock"):
        if not force and manifest_path.is_file():
            try:
                doc = manifest.read_manifest(manifest_path)
                problems = manifest.verify_outputs(image_dir, doc)
            except (ValueError, KeyError) as exc:
                problems = [f"unreadable manifest: {exc}"]
            if not problems and doc.get("key") == key:
                _log.info("image cache hit %s (%.2f s)", image_dir, time.monotonic() - t0)
                return image_dir, doc, True
            _log.warning("cached image %s is invalid, rebuilding: %s", image_dir,
                         "; ".join(problems))
        images_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=images_dir, prefix=f".build-{key[:8]}-"))
        try:
            out = staging / "image"
            out.mkdir()
            doc = {"schema": manifest.SCHEMA, "key": key, **build(staging / "work", out)}
            doc["build_seconds"] = round(time.monotonic() - t0, 2)
            manifest.write_manifest(out / manifest.MANIFEST_NAME, doc)
            if image_dir.exists():
                os.replace(image_dir, staging / "stale")
            os.replace(out, image_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return image_dir, doc, False


def _image(image_dir: Path, doc: dict[str, Any], hit: bool,
           pins: tuple[debs.PackagePin, ...]) -> GuestImage:
    return GuestImage(
        kernel=image_dir / KERNEL_NAME, initrd=image_dir / INITRD_NAME,
        ssh_key=image_dir / SSH_KEY_NAME, manifest=image_dir / manifest.MANIFEST_NAME,
        kernel_release=str(doc["kernel_release"]), cache_hit=hit, packages=pins,
    )


def _compile_probe(source: Path, out: Path) -> None:
    argv = ["gcc", "-static", "-O2", "-Wall", "-o", str(out), str(source)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    except FileNotFoundError as exc:
        raise BuildError("gcc not found: the probe is compiled on the host "
                         "(install gcc and libc6-dev)") from exc
    if done.returncode != 0:
        raise BuildError(f"compiling the probe {source} failed ({done.returncode}):\n"
                         f"{done.stderr.strip()}")


def _kernel_release(kernel_root: Path, package: str) -> str:
    found = sorted(p.name.removeprefix("vmlinuz-") for p in (kernel_root / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise BuildError(f"{package}: expected one /boot/vmlinuz-*, found {found}")
    return found[0]


def _build(work: Path, out: Path, pins: tuple[debs.PackagePin, ...], deb_dir: Path,
           probe_source: Path) -> dict[str, Any]:
    """Build the outputs into ``out``; return the manifest fields this step knows."""
    deb_paths = debs.download(pins, deb_dir)
    kernel_pin = pins[0]
    kernel_root, busybox_root, userland = work / "kernel", work / "busybox", work / "userland"
    debs.extract(deb_paths[kernel_pin.name], kernel_root)
    debs.extract(deb_paths["busybox-static"], busybox_root)
    for pin in pins[1:]:
        if pin.name != "busybox-static":
            debs.extract(deb_paths[pin.name], userland)

    release = _kernel_release(kernel_root, kernel_pin.name)
    config_path = kernel_root / "boot" / f"config-{release}"
    if not config_path.is_file():
        raise BuildError(f"{kernel_pin.name} has no /boot/config-{release}")
    config = kconfig.read_config(config_path)
    wanted = kconfig.check_config(config, kernel_pin.name)
    index = kmod.index_modules(kernel_root / "lib" / "modules" / release)
    modules = kmod.load_order(wanted, index)

    probe_bin = work / "gmem-probe"
    _compile_probe(probe_source, probe_bin)
    host_key = work / "host_key"
    keys.dropbear_host_key(userland, host_key)
    authorized = keys.new_client_key(out / SSH_KEY_NAME)

    kernel_format = vmlinux.write_boot_kernel(kernel_root / "boot" / f"vmlinuz-{release}",
                                  out / KERNEL_NAME, pvh=config.get("PVH") == "y")
    inputs = initramfs.InitramfsInputs(
        busybox=busybox_root / "bin" / "busybox", userland=userland, modules=modules,
        probe=probe_bin, authorized_keys=authorized, host_key=host_key)
    cpio_path = work / "initrd.cpio"
    with cpio_path.open("wb") as stream:
        libs = initramfs.write_initramfs(inputs, stream)
    if INITRD_COMPRESSION == "gzip":
        data = gzip.compress(cpio_path.read_bytes(), compresslevel=6, mtime=0)
        (out / INITRD_NAME).write_bytes(data)
    else:
        os.replace(cpio_path, out / INITRD_NAME)
    return {
        "kernel_release": release,
        "kernel_package": kernel_pin.name,
        "kernel_config": {"name": config_path.name, "sha256": _sha256(config_path),
                          "modules_needed": list(wanted)},
        "modules": [ko.name for ko in modules],
        "libraries": libs,
        "probe_binary_sha256": _sha256(probe_bin),
        "initrd_compression": INITRD_COMPRESSION,
        "kernel_format": kernel_format,
        "host_key_type": keys.HOST_KEY_TYPE,
    }


def image_from_manifest(manifest_path: Path, *, probe_source: Path | None = None) -> GuestImage:
    """The built image a manifest describes, without asking apt: the per-job fast path.

    Resolving package pins costs two apt-cache calls (about 1-2 s); a job resolves them once
    and every test then loads the manifest. It is used only when it is still the image this
    checkout would build from those pins: the key recomputed from the manifest's own pins and
    the current builder and probe sources must equal the manifest's key, and every output must
    hash as recorded. Anything else is a BuildError naming the mismatch, never a silent reuse.
    """
    path = Path(manifest_path).absolute()
    try:
        doc = manifest.read_manifest(path)
        pins = tuple(debs.PackagePin(p["name"], p["version"], p["sha256"], p["filename"])
                     for p in doc["packages"])
        recorded_key = str(doc["key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BuildError(f"guest image manifest {path} is unusable: {exc}") from exc
    source = (probe_source if probe_source is not None else default_probe_source()).absolute()
    key = manifest.cache_key(pins, manifest.builder_source_hashes(), _sha256(source))
    if key != recorded_key:
        raise BuildError(f"guest image manifest {path} is stale: its key is {recorded_key[:24]}, but this "
                         f"checkout's builder and probe sources with its packages give {key[:24]}")
    problems = manifest.verify_outputs(path.parent, doc)
    if problems:
        raise BuildError(f"guest image {path.parent} does not match its manifest: {'; '.join(problems)}")
    return _image(path.parent, doc, True, pins)


def newest_image_in(cache_root: Path) -> GuestImage:
    """The newest guest image of ``cache_root`` this checkout would build (``image_from_manifest``),
    asking no apt: how a lab host, which cannot resolve packages, finds the image its host built."""
    refused: list[str] = []
    manifests = sorted((cache_root / "images").glob(f"*/{manifest.MANIFEST_NAME}"),
                       key=lambda p: p.stat().st_mtime, reverse=True)
    for path in manifests:
        try:
            doc = manifest.read_manifest(path)
        except (OSError, ValueError):
            continue
        if "packages" not in doc or "kernel_release" not in doc:
            continue  # another kind of build (a QEMU, kernel modules)
        try:
            return image_from_manifest(path)
        except BuildError as exc:
            refused.append(str(exc))
    raise BuildError(f"no guest image in {cache_root} fits this checkout (build one on the host: gmemtest image)"
                     + (f"; the newest: {refused[0]}" if refused else ""))


def build_default_image(cache_root: Path | None = None, *, probe_source: Path | None = None,
                        force: bool = False, kernel_package: str | None = None) -> GuestImage:
    """Return the default guest image, building it only when its inputs changed.

    ``force`` rebuilds even when a valid cached image exists (with a new SSH key).
    ``kernel_package`` (e.g. ``linux-image-6.1.0-28-amd64-unsigned``) replaces the kernel the
    metapackage points at, so a lab can pin the Debian guest kernel it qualifies.
    """
    started = time.monotonic()
    root = (cache_root if cache_root is not None else default_cache_root()).absolute()
    source = (probe_source if probe_source is not None else default_probe_source()).absolute()
    if not source.is_file():
        raise BuildError(f"probe source {source} does not exist")
    if kernel_package is None:
        kernel_package = debs.resolve_kernel()
    pins = debs.resolve([kernel_package, *USERLAND_PACKAGES])
    builder = manifest.builder_source_hashes()
    probe_sha = _sha256(source)
    key = manifest.cache_key(pins, builder, probe_sha)

    def build(work: Path, out: Path) -> dict[str, Any]:
        fields = _build(work, out, pins, root / "debs", source)
        return {
            **fields,
            "packages": [pin.as_json() for pin in pins],
            "inputs": {
                "debs": {pin.filename: pin.sha256 for pin in pins},
                "probe_source": {"name": source.name, "sha256": probe_sha},
                "builder": builder,
            },
            "outputs": {name: _sha256(out / name)
                        for name in (KERNEL_NAME, INITRD_NAME, SSH_KEY_NAME)},
        }

    image_dir, doc, hit = cached_build(root, key, build, force=force, started=started)
    if hit:
        return _image(image_dir, doc, True, pins)
    _log.info("image built %s in %.1f s", image_dir, time.monotonic() - started)
    return _image(image_dir, doc, False, pins)
