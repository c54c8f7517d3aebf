"""The root of every exception images raises (a build, a package, a kernel config, an archive),
so a caller can catch "the image could not be had" in one clause; each concrete error keeps its
standard base as well."""

from __future__ import annotations

__all__ = ["ImageError"]


class ImageError(Exception):
    """An image, or a part of one, could not be built, resolved or read."""
