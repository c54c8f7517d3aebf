"""Builds the lab-host image: an L1 kernel that is a real KVM host, plus a tiny initramfs.

The machine this runs on has no memory failure and a KVM that is not upstream's
(FACTS section 5); QEMU's TCG emulates AMD SVM with nested paging, so a Debian 7.x
kernel booted under ``-accel tcg -cpu max`` loads ``kvm_amd`` and ``hwpoison_inject``
and every host-side path runs for real one level down.

The initramfs holds only what L1 needs before it can reach the host's file system:
static busybox, the modules (decompressed from ``.ko.xz`` at build time, in dependency
order) and ``files/labhost-init``. Everything else (QEMU, the venv, the caches) comes
from the host's root over read-only 9p, so the image does not grow a second userland.

The kernel is, by default, the newest 7.x generic kernel of ``trixie-backports``,
resolved at build time through a private apt configuration under the cache root
(the system's apt sources are never written). A user-supplied kernel works too, as
``.deb`` files or as a vmlinuz + modules tree + config. The image is cached with the
same protocol as the guest image (:func:`images.build.cached_build`).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from images import debs, kconfig, kmod, manifest, vmlinux
from images.build import BuildError, cached_build, default_cache_root, indexed_apt
from images.cpio import NewcWriter
from images.initramfs import busybox_applets

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import BinaryIO

__all__ = [
    "DEFAULT_KERNEL_MAJOR",
    "DEFAULT_SUITE",
    "DebianKernel",
    "KernelDebs",
    "KernelSource",
    "KernelTree",
    "LabhostImage",
    "build_labhost_image",
    "newest_kernel_version",
    "write_labhost_initramfs",
]

_log = logging.getLogger(__name__)

DEFAULT_SUITE = "trixie-backports"
DEFAULT_KERNEL_MAJOR = 7
KERNEL_NAME = "kernel"
INITRD_NAME = "initrd.img"
INIT_FILE = "labhost-init"
BUSYBOX_PACKAGE = "busybox-static"
# What decides the lab-host image bytes (see manifest.builder_source_hashes).
LABHOST_BUILDER_MODULES: tuple[str, ...] = (
    "labhost.py", "build.py", "cpio.py", "debs.py", "initramfs.py", "kconfig.py", "kmod.py",
    "manifest.py", "vmlinux.py",
)
LABHOST_FILES: tuple[str, ...] = (INIT_FILE,)
# linux-image-<ver>-amd64: the generic flavour only (cloud and rt have another '-').
_IMAGE_RE = re.compile(r"^linux-image-(?P<ver>[0-9][^-]*)-amd64$")
_DIRS = ("bin", "dev", "proc", "sys", "tmp", "run", "etc", "etc/gmemtest", "lib",
         "lib/modules", "hostroot", "ctl", "results")


@dataclass(frozen=True)
class DebianKernel:
    """A Debian kernel resolved at build time: ``version`` like ``7.3.4+deb13``, or newest 7.x."""

    suite: str = DEFAULT_SUITE
    version: str | None = None

    def describe(self) -> str:
        return f"debian:{self.suite}:{self.version or f'newest-{DEFAULT_KERNEL_MAJOR}.x'}"


@dataclass(frozen=True)
class KernelDebs:
    """Kernel ``.deb`` files the user supplied (image or base + binary + modules)."""

    debs: tuple[Path, ...]

    def describe(self) -> str:
        return "debs:" + ",".join(p.name for p in self.debs)


@dataclass(frozen=True)
class KernelTree:
    """A kernel the user built: its bzImage, its ``lib/modules/<release>`` tree and config."""

    vmlinuz: Path
    modules: Path
    config: Path

    def describe(self) -> str:
        return f"tree:{self.modules.name}"


KernelSource = DebianKernel | KernelDebs | KernelTree


@dataclass(frozen=True)
class LabhostImage:
    """A built lab-host image; all paths live inside the image's cache directory."""

    kernel: Path
    initrd: Path
    manifest: Path
    kernel_release: str
    kernel_source: str
    modules: tuple[str, ...]
    cache_hit: bool
    packages: tuple[debs.PackagePin, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "kernel": str(self.kernel), "initrd": str(self.initrd),
            "manifest": str(self.manifest), "kernel_release": self.kernel_release,
            "kernel_source": self.kernel_source, "modules": list(self.modules),
            "cache_hit": self.cache_hit, "packages": [pin.as_json() for pin in self.packages],
        }


@dataclass(frozen=True)
class _KernelFiles:
    """Where an unpacked kernel keeps what the image needs."""

    release: str
    vmlinuz: Path
    config: Path
    modules_dir: Path


def _version_key(version: str) -> tuple[int, ...]:
    upstream = version.split("+", 1)[0].split("~", 1)[0]
    return tuple(int(part) for part in re.findall(r"\d+", upstream))


