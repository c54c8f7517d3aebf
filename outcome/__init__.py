"""The one outcome shape of every check in gmemtest, host or guest: a verdict of named checks.

The bottom layer: every other package (host_stack, qmp_helpers, guests, images, gmemtest) may
import it, and it imports none of them.
"""

from .finding import Finding, Severity
from .verdict import NOT_RUN, STATUSES, Check, Status, Verdict

__all__ = (  # noqa: RUF022 - curated order, most important first
    "Verdict",
    "Check",
    "Finding",
    "Status",
    "STATUSES",
    "NOT_RUN",
    "Severity",
)
