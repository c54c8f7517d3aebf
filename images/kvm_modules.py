"""Debian's KVM modules rebuilt with ``CONFIG_KVM_SW_PROTECTED_VM`` for the exact lab kernel.

Debian's kernels leave the option unset (7.3.4 has ``CONFIG_EXPERT=y``), so no stock L1 can
create a ``KVM_X86_SW_PROTECTED_VM`` (type 1) and private guest memory never exists. The option
changes only kvm.ko and kvm-amd.ko, so those two are rebuilt from Debian's ``linux-source-<x.y>``
with Debian's own ``.config`` plus the option, and L1 loads them instead of the stock pair.

How (FACTS section 6, measured on the 2-core machine): the full source tree, because Debian's
linux-kbuild binaries need a newer glibc than the host's; ``modules_prepare`` builds fixdep,
modpost and objtool with the host compiler (objtool needs libelf's headers: sid's libelf-dev,
unpacked privately); ``KERNELRELEASE`` set to the lab kernel's, so vermagic matches (there are no
MODVERSIONS); Debian's ``Module.symvers`` without the kvm lines.

The ABI gate is a hard refusal: without pahole, ``olddefconfig`` silently drops BTF and with it
``SCHED_CLASS_EXT``, which changes ``struct task_struct`` and the loader does not notice. A
stand-in answering ``pahole --version`` as Debian's config expects keeps the config whole, and
the gate proves it: the CONFIG_ symbols that differ between Debian's ``autoconf.h`` and the
rebuilt one, intersected with every symbol fixdep recorded for kvm's objects, may only be
compiler capabilities and the option itself. Anything else is named and the build refused.

The result is cached by kernel release, package version, Debian's config digest and this
builder's source (``images.build.cached_build``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from images import debs, manifest
from images.build import BuildError, cached_build, default_cache_root, indexed_apt
from images.labhost import DEFAULT_SUITE

__all__ = ["OPTION", "KvmModules", "abi_gate", "build_kvm_modules", "changed_symbols", "config_symbols",
           "recorded_symbols", "source_package_for", "stale_builds"]

_log = logging.getLogger(__name__)

OPTION = "KVM_SW_PROTECTED_VM"
MODULE_DIR = "arch/x86/kvm"
MODULE_FILES = ("kvm.ko", "kvm-amd.ko")
# Symbols a rebuilt config may differ in from Debian's without changing an ABI: what the
# compiler can do, and the option we switch on.
ALLOWED_DIFFERENCES = re.compile(r"^(CC_HAS_\w+|GCC_VERSION|CC_VERSION_TEXT|" + OPTION + r")$")
# The pahole version Debian's config was made with (CONFIG_PAHOLE_VERSION=130 means v1.30).
_PAHOLE_RE = re.compile(r"^CONFIG_PAHOLE_VERSION=(\d+)$", re.MULTILINE)
_RELEASE_RE = re.compile(r"^(?P<ver>\d+\.\d+)\.\d+\+deb\d+-amd64$")
_AUTOCONF_RE = re.compile(r"^#define CONFIG_(\w+) (.*)$", re.MULTILINE)
_FIXDEP_RE = re.compile(r"\$\(wildcard include/config/(\w+)\)")
BUILDER_MODULES: tuple[str, ...] = ("kvm_modules.py", "debs.py", "manifest.py", "build.py")
# A package index younger than this is not fetched again: the cached modules are found in a
# second, and a new kernel or source upload is seen within the hour.
INDEX_FRESH_S = 3600.0
# Build tools the host needs (bootstrap-host.sh installs them); libelf's headers come privately.
HOST_TOOLS = ("make", "gcc", "flex", "bison", "bc", "perl", "strip")


@dataclass(frozen=True)
class KvmModules:
    """The rebuilt pair and what it was built from."""

    kernel_release: str  # e.g. 7.3.4+deb13-amd64: the lab kernel these load into
    package_version: str  # Debian's linux-source version, e.g. 7.3.4-1~bpo13+1
    option: str
    kvm: Path
    kvm_amd: Path
    manifest: Path
    config_sha256: str  # Debian's .config the rebuild started from
    cache_hit: bool

    @property
    def modules(self) -> tuple[Path, Path]:
        return self.kvm, self.kvm_amd


def source_package_for(kernel_release: str) -> str:
    """``linux-source-7.3`` for ``7.3.4+deb13-amd64``; a release of another shape is refused."""
    match = _RELEASE_RE.match(kernel_release)
    if match is None:
        raise BuildError(f"kernel release {kernel_release!r} is not a Debian generic amd64 release "
                         "(like 7.3.4+deb13-amd64): its source package cannot be named")
    return f"linux-source-{match['ver']}"


def config_symbols(autoconf: str) -> dict[str, str]:
    """``CONFIG_X value`` lines of an ``include/generated/autoconf.h`` as {X: value}."""
    return dict(_AUTOCONF_RE.findall(autoconf))


def recorded_symbols(cmd_files: Iterable[str]) -> set[str]:
    """Every CONFIG symbol fixdep recorded as a dependency in ``.o.cmd`` files (upper case)."""
    return {name.upper() for text in cmd_files for name in _FIXDEP_RE.findall(text)}


def changed_symbols(debian: Mapping[str, str], rebuilt: Mapping[str, str], used: set[str]) -> list[str]:
    """The symbols kvm's objects depend on whose value the rebuild changed, sorted."""
    return sorted(s for s in set(debian) | set(rebuilt) if debian.get(s) != rebuilt.get(s) and s in used)