def newest_kernel_version(names: Sequence[str], major: int = DEFAULT_KERNEL_MAJOR) -> str:
    """The highest ``<ver>`` among ``linux-image-<ver>-amd64`` names with that major."""
    versions = [m["ver"] for n in names if (m := _IMAGE_RE.match(n))]
    wanted = [v for v in versions if _version_key(v)[:1] == (major,)]
    if not wanted:
        raise BuildError(f"no linux-image-{major}.*-amd64 package; generic kernels found: "
                         f"{sorted(versions, key=_version_key) or 'none'}")
    return max(wanted, key=_version_key)


def _resolve_debian(root: Path, source: DebianKernel) -> tuple[debs.AptConfig, tuple[debs.PackagePin, ...]]:
    """Pins of the three packages the 7.x metapackage stands for (unsigned binary)."""
    apt = indexed_apt(root / "apt" / source.suite, source.suite)
    names = debs.package_names("linux-image-", apt)
    if source.version is None:
        version = newest_kernel_version(names)
    else:
        version = source.version
        if f"linux-image-{version}-amd64" not in names:
            known = sorted((m["ver"] for n in names if (m := _IMAGE_RE.match(n))), key=_version_key)
            raise BuildError(f"kernel version {version!r} is not in {source.suite}; valid: "
                             f"{', '.join(known) or 'none'}")
    meta = f"linux-image-{version}-amd64"
    wanted: list[str] = []
    for dep in debs.package_depends(meta, apt):
        if dep.startswith("linux-binary-") and not dep.startswith("linux-binary-unsigned-"):
            wanted.append(dep.replace("linux-binary-", "linux-binary-unsigned-", 1))
        elif dep.startswith(("linux-base-", "linux-modules-", "linux-image-")):
            wanted.append(dep)
    if not wanted:
        # Before 7.x the image package itself carries kernel and modules.
        wanted = [f"{meta}-unsigned"]
    return apt, debs.resolve(wanted, apt)


def _find_kernel(root: Path, what: str) -> _KernelFiles:
    """Locate release, kernel, config and modules in an unpacked set of kernel packages.

    7.x keeps everything under ``/usr/lib/modules/<release>`` (``vmlinuz.unsigned``,
    ``config``); older kernels use ``/boot/vmlinuz-<release>`` and ``/lib/modules``.
    """
    trees = [d for base in ("usr/lib/modules", "lib/modules") if (root / base).is_dir()
             for d in sorted((root / base).iterdir()) if (d / "kernel").is_dir()]
    if len(trees) != 1:
        raise BuildError(f"{what}: expected one lib/modules/<release>/kernel tree, found "
                         f"{[str(t.relative_to(root)) for t in trees]}")
    modules_dir = trees[0]
    release = modules_dir.name
    for vmlinuz in (modules_dir / "vmlinuz.unsigned", modules_dir / "vmlinuz",
                    root / "boot" / f"vmlinuz-{release}"):
        if vmlinuz.is_file():
            break
    else:
        raise BuildError(f"{what}: no vmlinuz.unsigned, vmlinuz or /boot/vmlinuz-{release}")
    for config in (modules_dir / "config", root / "boot" / f"config-{release}"):
        if config.is_file():
            break
    else:
        raise BuildError(f"{what}: no kernel config (lib/modules/{release}/config or "
                         f"/boot/config-{release})")
    return _KernelFiles(release, vmlinuz, config, modules_dir)


def _init_script() -> bytes:
    return resources.files("images").joinpath("files", INIT_FILE).read_bytes()


def write_labhost_initramfs(busybox: Path, modules: Sequence[Path], stream: BinaryIO) -> None:
    """busybox + applet links, the modules as plain ``.ko`` in load order, and /init."""
    cpio = NewcWriter(stream)
    for name in _DIRS:
        cpio.add_dir(name, 0o1777 if name == "tmp" else 0o755)
    cpio.add_chardev("dev/console", 5, 1)  # the kernel opens it before /init runs
    cpio.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox):
        cpio.add_symlink(f"bin/{applet}", "busybox")
    cpio.add_file("init", _init_script(), 0o755)
    for ko in modules:
        cpio.add_file(f"lib/modules/{kmod.module_file_name(ko)}", kmod.read_module(ko))
    order = "".join(f"{kmod.module_file_name(ko)}\n" for ko in modules)
    cpio.add_file("etc/gmemtest/modules.order", order.encode())
    cpio.close()


def _closure(files: _KernelFiles, what: str) -> tuple[dict[str, str], list[Path]]:
    config = kconfig.read_config(files.config)
    wanted = kconfig.check_labhost_config(config, what)
    return config, kmod.load_order(wanted, kmod.index_modules(files.modules_dir))



