"""``python -m images build [--cache DIR] [--force] [--json]``: build or reuse the default guest."""

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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
