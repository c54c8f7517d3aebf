"""The image manifest: every input and output of a build, with its sha256.

The cache key is a hash over the inputs that decide the image (resolved package
pins, the builder's own source, the probe source), so a change to any of them
builds a new image and an unchanged set reuses the old one. Output hashes are
checked on every reuse: a cache hit means the files on disk are the ones built.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from typing import TYPE_CHECKING, Any

from images.debs import sha256_file

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from pathlib import Path

    from images.debs import PackagePin

__all__ = [
    "BUILDER_MODULES",
    "MANIFEST_NAME",
    "SCHEMA",
    "builder_source_hashes",
    "cache_key",
    "read_manifest",
    "verify_outputs",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
SCHEMA = 1


# The modules whose code decides the image bytes; tools next to them (the CLI,
# measure_boot) do not, and editing them must not invalidate the cache.
BUILDER_MODULES: tuple[str, ...] = (
    "build.py", "cpio.py", "debs.py", "initramfs.py", "kconfig.py", "keys.py", "kmod.py",
    "manifest.py", "vmlinux.py",
)
# The files under ``images/files`` the default guest image is made from.
BUILDER_FILES: tuple[str, ...] = ("inittab", "rcS")


def builder_source_hashes(modules: Iterable[str] = BUILDER_MODULES,
                          files: Iterable[str] = BUILDER_FILES) -> dict[str, str]:
    """sha256 of each builder module and each of its files under ``images/files``.

    Each image names its own modules and files, so editing the lab host's init does
    not invalidate the guest image and vice versa.
    """
    root = resources.files("images")
    entries = [(name, root.joinpath(name)) for name in modules]
    entries += [(f"files/{name}", root.joinpath("files", name)) for name in files]
    return {name: hashlib.sha256(entry.read_bytes()).hexdigest()
            for name, entry in sorted(entries)}


def cache_key(pins: Iterable[PackagePin], builder: Mapping[str, str], probe_sha256: str,
              extra: Mapping[str, Any] | None = None) -> str:
    """Hash of the canonical JSON of the inputs; equal inputs give equal keys.

    ``extra`` carries inputs that are not packages (user-supplied kernel files by
    sha256, build parameters); it is left out of the document when empty so the
    default guest image keeps its key.
    """
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "packages": sorted((pin.as_json() for pin in pins), key=lambda p: p["name"]),
        "builder": dict(sorted(builder.items())),
        "probe_source": probe_sha256,
    }
    if extra:
        doc["extra"] = dict(extra)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Write atomically: a reader sees the old manifest or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a schema {SCHEMA} image manifest")
    return data


def verify_outputs(image_dir: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Problems found (empty when every output file exists with its recorded hash)."""
    problems: list[str] = []
    outputs = manifest.get("outputs", {})
    if not outputs:
        problems.append("manifest lists no outputs")
    for name, expected in sorted(outputs.items()):
        path = image_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        actual = sha256_file(path)
        if actual != expected:
            problems.append(f"{name}: sha256 {actual}, manifest says {expected}")
    return problems
