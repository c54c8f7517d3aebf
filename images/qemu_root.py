"""A newer QEMU than the host's, from Debian packages, runnable without touching the host.

Debian's QEMU 11.x (trixie-backports, sid) is built against trixie's libc, which a bookworm host
must not install. So the package and its whole dependency closure (apt resolves it against an
empty dpkg status in a private configuration) are unpacked into a root of their own, and a
small wrapper runs ``qemu-system-x86_64`` with that root's dynamic loader and libraries, its
data directories (``-L``) and its module directory. Everything else (the kernel, KVM, the
guest image) is the host's; a test picks this QEMU like any other with ``-p qemu=`` /
``--qemu``. The root is cached like every image: a change of a package pin builds anew.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from images import debs, manifest
from images.build import BuildError, cached_build, default_cache_root, indexed_apt

__all__ = ["QEMU_SUITE", "QemuRoot", "build_qemu_root"]

_log = logging.getLogger(__name__)

QEMU_SUITE = "trixie-backports"
QEMU_BASE_SUITES = ("trixie",)
QEMU_PACKAGE = "qemu-system-x86"
WRAPPER = "bin/qemu-system-x86_64"
ROOT_DIR = "root"
QEMU_IN_ROOT = "usr/bin/qemu-system-x86_64"
_BUILDER_MODULES = ("qemu_root.py", "debs.py")

_WRAPPER_TEXT = """#!/bin/sh
# QEMU {version} from Debian {suite}, run with the loader and libraries of its own root
# (built by gmemtest's images/qemu_root.py; the host's libc is never used or changed).
root=$(dirname "$(dirname "$(readlink -f "$0")")")/{root_dir}
QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu" exec "$root/usr/lib64/ld-linux-x86-64.so.2" \\
    --library-path "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" \\
    "$root/{qemu}" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" "$@"
"""


@dataclass(frozen=True)
class QemuRoot:
    """The wrapper to pass as the QEMU binary, and what it is."""

    binary: Path
    version: str
    suite: str
    manifest: Path
    cache_hit: bool

    def as_json(self) -> dict[str, Any]:
        return {"binary": str(self.binary), "version": self.version, "suite": self.suite,
                "manifest": str(self.manifest), "cache_hit": self.cache_hit}


def build_qemu_root(cache_root: Path | None = None, *, suite: str = QEMU_SUITE, force: bool = False) -> QemuRoot:
    """The QEMU of ``suite`` (with ``trixie`` beneath it) unpacked into a cached root."""
    started = time.monotonic()
    root = (cache_root if cache_root is not None else default_cache_root()).absolute()
    apt = indexed_apt(root / "apt" / f"qemu-{suite}", suite, base=QEMU_BASE_SUITES)
    pins = debs.install_closure([QEMU_PACKAGE], apt)
    qemu_pin = next(p for p in pins if p.name == QEMU_PACKAGE)
    builder = manifest.builder_source_hashes(_BUILDER_MODULES, ())
    key = manifest.cache_key(pins, builder, "", {"image": "qemu-root", "suite": suite})

    def build(work: Path, out: Path) -> dict[str, Any]:
        paths = debs.download(pins, root / "debs", apt)
        for pin in pins:
            debs.extract(paths[pin.name], out / ROOT_DIR)
        wrapper = out / WRAPPER
        wrapper.parent.mkdir(parents=True)
        wrapper.write_text(_WRAPPER_TEXT.format(version=qemu_pin.version, suite=suite, root_dir=ROOT_DIR,
                                                qemu=QEMU_IN_ROOT))
        wrapper.chmod(0o755)
        try:
            banner = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True, timeout=30,
                                    check=True).stdout.splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError) as exc:
            raise BuildError(f"the QEMU unpacked from {suite} ({qemu_pin.version}) does not run: {exc}") from exc
        return {
            "qemu_version_banner": banner,
            "qemu_package": qemu_pin.as_json(),
            "suite": suite,
            "packages": [pin.as_json() for pin in pins],
            "inputs": {"debs": {pin.filename: pin.sha256 for pin in pins}, "builder": builder},
            "outputs": {name: debs.sha256_file(out / name) for name in (WRAPPER, f"{ROOT_DIR}/{QEMU_IN_ROOT}")},
        }

    image_dir, doc, hit = cached_build(root, key, build, force=force, started=started)
    return QemuRoot(binary=image_dir / WRAPPER, version=str(doc["qemu_package"]["version"]), suite=suite,
                    manifest=image_dir / manifest.MANIFEST_NAME, cache_hit=hit)
