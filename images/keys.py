"""SSH keys of one image: the client key the tests log in with, the server's host key.

The client key is generated with paramiko, so the file is one paramiko loads back
(OpenSSH PEM, ECDSA P-256: dropbear accepts it, and paramiko cannot generate
Ed25519). The host key is generated at build time with the image's own
``dropbearkey`` (run through the extracted dynamic loader, so the host needs no
dropbear): a guest that generated its key at boot would spend TCG time on it.
"""

from __future__ import annotations

import logging
import os
import subprocess
from typing import TYPE_CHECKING

import paramiko

from images.errors import ImageError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["HOST_KEY_TYPE", "SshKeyError", "dropbear_host_key", "new_client_key"]

_log = logging.getLogger(__name__)

# ECDSA: measured under TCG with python -m images.measure_boot against the other host key types.
HOST_KEY_TYPE = "ecdsa"
_LOADER = "lib64/ld-linux-x86-64.so.2"
_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")


class SshKeyError(ImageError, RuntimeError):
    """Key generation failed."""


def new_client_key(private_path: Path) -> str:
    """Write a fresh private key (mode 0600) and return its authorized_keys line."""
    key = paramiko.ECDSAKey.generate(bits=256)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as stream:
        key.write_private_key(stream)
    return f"{key.get_name()} {key.get_base64()} gmemtest-image\n"


def dropbear_host_key(userland: Path, dest: Path, key_type: str = HOST_KEY_TYPE) -> None:
    """Generate a dropbear-format host key with the extracted ``dropbearkey``."""
    loader = userland / _LOADER
    tool = userland / "usr/bin/dropbearkey"
    libs = ":".join(str(userland / d) for d in _LIB_DIRS)
    argv = [str(loader), "--library-path", libs, str(tool), "-t", key_type, "-f", str(dest)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except OSError as exc:
        raise SshKeyError(f"cannot run {tool} through {loader}: {exc}") from exc
    if done.returncode != 0 or not dest.is_file():
        raise SshKeyError(f"dropbearkey -t {key_type} exited {done.returncode}: "
                        f"{done.stderr.strip()}")
    _log.debug("host key %s generated: %s", key_type, done.stdout.strip().splitlines()[-1:])