def abi_gate(debian: Mapping[str, str], rebuilt: Mapping[str, str], used: set[str]) -> list[str]:
    """The changed symbols kvm depends on besides the allowed ones, each with both values; empty
    when the modules match Debian's kernel."""
    return [f"{s}: Debian {debian.get(s, 'unset')}, rebuilt {rebuilt.get(s, 'unset')}"
            for s in changed_symbols(debian, rebuilt, used) if not ALLOWED_DIFFERENCES.match(s)]


def _run(argv: list[str], cwd: Path, env: Mapping[str, str], what: str, log: Path) -> None:
    t0 = time.monotonic()
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.run(argv, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2500:]
        raise BuildError(f"{what} failed (exit {proc.returncode}); the end of {log}:\n{tail}")
    _log.info("kvm modules: %s in %.1f s", what, time.monotonic() - t0)


def _missing_tools() -> list[str]:
    return [tool for tool in HOST_TOOLS if shutil.which(tool) is None]


def _toolchain(work: Path, libelf_dev: Path, pahole_version: int) -> dict[str, str]:
    """PATH with the pahole stand-in first, and host flags that find libelf's headers and library."""
    stand_in = work / "bin"
    stand_in.mkdir(parents=True, exist_ok=True)
    pahole = stand_in / "pahole"
    pahole.write_text("#!/bin/sh\n# gmemtest: Debian's config was made with this pahole; no BTF is generated here\n"
                      f"echo v{pahole_version // 100}.{pahole_version % 100:02d}\n")
    pahole.chmod(0o755)
    lib = work / "libelf-lib"
    lib.mkdir(exist_ok=True)
    system = next((p for p in (Path("/usr/lib/x86_64-linux-gnu/libelf.so.1"), Path("/lib/x86_64-linux-gnu/libelf.so.1"))
                   if p.exists()), None)
    if system is None:
        raise BuildError("the host has no libelf.so.1 (package libelf1): objtool links against it")
    link = lib / "libelf.so"
    if not link.is_symlink():
        link.symlink_to(system)
    include = libelf_dev / "usr" / "include"
    return {**os.environ, "PATH": f"{stand_in}:{os.environ.get('PATH', '')}",
            "HOSTCFLAGS": f"-I{include}", "HOSTLDFLAGS": f"-L{lib}"}


