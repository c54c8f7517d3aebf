"""Lines of QEMU's log trace backend (Debian builds QEMU with it): one line per event on stderr.

A line is ``name args``, or ``pid@secs.usecs:name args`` when QEMU stamps its messages. Every
trace event's name holds an underscore, which QEMU's own messages ("qemu-system-x86_64: ...",
"KVM internal error. ...", "error: ...") never start with.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["TRACE_PREFIX", "is_trace_line"]

# The optional stamp before an event's name; compose event patterns as ``^`` + TRACE_PREFIX + name.
TRACE_PREFIX: Final = r"(?:\d+@[\d.]+:)?"
_ANY_EVENT = re.compile(rf"^{TRACE_PREFIX}[a-z][a-z0-9]*_[a-z0-9_]+ ")


def is_trace_line(line: str) -> bool:
    """True for a trace event's line, False for anything else QEMU writes to stderr."""
    return _ANY_EVENT.match(line) is not None
