"""The one exception root of the gmemtest package; its modules derive their errors from it."""

from __future__ import annotations


class GmemtestError(Exception):
    """A gmemtest run could not be carried out as asked (not a verdict on the host stack)."""


class ScenarioError(GmemtestError):
    """The scenario could not be carried out as specified (not a verdict on the host stack)."""