def _resolve(root: Path, suite: str, release: str) -> tuple[debs.AptConfig, tuple[debs.PackagePin, ...]]:
    apt = indexed_apt(root / "apt" / suite, suite, fresh_for_s=INDEX_FRESH_S)
    source = source_package_for(release)
    headers = f"linux-headers-{release}"
    names = set(debs.package_names("linux-", apt))
    absent = [n for n in (source, headers) if n not in names]
    if absent:
        raise BuildError(f"{suite} does not serve {' or '.join(absent)} for kernel {release}; its sources: "
                         f"{', '.join(sorted(n for n in names if n.startswith('linux-source-'))) or 'none'}")
    pins = debs.resolve([source, headers], apt)
    if pins[0].version != pins[1].version:
        raise BuildError(f"{source} is {pins[0].version} but the kernel's headers are {pins[1].version}: "
                         "the source would not be the kernel's")
    return apt, pins


def _libelf_dev(root: Path) -> tuple[debs.AptConfig, debs.PackagePin]:
    """sid's libelf-dev (objtool's headers; the host's are too old), with the apt that serves it."""
    apt = indexed_apt(root / "apt" / "sid", "sid", fresh_for_s=INDEX_FRESH_S)
    return apt, debs.resolve(["libelf-dev"], apt)[0]


def build_kvm_modules(kernel_release: str, cache_root: Path | None = None, *, suite: str = DEFAULT_SUITE,
                      force: bool = False, progress: Callable[[str], None] | None = None) -> KvmModules:
    """The rebuilt kvm.ko and kvm-amd.ko for ``kernel_release`` (cached)."""
    started = time.monotonic()
    say = progress or (lambda line: _log.info("%s", line))
    root = (cache_root if cache_root is not None else default_cache_root()).absolute()
    apt, (source_pin, headers_pin) = _resolve(root, suite, kernel_release)
    libelf_apt, libelf_pin = _libelf_dev(root)
    builder = manifest.builder_source_hashes(BUILDER_MODULES, ())
    extra = {"image": "kvm-modules", "option": OPTION, "release": kernel_release}
    key = manifest.cache_key((source_pin, headers_pin, libelf_pin), builder, "", extra)

    def build(work: Path, out: Path) -> dict[str, Any]:
        missing = _missing_tools()
        if missing:
            raise BuildError(f"building kernel modules needs {', '.join(missing)} on the host "
                             "(ci/bootstrap-host.sh installs them)")
        for notice in stale_builds(root, kernel_release):
            say(notice)
        return _build(work, out, root=root, apts=(apt, libelf_apt), pins=(source_pin, headers_pin, libelf_pin),
                      release=kernel_release, say=say)

    out_dir, doc, hit = cached_build(root, key, build, force=force, started=started)
    say(f"kvm modules for {kernel_release} with {OPTION}=y {'reused' if hit else 'built'} "
        f"in {time.monotonic() - started:.1f} s: {out_dir}")
    return KvmModules(kernel_release=kernel_release, package_version=source_pin.version, option=OPTION,
                      kvm=out_dir / "kvm.ko", kvm_amd=out_dir / "kvm-amd.ko",
                      manifest=out_dir / manifest.MANIFEST_NAME, config_sha256=str(doc["debian_config_sha256"]),
                      cache_hit=hit)


def stale_builds(root: Path, kernel_release: str) -> list[str]:
    """A notice for each cached rebuild that is not for ``kernel_release`` (a new lab kernel)."""
    notices = []
    for path in sorted((root / "images").glob(f"*/{manifest.MANIFEST_NAME}")):
        try:
            doc = manifest.read_manifest(path)
        except (ValueError, KeyError, OSError):
            continue
        if doc.get("option") == OPTION and doc.get("kernel_release") != kernel_release:
            notices.append(f"notice: the cached KVM modules in {path.parent} were rebuilt for "
                           f"{doc.get('kernel_release')}; the lab kernel is now {kernel_release}, so they are stale "
                           "and the pair is built for it")
    return notices


