"""Kernel module dependency resolution straight from the ``.ko`` files.

Debian's kernel package does not ship ``modules.dep`` (its postinst runs depmod),
and the host need not have kmod. Every module records its direct dependencies in
the ``depends=`` string of its ELF ``.modinfo`` section, which is all that busybox
``insmod`` ordering needs.

Debian 7.x kernels ship their modules as ``.ko.xz``; busybox ``insmod`` may lack xz
support and decompressing under TCG costs boot time, so :func:`read_module` hands
out the plain ELF and the initramfs stores that.
"""

from __future__ import annotations

import lzma
import struct
from typing import TYPE_CHECKING

from images.errors import ImageError

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

__all__ = ["ModuleError", "index_modules", "load_order", "modinfo", "module_file_name", "read_module"]

_ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF64_SECTION = struct.Struct("<IIQQQQIIQQ")


class ModuleError(ImageError, RuntimeError):
    """A module that cannot be found or parsed."""


def _stem(name: str) -> str:
    """Module names treat '-' and '_' alike (kernel/module.c)."""
    return name.replace("-", "_")


def modinfo(ko: bytes) -> dict[str, str]:
    """Key/value strings of the ``.modinfo`` section of a little-endian ELF64 object."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2 or ko[5] != 1:
        raise ModuleError("not a little-endian ELF64 object")
    fields = _ELF64_HEADER.unpack_from(ko)
    shoff, shentsize, shnum, shstrndx = fields[6], fields[11], fields[12], fields[13]
    sections = [_ELF64_SECTION.unpack_from(ko, shoff + i * shentsize) for i in range(shnum)]
    strtab = sections[shstrndx]
    names = ko[strtab[4]:strtab[4] + strtab[5]]
    for sec in sections:
        end = names.index(b"\0", sec[0])
        if names[sec[0]:end] == b".modinfo":
            blob = ko[sec[4]:sec[4] + sec[5]]
            info: dict[str, str] = {}
            for item in blob.split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    raise ModuleError("no .modinfo section")


def module_file_name(path: Path) -> str:
    """``name.ko`` for ``name.ko`` or ``name.ko.xz``: the file name in the initramfs."""
    name = path.name
    for suffix in (".ko.xz", ".ko"):
        if name.endswith(suffix):
            return name[:-len(suffix)] + ".ko"
    raise ModuleError(f"{path}: not a kernel module (expected .ko or .ko.xz)")


def read_module(path: Path) -> bytes:
    """The module's ELF bytes, decompressed when the file is ``.ko.xz``."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        try:
            return lzma.decompress(data, format=lzma.FORMAT_XZ)
        except lzma.LZMAError as exc:
            raise ModuleError(f"{path}: not a valid xz stream: {exc}") from exc
    return data


def index_modules(modules_dir: Path) -> dict[str, Path]:
    """Map normalised module name to its ``.ko``/``.ko.xz`` path under ``lib/modules/<release>``."""
    found = sorted([*modules_dir.rglob("*.ko"), *modules_dir.rglob("*.ko.xz")])
    return {_stem(module_file_name(ko)[:-3]): ko for ko in found}


def load_order(wanted: Iterable[str], index: dict[str, Path]) -> list[Path]:
    """Modules to insmod, each after its dependencies (a depth-first post-order)."""
    order: list[Path] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str, parent: str | None) -> None:
        stem = _stem(name)
        if stem in done:
            return
        if stem in visiting:
            raise ModuleError(f"module dependency cycle through {stem}")
        path = index.get(stem)
        if path is None:
            via = f" (needed by {parent})" if parent else ""
            raise ModuleError(f"module {stem}{via} not found among {len(index)} modules")
        visiting.add(stem)
        try:
            depends = modinfo(read_module(path)).get("depends", "")
        except ModuleError as exc:
            raise ModuleError(f"{path}: {exc}") from exc
        for dep in filter(None, depends.split(",")):
            visit(dep, stem)
        visiting.discard(stem)
        done.add(stem)
        order.append(path)

    for name in wanted:
        visit(name, None)
    return order
