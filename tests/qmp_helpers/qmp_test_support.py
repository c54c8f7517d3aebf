"""Shared pieces of the qmp_helpers tests: the QEMU command line and a tiny firmware.

(A plain module, not conftest, so that imports stay unambiguous when other test
directories grow their own conftest.py.)

The firmware: a 64 KiB x86 image, hand-assembled, for tests that need a guest with CR4.MCE.

Why: without a guest kernel, QEMU answers ``mce`` with "MCE capability is not enabled,
raising triple fault" and resets the guest (CR4.MCE is clear under SeaBIOS). This image,
loaded with ``-bios``, runs in real mode:

1. points IVT vector 18 (#MC) at a handler, sets CR4.MCE (bit 6),
2. writes ``GMEMTEST-FW-READY`` to COM1 (0x3f8) and halts in a loop,
3. on #MC writes ``GMEMTEST-FW-MCE`` to COM1 and halts forever.

So a real #MC is delivered by QEMU and seen by guest code (the console line is the proof).
"""

from __future__ import annotations

from pathlib import Path

QEMU = "qemu-system-x86_64"
BASE_ARGS = ["-machine", "q35", "-accel", "tcg", "-m", "256", "-nodefaults",
             "-cpu", "max,vendor=GenuineIntel", "-smp", "1"]

READY_MARKER = "GMEMTEST-FW-READY"
MCE_MARKER = "GMEMTEST-FW-MCE"
_SIZE = 64 * 1024
_COM1 = 0x3F8


def _print(text: str) -> bytes:
    code = bytes([0xBA]) + _COM1.to_bytes(2, "little")  # mov dx, 0x3f8
    for char in (text + "\n").encode():
        code += bytes([0xB0, char, 0xEE])  # mov al, char ; out dx, al
    return code


def _halt_loop() -> bytes:
    return bytes([0xF4, 0xEB, 0xFD])  # hlt ; jmp $-1 (back to hlt)


def firmware_image() -> bytes:
    """The image; the code sits at F000:0000, the reset vector at F000:FFF0 jumps there."""
    handler = _print(MCE_MARKER) + bytes([0xFA]) + _halt_loop()  # cli: stay halted
    main_prefix_len = 1 + 4 + 6 + 6  # cli, xor/mov ds, two word stores
    main_rest = (bytes([0x0F, 0x20, 0xE0,        # mov eax, cr4
                        0x83, 0xC8, 0x40,        # or ax, 0x40 (CR4.MCE)
                        0x0F, 0x22, 0xE0])       # mov cr4, eax
                 + _print(READY_MARKER) + _halt_loop())
    handler_offset = main_prefix_len + len(main_rest)
    main = (bytes([0xFA,                        # cli
                   0x31, 0xC0, 0x8E, 0xD8])     # xor ax, ax ; mov ds, ax
            + bytes([0xC7, 0x06, 0x48, 0x00]) + handler_offset.to_bytes(2, "little")
            + bytes([0xC7, 0x06, 0x4A, 0x00, 0x00, 0xF0])  # IVT[18] = F000:handler
            + main_rest)
    assert len(main) == handler_offset
    image = bytearray(b"\xf4" * _SIZE)
    image[0:len(main) + len(handler)] = main + handler
    image[0xFFF0:0xFFF5] = bytes([0xEA, 0x00, 0x00, 0x00, 0xF0])  # jmp far F000:0000
    return bytes(image)


def write_firmware(path: Path) -> Path:
    """Write the image to ``path`` and return it."""
    path.write_bytes(firmware_image())
    return path
