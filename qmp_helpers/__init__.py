"""QEMU as a managed process and its QMP connection.

Knows nothing of guests, images, SSH or Avocado: callers pass the guest's QEMU arguments,
this package owns launching, QMP (with timeouts and a transcript), the serial console
file, the SSH host forward, MCE injection by named kind and teardown that leaves nothing.
"""

import logging

from .errors import (
    EventTimeout,
    GpaOutOfRange,
    HmpError,
    LandingNotReached,
    MachineStateError,
    MachineStuck,
    MigrationError,
    QemuBinaryNotFound,
    QemuDied,
    QemuError,
    QemuLaunchError,
    QmpCommandError,
    QmpConnectionError,
    QmpTimeout,
)
from .events import QmpEvent
from .hmp import HMP_ERROR_SHAPES, hmp_error_shape
from .machine import DEFAULT_QEMU, STUCK_RUN_STATES, QemuMachine, opt_escape, resolve_binary
from .mce import MCE_BANKS, MCE_KINDS, MceInjection, MceKind, mce_kind
from .migration import LoadRecord, SaveRecord, load_state, save_state
from .process import find_tagged_qemus, reap_orphans
from .qemu_caps import QemuCapabilities, kvm_start_refusal, probe_qemu, validate_args
from .vcpu_state import VcpuState, parse_info_registers

__all__ = (  # noqa: RUF022 - curated order, most important first
    # Classes, most to least important
    "QemuMachine",
    "QmpEvent",
    "MceKind",
    "MceInjection",
    "VcpuState",
    "QemuCapabilities",
    "SaveRecord",
    "LoadRecord",
    # Functions and data
    "mce_kind",
    "save_state",
    "load_state",
    "MCE_KINDS",
    "MCE_BANKS",
    "STUCK_RUN_STATES",
    "DEFAULT_QEMU",
    "probe_qemu",
    "validate_args",
    "kvm_start_refusal",
    "reap_orphans",
    "find_tagged_qemus",
    "resolve_binary",
    "opt_escape",
    "parse_info_registers",
    "hmp_error_shape",
    "HMP_ERROR_SHAPES",
    # Exceptions, most generic to most explicit
    "QemuError",
    "QemuBinaryNotFound",
    "QemuLaunchError",
    "MachineStateError",
    "MachineStuck",
    "QemuDied",
    "QmpTimeout",
    "QmpConnectionError",
    "QmpCommandError",
    "HmpError",
    "GpaOutOfRange",
    "LandingNotReached",
    "EventTimeout",
    "MigrationError",
)

logging.getLogger(__name__).addHandler(logging.NullHandler())
