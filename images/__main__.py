"""``python -m images build|qemu|qemu-build [--cache DIR] [--force] [--json]``: build or reuse the
default guest, Debian's newest QEMU in a root of its own, or the project's QEMU (its patch series)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from images.build import BuildError, build_default_image, default_cache_root
from images.debs import PackageError
from images.kconfig import KernelConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m images")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the default guest image (cached)")
    build.add_argument("--cache", type=Path, default=None,
                       help=f"cache root (default: {default_cache_root()})")
    build.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    build.add_argument("--json", action="store_true", help="print the GuestImage as JSON")
    build.add_argument("-v", "--verbose", action="store_true")
    qemu = sub.add_parser("qemu", help="unpack the newer QEMU of a Debian suite into its own root (cached)")
    qemu.add_argument("--cache", type=Path, default=None, help=f"cache root (default: {default_cache_root()})")
    qemu.add_argument("--suite", default=None, help="Debian suite of the QEMU (default: trixie-backports)")
    qemu.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    qemu.add_argument("--json", action="store_true", help="print the QemuRoot as JSON")
    qemu.add_argument("-v", "--verbose", action="store_true")
    built = sub.add_parser("qemu-build", help="build the project's QEMU: Debian's source plus images/patches/qemu "
                           "(cached)")
    built.add_argument("--cache", type=Path, default=None, help=f"cache root (default: {default_cache_root()})")
    built.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    built.add_argument("--json", action="store_true", help="print the BuiltQemu as JSON")
    built.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "qemu":
        return _qemu(args)
    if args.command == "qemu-build":
        return _qemu_build(args)
    try:
        image = build_default_image(args.cache, force=args.force)
    except (BuildError, PackageError, KernelConfigError) as exc:
        print(f"image build failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(image.as_json(), indent=2))
    else:
        print(f"kernel  {image.kernel}\ninitrd  {image.initrd}\nssh key {image.ssh_key}\n"
              f"release {image.kernel_release}\ncache   {'hit' if image.cache_hit else 'built'}")
    return 0


def _qemu(args: argparse.Namespace) -> int:
    from images.qemu_root import QEMU_SUITE, build_qemu_root

    try:
        root = build_qemu_root(args.cache, suite=args.suite or QEMU_SUITE, force=args.force)
    except (BuildError, PackageError) as exc:
        print(f"QEMU root build failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(root.as_json(), indent=2))
    else:
        print(f"qemu    {root.binary}\nversion {root.version} ({root.suite})")
        print(f"cache   {'hit' if root.cache_hit else 'built'}")
    return 0


def _qemu_build(args: argparse.Namespace) -> int:
    from images.qemu_build import build_qemu

    try:
        built = build_qemu(args.cache, force=args.force, progress=lambda line: print(line, file=sys.stderr))
    except (BuildError, PackageError) as exc:
        print(f"QEMU build failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(built.as_json(), indent=2))
    else:
        print(f"qemu    {built.binary}\nsource  {built.source_version}\nseries  {', '.join(built.series)}\n"
              f"package {built.pkgversion}\ncache   {'hit' if built.cache_hit else 'built'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