def _build(work: Path, out: Path, *, root: Path, apts: tuple[debs.AptConfig, debs.AptConfig],
           pins: tuple[debs.PackagePin, ...], release: str, say: Callable[[str], None]) -> dict[str, Any]:
    """``apts``: the kernel's suite (source, headers) and sid (libelf-dev)."""
    (apt, libelf_apt), (source_pin, headers_pin, libelf_pin) = apts, pins
    log = out / "build.log"
    say(f"kvm modules: downloading {source_pin.name} {source_pin.version} and the kernel's headers")
    paths = debs.download((source_pin, headers_pin), root / "debs", apt)
    libelf = debs.download((libelf_pin,), root / "debs", libelf_apt)
    for deb in (*paths.values(), *libelf.values()):
        debs.extract(deb, work / "debs")
    headers = work / "debs" / "usr" / "src" / headers_pin.name
    tarball = next((work / "debs" / "usr" / "src").glob("linux-source-*.tar.xz"))
    env = _toolchain(work, work / "debs", _pahole_version((headers / ".config").read_text()))
    say(f"kvm modules: unpacking {tarball.name}")
    _run(["tar", "-xf", str(tarball), "-C", str(work)], work, env, "unpacking the source", log)
    tree = work / tarball.name.removesuffix(".tar.xz")
    shutil.copy(headers / ".config", tree / ".config")
    make = ["make", f"-j{os.cpu_count() or 2}", f"KERNELRELEASE={release}"]
    _run(["scripts/config", "--file", ".config", "--enable", OPTION], tree, env, f"enabling {OPTION}", log)
    _run([*make, "olddefconfig"], tree, env, "olddefconfig", log)
    if f"CONFIG_{OPTION}=y" not in (tree / ".config").read_text().splitlines():
        raise BuildError(f"olddefconfig dropped CONFIG_{OPTION}: its dependencies (EXPERT, X86_64, KVM) are not "
                         f"all set in Debian's config for {release}")
    say("kvm modules: modules_prepare (fixdep, modpost, objtool)")
    _run([*make, "modules_prepare"], tree, env, "modules_prepare", log)
    symvers = (headers / "Module.symvers").read_text().splitlines()
    (tree / "Module.symvers").write_text("".join(line + "\n" for line in symvers if "arch/x86/kvm/" not in line))
    say(f"kvm modules: building {' '.join(MODULE_FILES)}")
    _run([*make, f"M={MODULE_DIR}", "CONFIG_KVM_INTEL=", "modules"], tree, env, "building the kvm modules", log)
    used = recorded_symbols(p.read_text(errors="replace") for p in (tree / MODULE_DIR).rglob(".*.o.cmd"))
    debian = config_symbols((headers / "include" / "generated" / "autoconf.h").read_text())
    rebuilt = config_symbols((tree / "include" / "generated" / "autoconf.h").read_text())
    wrong = abi_gate(debian, rebuilt, used)
    if wrong:
        raise BuildError(f"refusing the rebuilt kvm modules: the config they were built with differs from Debian's "
                         f"{release} in symbols kvm depends on: {'; '.join(wrong)}")
    for name in MODULE_FILES:
        # Debug info is most of a module's size (kvm.ko 28 MB -> 3 MB); L1 reads it over 9p.
        _run(["strip", "--strip-debug", "-o", str(out / name), str(tree / MODULE_DIR / name)], tree, env,
             f"stripping {name}", log)
    return {
        "kernel_release": release, "option": OPTION, "package_version": source_pin.version,
        "debian_config_sha256": debs.sha256_file(headers / ".config"),
        "gate": {"symbols_kvm_uses": len(used), "changed_and_allowed": changed_symbols(debian, rebuilt, used)},
        "packages": [p.as_json() for p in pins],
        "outputs": {name: debs.sha256_file(out / name) for name in (*MODULE_FILES, "build.log")},
    }


def _pahole_version(config: str) -> int:
    match = _PAHOLE_RE.search(config)
    if match is None or int(match[1]) == 0:
        raise BuildError("Debian's config names no pahole version (CONFIG_PAHOLE_VERSION): the stand-in cannot "
                         "keep its BTF settings")
    return int(match[1])
