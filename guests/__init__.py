"""Guest side of gmemtest: profiles, the SSH session, the in-guest probe and its client.

The probe is shipped as C source (not a binary) because the image builder compiles it
statically for the guest; :func:`probe_source_path` is how it finds the file.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path

__all__ = ["probe_source_path"]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def probe_source_path() -> Path:
    """Return the path of ``probe/gmem_probe.c`` inside the installed package.

    Raises FileNotFoundError when the package was installed without its package data
    (``setup.cfg`` ships ``guests = probe/*.c``), naming the path that was expected.
    """
    resource = files(__name__).joinpath("probe", "gmem_probe.c")
    path = Path(str(resource))
    if not path.is_file():
        raise FileNotFoundError(
            f"probe source not found at {path}: the 'guests' package must be installed "
            "from a file system with its package data (probe/*.c)"
        )
    return path
