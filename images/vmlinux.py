"""Turns the package's compressed bzImage into the uncompressed ELF ``vmlinux``.

Under TCG the kernel's own decompressor is the slowest part of the boot: Debian's
XZ bzImage spent about 2.4 s before the first console line. A kernel built with
``CONFIG_PVH`` carries a Xen PVH entry note (``XEN_ELFNOTE_PHYS32_ENTRY``), and
QEMU's ``-kernel`` boots such an ELF directly through its ``pvh.bin`` option ROM,
so decompressing once at build time removes that cost from every boot.
"""

from __future__ import annotations

import lzma
import struct
import zlib

__all__ = ["VmlinuxError", "extract_vmlinux", "has_pvh_entry"]

# include/xen/interface/elfnote.h
XEN_ELFNOTE_PHYS32_ENTRY = 18
_XZ_MAGIC = b"\xfd7zXZ\x00"
_GZIP_MAGIC = b"\x1f\x8b\x08"
_ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF64_PHDR = struct.Struct("<IIQQQQQQ")
_PT_NOTE = 4


class VmlinuxError(ValueError):
    """The bzImage payload could not be found or is not a usable ELF."""


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF payload of ``bzimage`` (XZ or gzip compressed, as Debian ships them)."""
    for magic, decompress in ((_XZ_MAGIC, _unxz), (_GZIP_MAGIC, _gunzip)):
        start = bzimage.find(magic)
        while start >= 0:
            try:
                elf = decompress(bzimage[start:])
            except (lzma.LZMAError, zlib.error):
                elf = b""
            if elf[:4] == b"\x7fELF":
                return elf
            start = bzimage.find(magic, start + 1)
    raise VmlinuxError("no XZ or gzip stream holding an ELF image in the bzImage "
                       "(other kernel compressions are not supported)")


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def has_pvh_entry(elf: bytes) -> bool:
    """True when a PT_NOTE segment holds the Xen PVH 32-bit entry point note."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise VmlinuxError("not an ELF64 image")
    fields = _ELF64_HEADER.unpack_from(elf)
    phoff, phentsize, phnum = fields[5], fields[9], fields[10]
    for i in range(phnum):
        p_type, _, offset, _, _, filesz, _, _ = _ELF64_PHDR.unpack_from(elf, phoff + i * phentsize)
        if p_type != _PT_NOTE:
            continue
        pos, end = offset, offset + filesz
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False
