"""Turns the package's compressed bzImage into the uncompressed ELF ``vmlinux``.

Under TCG the kernel's own decompressor is the slowest part of the boot: Debian's
XZ bzImage spent about 2.4 s before the first console line. A kernel built with
``CONFIG_PVH`` carries a Xen PVH entry note (``XEN_ELFNOTE_PHYS32_ENTRY``), and
QEMU's ``-kernel`` boots such an ELF directly through its ``pvh.bin`` option ROM,
so decompressing once at build time removes that cost from every boot.
"""

from __future__ import annotations

import logging
import lzma
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from images.errors import ImageError

__all__ = ["VmlinuxError", "extract_vmlinux", "has_pvh_entry", "write_boot_kernel"]

_log = logging.getLogger(__name__)

# include/xen/interface/elfnote.h
XEN_ELFNOTE_PHYS32_ENTRY = 18
_XZ_MAGIC = b"\xfd7zXZ\x00"
_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF64_PHDR = struct.Struct("<IIQQQQQQ")
_PT_NOTE = 4


class VmlinuxError(ImageError, ValueError):
    """The bzImage payload could not be found or is not a usable ELF."""


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF payload of ``bzimage`` (XZ or gzip as Debian 12 ships them, zstd as 7.x does)."""
    for magic, decompress in ((_XZ_MAGIC, _unxz), (_GZIP_MAGIC, _gunzip), (_ZSTD_MAGIC, _unzstd)):
        start = bzimage.find(magic)
        while start >= 0:
            try:
                elf = decompress(bzimage[start:])
            except (lzma.LZMAError, zlib.error, OSError, subprocess.SubprocessError):
                elf = b""
            if elf[:4] == b"\x7fELF":
                return elf
            start = bzimage.find(magic, start + 1)
    raise VmlinuxError("no XZ, gzip or zstd stream holding an ELF image in the bzImage "
                       "(other kernel compressions are not supported; zstd needs the zstd tool)")


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _unzstd(data: bytes) -> bytes:
    """zstd through the ``zstd`` tool (Python 3.11 has no zstd module).

    The kernel appends the uncompressed size after the frame, which zstd reports as an
    unknown frame and exits 1 on after writing the whole first frame: the caller's ELF
    check, not the exit status, decides.
    """
    done = subprocess.run(["zstd", "-d", "-c", "-q"], input=data, capture_output=True,
                          timeout=120, check=False)
    return done.stdout


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


def write_boot_kernel(bzimage: Path, dest: Path, *, pvh: bool) -> str:
    """Write the kernel QEMU boots; return its format, ``pvh-elf`` or ``bzimage``.

    The uncompressed ELF when the kernel has a PVH entry (``pvh`` = ``CONFIG_PVH=y``),
    else the bzImage as shipped.
    """
    if pvh:
        try:
            elf = extract_vmlinux(bzimage.read_bytes())
        except VmlinuxError as exc:
            _log.warning("%s: %s; using the bzImage", bzimage, exc)
            elf = b""
        if elf and has_pvh_entry(elf):
            dest.write_bytes(elf)
            return "pvh-elf"
        _log.warning("%s: CONFIG_PVH=y but no PVH entry note; using the bzImage", bzimage)
    shutil.copyfile(bzimage, dest)
    return "bzimage"
