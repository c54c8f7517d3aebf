"""Recognising failed HMP commands.

``human-monitor-command`` succeeds at the QMP level even when the HMP command failed; the
failure is only in the reply text. These are the error shapes QEMU 10.0 produces (each
measured against qemu-system-x86_64 10.0.2), matched at the start of a reply line:

- ``unknown command: 'NAME'``                      unknown HMP command (monitor/hmp.c)
- ``Try "help NAME" for more information``          argument parse errors, after a line such
  as ``unexpected end of expression``, ``invalid char``, ``extraneous characters``
- ``Error: ...``                                    any command reporting an ``Error *``
  through ``hmp_handle_error``
- ``No memory is mapped at address 0x...``          ``gpa2hva`` / ``gpa2hpa`` on unmapped gpa
- ``Invalid MCE bank number``                       ``mce`` with bank >= MCG_CAP banks
- ``Guest CPU does not support MCA broadcast``      ``mce -b`` on a CPU model without it
- ``unknown event "NAME"``                          ``trace-event`` with an unknown name

Deliberately NOT errors: ``mce`` messages ending in ``raising triple fault`` (the command
ran; QEMU reset the guest instead of delivering #MC, and emits MEMORY_FAILURE with action
``reset``): that is an outcome for the caller to judge (see ``MceInjection.guest_reset``).
Also note ``mce`` with a cpu index that does not exist is silently ignored by QEMU (empty
reply), which is why ``inject_mce`` validates the cpu index itself.
"""

from __future__ import annotations

import re

HMP_ERROR_SHAPES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.MULTILINE))
    for name, pattern in (
        ("unknown command", r"^unknown command: "),
        ("parse error", r'^Try "help [^"]*" for more information'),
        ("Error", r"^Error: "),
        ("unmapped gpa", r"^No memory is mapped at address "),
        ("invalid MCE bank", r"^Invalid MCE bank number"),
        ("no MCA broadcast", r"^Guest CPU does not support MCA broadcast"),
        ("unknown trace event", r'^unknown event "'),
    )
)


def hmp_error_shape(reply: str) -> str | None:
    """Name of the first error shape the reply matches, or None when it reads as success."""
    for name, pattern in HMP_ERROR_SHAPES:
        if pattern.search(reply):
            return name
    return None
