"""Linux uAPI constants used by qmp_helpers, with their source.

Source: include/uapi/linux/prctl.h (Linux): ``#define PR_SET_PDEATHSIG 1``.
"""

from __future__ import annotations

PR_SET_PDEATHSIG = 1