def _tree_inputs(tree: KernelTree) -> tuple[dict[str, Any], _KernelFiles]:
    """Cache-key inputs of a user's tree: kernel, config and the modules the image takes."""
    for path in (tree.vmlinuz, tree.config):
        if not path.is_file():
            raise BuildError(f"kernel tree: {path} is not a file")
    if not tree.modules.is_dir():
        raise BuildError(f"kernel tree: {tree.modules} is not a directory "
                         "(pass lib/modules/<release>)")
    files = _KernelFiles(tree.modules.name, tree.vmlinuz.absolute(), tree.config.absolute(),
                         tree.modules.absolute())
    _, modules = _closure(files, f"kernel tree {tree.modules}")
    extra = {
        "vmlinuz": debs.sha256_file(files.vmlinuz),
        "config": debs.sha256_file(files.config),
        "release": files.release,
        "modules": {str(ko.relative_to(files.modules_dir)): debs.sha256_file(ko) for ko in modules},
    }
    return extra, files


def build_labhost_image(cache_root: Path | None = None, kernel: KernelSource | None = None, *,
                        force: bool = False) -> LabhostImage:
    """Return the lab-host image for ``kernel`` (default: newest 7.x of trixie-backports).

    Only a change of an input (a package pin, a user file's sha256, the builder's own
    source) builds anew; otherwise the cached image is verified by hash and reused.
    """
    started = time.monotonic()
    root = (cache_root if cache_root is not None else default_cache_root()).absolute()
    source: KernelSource = kernel if kernel is not None else DebianKernel()
    busybox_pin = debs.resolve([BUSYBOX_PACKAGE])[0]
    apt = debs.SYSTEM_APT
    kernel_pins: tuple[debs.PackagePin, ...] = ()
    extra: dict[str, Any] = {"image": "labhost"}
    tree_files: _KernelFiles | None = None
    if isinstance(source, DebianKernel):
        apt, kernel_pins = _resolve_debian(root, source)
    elif isinstance(source, KernelDebs):
        if not source.debs:
            raise BuildError("kernel debs: pass at least one .deb")
        missing = [str(p) for p in source.debs if not p.is_file()]
        if missing:
            raise BuildError(f"kernel debs not found: {', '.join(missing)}")
        kernel_pins = tuple(debs.deb_pin(p) for p in source.debs)
    else:
        extra["tree"], tree_files = _tree_inputs(source)
    builder = manifest.builder_source_hashes(LABHOST_BUILDER_MODULES, LABHOST_FILES)
    pins = (*kernel_pins, busybox_pin)
    key = manifest.cache_key(pins, builder, "", extra)

    def build(work: Path, out: Path) -> dict[str, Any]:
        busybox_root = work / "busybox"
        debs.extract(debs.download([busybox_pin], root / "debs")[BUSYBOX_PACKAGE], busybox_root)
        if tree_files is not None:
            files = tree_files
        else:
            if isinstance(source, KernelDebs):
                paths = [p.absolute() for p in source.debs]
            else:
                got = debs.download(kernel_pins, root / "debs", apt)
                paths = [got[pin.name] for pin in kernel_pins]
            kernel_root = work / "kernel"
            for deb in paths:
                debs.extract(deb, kernel_root)
            files = _find_kernel(kernel_root, source.describe())
        config, modules = _closure(files, source.describe())
        kernel_format = vmlinux.write_boot_kernel(files.vmlinuz, out / KERNEL_NAME,
                                                  pvh=config.get("PVH") == "y")
        with (out / INITRD_NAME).open("wb") as stream:
            write_labhost_initramfs(busybox_root / "bin" / "busybox", modules, stream)
        return {
            "kernel_release": files.release,
            "kernel_source": source.describe(),
            "kernel_format": kernel_format,
            "kernel_config": {"sha256": debs.sha256_file(files.config),
                              "guest_memfd": config.get("KVM_GUEST_MEMFD", "n")},
            "modules": [kmod.module_file_name(ko) for ko in modules],
            "packages": [pin.as_json() for pin in pins],
            "inputs": {"debs": {pin.filename: pin.sha256 for pin in pins}, "extra": extra,
                       "builder": builder},
            "outputs": {name: debs.sha256_file(out / name) for name in (KERNEL_NAME, INITRD_NAME)},
        }

    image_dir, doc, hit = cached_build(root, key, build, force=force, started=started)
    _log.info("lab-host image %s %s in %.2f s", image_dir, "reused" if hit else "built",
              time.monotonic() - started)
    return LabhostImage(
        kernel=image_dir / KERNEL_NAME, initrd=image_dir / INITRD_NAME,
        manifest=image_dir / manifest.MANIFEST_NAME, kernel_release=str(doc["kernel_release"]),
        kernel_source=str(doc["kernel_source"]), modules=tuple(doc["modules"]), cache_hit=hit,
        packages=pins,
    )
