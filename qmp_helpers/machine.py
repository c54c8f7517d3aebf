"""QEMU as a managed process: launch from an argument list, QMP, console, guaranteed teardown.

The machine owns the plumbing arguments (QMP socket, serial console file, display, the SSH
host forward) and leaves everything about the guest to the caller's ``args``.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

from .errors import (
    GpaOutOfRange,
    HmpError,
    LandingNotReached,
    MachineStateError,
    MachineStuck,
    QemuBinaryNotFound,
    QemuDied,
    QemuError,
    QemuLaunchError,
    QmpConnectionError,
)
from .events import EventPredicate, EventRecorder, QmpEvent
from .hmp import hmp_error_shape
from .mce import MCE_BANKS, MceInjection, MceKind, mce_command_line, mce_kind
from .memslots import MemslotRegistration, live_memslots, parse_memslot_registrations
from .process import QemuProcess, new_tag
from .qmp_sync import SyncQmp
from .trace_log import is_trace_line
from .transcript import Transcript
from .vcpu_state import VcpuState, parse_info_registers

_LOG = logging.getLogger(__name__)

# AF_UNIX sun_path holds 108 bytes including the NUL; Avocado test directories can be
# longer than that, in which case the socket goes to a short private temp directory.
_SUN_PATH_MAX = 107
# How often wait_console asks query-status when it watches for a stuck VM.
_STATE_POLL_S = 0.5
# Run states in which a booting guest will never print again (qapi/run-state.json).
STUCK_RUN_STATES = ("internal-error", "shutdown", "guest-panicked", "io-error")
_HOSTFWD_RE = re.compile(
    r"TCP\[HOST_FORWARD\]\s+\d+\s+(?P<haddr>\S+)\s+(?P<hport>\d+)\s+\S+\s+(?P<gport>\d+)")
_MTREE_RAM_RE = re.compile(
    r"^\s*(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) \(prio -?\d+, ram\): (?P<name>\S+)",
    re.MULTILINE)
_GPA2HVA_RE = re.compile(r"Host virtual address for (0x[0-9a-f]+) \((.*)\) is (0x[0-9a-f]+)")


def opt_escape(value: str) -> str:
    """Escape a value for a QEMU ``key=value,...`` option (commas are doubled)."""
    return value.replace(",", ",,")


# The QEMU every caller gets unless it names another: a name looked up on PATH.
DEFAULT_QEMU: Final = "qemu-system-x86_64"


def resolve_binary(binary: str) -> str:
    """Absolute path of the QEMU binary, or :class:`QemuBinaryNotFound`."""
    path_env = os.environ.get("PATH", os.defpath)
    if os.sep in binary:
        if os.path.isfile(binary) and os.access(binary, os.X_OK):
            return os.path.abspath(binary)
        raise QemuBinaryNotFound(binary, path_env)
    found = shutil.which(binary, path=path_env)
    if found is None:
        raise QemuBinaryNotFound(binary, path_env)
    return found


class QemuMachine:
    """One QEMU process and its QMP connection; use as a context manager.

    Files in ``workdir``: ``console.log`` (serial console), ``qmp.jsonl`` (QMP transcript),
    ``qemu-stderr.log`` (QEMU's stdout+stderr), ``qmp.sock`` while running.
    """

    def __init__(self, args: Sequence[str], workdir: Path, *,
                 binary: str = DEFAULT_QEMU, name: str = "guest",
                 ssh_forward_port: int | None = 22, qmp_timeout: float = 10.0,
                 incoming: bool = False, nic_options: Sequence[str] = ()) -> None:
        self._user_args = tuple(args)
        # -incoming defer: QEMU starts paused and waits for migrate-incoming (a saved state).
        self.incoming = incoming
        # Extra properties of the SSH forward's virtio-net-pci device (e.g. disable-modern=on).
        self.nic_options = tuple(nic_options)
        self.workdir = Path(workdir)
        self.binary = binary
        self.name = name
        self.ssh_forward_port = ssh_forward_port
        self.qmp_timeout = qmp_timeout
        self.tag = new_tag()
        self._argv: tuple[str, ...] = ()
        self._process: QemuProcess | None = None
        self._qmp: SyncQmp | None = None
        self._transcript: Transcript | None = None
        self._stderr_file: IO[bytes] | None = None
        self._socket_dir: Path | None = None
        self._socket_path: Path | None = None
        self._ssh_port: int | None = None
        self._recorder = EventRecorder()
        self._console_text = ""
        self._console_offset = 0
        self._console_cursor = 0
        self._console_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    # ----- paths and properties -------------------------------------------------------
    @property
    def console_log(self) -> Path:
        """Serial console (ttyS0) output file."""
        return self.workdir / "console.log"

    @property
    def qmp_log(self) -> Path:
        """JSONL transcript of QMP commands, replies and events."""
        return self.workdir / "qmp.jsonl"

    @property
    def stderr_log(self) -> Path:
        """QEMU's own stdout and stderr."""
        return self.workdir / "qemu-stderr.log"

    @property
    def qmp_socket(self) -> Path:
        """The QMP UNIX socket (in workdir unless that path is too long for AF_UNIX)."""
        if self._socket_path is None:
            raise MachineStateError(f"machine {self.name} was not launched")
        return self._socket_path

    @property
    def args(self) -> tuple[str, ...]:
        """The full argv QEMU was started with."""
        return self._argv

    @property
    def pid(self) -> int:
        """QEMU's pid."""
        if self._process is None:
            raise MachineStateError(f"machine {self.name} was not launched")
        return self._process.pid

    @property
    def ssh_port(self) -> int:
        """Host TCP port on 127.0.0.1 forwarded to the guest's ``ssh_forward_port``."""
        if self._ssh_port is None:
            raise MachineStateError(
                f"machine {self.name} has no SSH forward (ssh_forward_port="
                f"{self.ssh_forward_port}, launched={self._process is not None})")
        return self._ssh_port

    @property
    def events(self) -> list[QmpEvent]:
        """Every QMP event received so far, oldest first."""
        return self._recorder.snapshot()

    def running(self) -> bool:
        """True while the QEMU process exists."""
        return self._process is not None and self._process.running()

    # ----- launch ---------------------------------------------------------------------
    def _build_argv(self, binary_path: str, socket_path: Path, *, name: str | None = None,
                    console_log: Path | None = None) -> list[str]:
        argv = [binary_path, *self._user_args,
                "-name", f"guest={opt_escape(self.name)}.{self.tag}" if name is None else name,
                "-qmp", f"unix:{opt_escape(str(socket_path))},server=on,wait=off",
                "-chardev", f"file,id=gmcon0,path={opt_escape(str(console_log or self.console_log))}",
                "-serial", "chardev:gmcon0"]
        if "-nographic" not in self._user_args and "-display" not in self._user_args:
            argv += ["-display", "none"]
        if self.ssh_forward_port is not None:
            argv += ["-netdev",
                     f"user,id=gmnet0,hostfwd=tcp:127.0.0.1:0-:{self.ssh_forward_port}",
                     "-device", ",".join(("virtio-net-pci,netdev=gmnet0", *self.nic_options))]
        if self.incoming:
            argv += ["-incoming", "defer"]
        return argv

    def stable_argv(self) -> list[str]:
        """The argv with everything that differs between two runs of one guest replaced.

        The per-run parts are the tag in ``-name``, the QMP socket and console paths and
        ``-incoming`` (the SSH forward's host port is already 0, picked by the kernel). Two
        machines with equal stable argvs are the same guest hardware, which is what a saved
        state may be restored into.
        """
        argv = self._build_argv(resolve_binary(self.binary), Path("<qmp-socket>"),
                                name="<name>", console_log=Path("<console-log>"))
        if self.incoming:
            argv = argv[:-2]
        return argv

    def launch(self) -> QemuMachine:
        """Start QEMU and connect QMP; on any failure nothing is left running.

        Calling it on a machine that is already running is a no-op, so both
        ``with QemuMachine(...) as m:`` and "enter, then ``launch()``" (the qemu.machine
        habit) work. A machine cannot be launched again after shutdown.
        """
        if self._process is not None:
            if self._qmp is not None and self._process.running():
                return self
            raise MachineStateError(f"machine {self.name} was launched before and is shut "
                                    "down; create a new QemuMachine")
        binary_path = resolve_binary(self.binary)
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            socket_path = self.workdir / "qmp.sock"
            if len(os.fsencode(socket_path)) > _SUN_PATH_MAX:
                self._socket_dir = Path(tempfile.mkdtemp(prefix="gmq-"))
                socket_path = self._socket_dir / "qmp.sock"
            socket_path.unlink(missing_ok=True)
            self._socket_path = socket_path
            self.console_log.write_bytes(b"")
            self._argv = tuple(self._build_argv(binary_path, socket_path))
            self._stderr_file = self.stderr_log.open("wb")
            self._transcript = Transcript(self.qmp_log)
            self._transcript.write("launch", argv=list(self._argv))
            _LOG.info("launching %s: %s", self.name, " ".join(self._argv))
            self._process = QemuProcess(
                self._argv, self._stderr_file,
                on_exit=lambda status: self._recorder.close(
                    f"QEMU exited with status {status}; see {self.stderr_log}"))
            self._process.start()
            self._connect_qmp(socket_path)
            if self.ssh_forward_port is not None:
                self._ssh_port = self._find_ssh_port()
        except BaseException:
            self.shutdown(timeout=2.0)
            raise
        return self

    def _launch_error(self, message: str) -> QemuLaunchError:
        assert self._process is not None
        if self._process.running():
            self._process.stop()
        if self._stderr_file is not None:
            self._stderr_file.flush()
        stderr = self.stderr_log.read_text(errors="replace")
        return QemuLaunchError(message, argv=self._argv, stderr=stderr,
                               returncode=self._process.returncode)

    def _connect_qmp(self, socket_path: Path) -> None:
        assert self._process is not None and self._transcript is not None
        deadline = time.monotonic() + self.qmp_timeout
        last_error: Exception | None = None
        while True:
            if not self._process.running():
                raise self._launch_error(f"QEMU {self.binary!r} exited during launch")
            if time.monotonic() > deadline:
                raise self._launch_error(
                    f"QEMU {self.binary!r} did not accept QMP on {socket_path} within "
                    f"{self.qmp_timeout:.1f} s (last error: {last_error!r})")
            if socket_path.exists():
                qmp = SyncQmp(self.name, self._recorder, self._transcript, self.qmp_timeout)
                try:
                    qmp.connect(str(socket_path), self.qmp_timeout)
                except QmpConnectionError as exc:
                    last_error = exc
                    qmp.close()
                else:
                    self._qmp = qmp
                    return
            time.sleep(0.02)

    def _find_ssh_port(self) -> int:
        """Host port the kernel chose for ``hostfwd=tcp:127.0.0.1:0-:22``.

        ``info usernet`` lists the HOST_FORWARD listening socket with the port it is bound
        to (checked against the kernel's socket table: it is the real bound port).
        """
        text = self.hmp("info usernet")
        for match in _HOSTFWD_RE.finditer(text):
            if int(match["gport"]) == self.ssh_forward_port and int(match["hport"]) != 0:
                return int(match["hport"])
        raise MachineStateError(
            f"no HOST_FORWARD to guest port {self.ssh_forward_port} in 'info usernet': "
            f"{text!r}")

    # ----- QMP / HMP ------------------------------------------------------------------
    def _require_qmp(self) -> SyncQmp:
        if self._qmp is None:
            raise MachineStateError(f"machine {self.name} has no QMP connection "
                                    "(not launched, or shut down)")
        return self._qmp

    def qmp(self, cmd: str, *, qmp_timeout: float | None = None, **arguments: Any) -> Any:
        """Run a QMP command; raises :class:`QmpCommandError` on a QMP error reply.

        ``qmp_timeout`` overrides the machine's per-call deadline (named so that it cannot
        collide with a QMP argument called ``timeout``).
        """
        try:
            return self._require_qmp().execute(cmd, arguments, qmp_timeout)
        except QmpConnectionError as exc:
            process = self._process
            if process is None or not process.wait(2.0):
                raise
            # The connection broke because QEMU is gone: say that, with its own last words
            # (an assertion, "KVM internal error", ...), not the socket's.
            raise QemuDied(f"QEMU (machine {self.name}, pid {process.pid}) exited with status {process.returncode} "
                           f"during QMP {cmd!r}; its stderr ends: {self._stderr_tail()!r}",
                           returncode=process.returncode) from exc

    def hmp(self, command_line: str, qmp_timeout: float | None = None) -> str:
        """Run an HMP command; raises :class:`HmpError` when the reply text is an error."""
        reply = self.qmp("human-monitor-command", qmp_timeout=qmp_timeout,
                         **{"command-line": command_line})
        text = str(reply)
        shape = hmp_error_shape(text)
        if shape is not None:
            raise HmpError(command_line, text, shape)
        return text

    def status(self) -> str:
        """The VM run state from ``query-status`` (running, paused, guest-panicked, ...)."""
        return str(self.qmp("query-status")["status"])

    def event_mark(self) -> int:
        """Mark for ``wait_event(since=...)``: take it *before* the action you wait on."""
        return self._recorder.mark()

    def wait_event(self, name: str, predicate: EventPredicate | None = None,
                   timeout: float = 10.0, since: int | None = None) -> QmpEvent:
        """First event ``name`` after mark ``since`` (default: now) matching ``predicate``.

        Pass the mark taken before the action (``event_mark()``, ``MceInjection.event_mark``)
        so an event that arrived before this call is still found.
        """
        start = self._recorder.mark() if since is None else since
        return self._recorder.wait(name, predicate, timeout, start)

    def trace_event_set_state(self, name: str, enable: bool) -> None:
        """Switch a QEMU trace event (e.g. ``kvm_memory_fault``) on or off at run time."""
        self.qmp("trace-event-set-state", name=name, enable=enable)

    # ----- serial console ---------------------------------------------------------------
    def _read_console(self) -> None:
        try:
            with self.console_log.open("rb") as fh:
                fh.seek(self._console_offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        if not chunk:
            return
        self._console_offset += len(chunk)
        # incremental: a multi-byte character split across reads is decoded once whole
        self._console_text += self._console_decoder.decode(chunk)

    def console_text(self) -> str:
        """Everything the guest wrote on the serial console so far."""
        self._read_console()
        return self._console_text

    def wait_console(self, pattern: str | re.Pattern[str], timeout: float = 30.0, *,
                     stuck_states: Collection[str] = (), silent_after_s: float | None = None) -> re.Match[str]:
        """Next match of ``pattern`` in the console after the previous wait_console match.

        Reads the console file incrementally. Fails early when QEMU exits, and, every
        ``_STATE_POLL_S``, when ``query-status`` reports one of ``stuck_states`` (a VM that
        stopped on "KVM internal error" is ``internal-error`` and prints nothing ever again:
        waiting out the deadline would only hide QEMU's reason, which the error then quotes).
        ``silent_after_s``: a console still empty that long after the call is a VM that runs but
        does not progress (seen: a nested guest under the lab host): :class:`MachineStuck` with
        state "silent", every vCPU's registers kept in ``silent-registers.txt``.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        started = time.monotonic()
        deadline = started + timeout
        next_state_poll = time.monotonic() + _STATE_POLL_S
        while True:
            self._read_console()
            match = regex.search(self._console_text, self._console_cursor)
            if match is not None:
                self._console_cursor = match.end()
                return match
            exited = not self.running()
            stuck = None
            if stuck_states and not exited and time.monotonic() >= next_state_poll:
                next_state_poll = time.monotonic() + _STATE_POLL_S
                state = self.status()
                stuck = state if state in stuck_states else None
            if (silent_after_s is not None and not exited and not self._console_text
                    and time.monotonic() - started > silent_after_s):
                evidence = self.workdir / "silent-registers.txt"
                try:
                    evidence.write_text(self.hmp("info registers -a"))
                except QemuError as exc:
                    evidence.write_text(f"<info registers failed: {exc}>\n")
                raise MachineStuck(
                    f"expected console pattern {regex.pattern!r} in {self.console_log}; the VM runs but its "
                    f"console stayed empty for {silent_after_s:.0f} s (every vCPU's registers: {evidence})",
                    state="silent")
            if exited or stuck or time.monotonic() > deadline:
                tail = self._console_text[-400:]
                if stuck:
                    raise MachineStuck(
                        f"expected console pattern {regex.pattern!r} in {self.console_log}; the VM "
                        f"stopped in state {stuck!r} (QEMU says: {self._stderr_head()!r}); console "
                        f"tail: {tail!r}", state=stuck)
                else:
                    why = "QEMU exited" if exited else f"not within {timeout:.1f} s"
                raise MachineStateError(
                    f"expected console pattern {regex.pattern!r} in {self.console_log}; "
                    f"{why}; console tail: {tail!r}")
            time.sleep(0.02)

    def stderr_mark(self) -> int:
        """The current end of QEMU's stderr log, for :meth:`stderr_since`."""
        if self._stderr_file is not None:
            self._stderr_file.flush()
        try:
            return self.stderr_log.stat().st_size
        except OSError:
            return 0

    def stderr_since(self, mark: int) -> str:
        """What QEMU wrote to stderr after ``mark`` (its trace lines, its MCE forwarding lines)."""
        return self._read_stderr(mark)

    def _read_stderr(self, start: int = 0) -> str:
        """QEMU's stderr log from byte ``start`` on (flushed first), or a sentence saying why not."""
        if self._stderr_file is not None:
            self._stderr_file.flush()
        try:
            with self.stderr_log.open("rb") as fh:
                fh.seek(start)
                return fh.read().decode(errors="replace")
        except OSError as exc:
            return f"<{self.stderr_log} unreadable: {exc}>"

    def _stderr_messages(self) -> str:
        """QEMU's stderr without its trace lines (``name args``: the memslot registrations of a
        KVM guest come first and would crowd out what QEMU says)."""
        return "".join(line for line in self._read_stderr().splitlines(keepends=True)
                       if not is_trace_line(line))

    def _stderr_tail(self, chars: int = 600) -> str:
        """The end of QEMU's stderr messages: its last words before it died."""
        return self._stderr_messages()[-chars:].strip()

    def _stderr_head(self, chars: int = 300) -> str:
        """The start of QEMU's stderr messages: where it says why it stopped (the register dump follows)."""
        return self._stderr_messages()[:chars].strip()

    def memslots(self) -> tuple[MemslotRegistration, ...]:
        """The memslots in force, from the ``kvm_set_user_memory`` lines of QEMU's stderr.

        Empty unless QEMU was started with ``memslots.MEMSLOT_TRACE_ARGS`` under KVM.
        """
        return live_memslots(parse_memslot_registrations(self._read_stderr()))

    # ----- memory and machine checks --------------------------------------------------------
    def ram_ranges(self) -> list[tuple[int, int, str]]:
        """(start, end inclusive, region) of guest RAM in the system address space."""
        text = self.hmp("info mtree -f")
        # FlatViews come out in hash-table order: pick the one of address space "memory".
        views = [v for v in re.split(r"^FlatView #\d+", text, flags=re.MULTILINE)
                 if re.search(r'^ AS "memory"', v, re.MULTILINE)]
        if len(views) != 1:
            raise MachineStateError(
                f"expected one FlatView for address space 'memory' in 'info mtree -f', "
                f"found {len(views)}: {text[:400]!r}")
        return [(int(m["start"], 16), int(m["end"], 16), m["name"])
                for m in _MTREE_RAM_RE.finditer(views[0])]

    def gpa2hva(self, gpa: int) -> int:
        """Host virtual address of a guest-physical address (HMP ``gpa2hva``)."""
        if gpa < 0:
            raise GpaOutOfRange(gpa, self.ram_ranges(), "gpa must be >= 0")
        try:
            text = self.hmp(f"gpa2hva {gpa:#x}")
        except HmpError as exc:
            raise GpaOutOfRange(gpa, self.ram_ranges(), exc.reply.strip()) from exc
        match = _GPA2HVA_RE.search(text)
        if match is None:
            raise MachineStateError(f"unexpected gpa2hva reply for {gpa:#x}: {text!r}")
        return int(match.group(3), 16)

    def read_physical(self, gpa: int, size: int) -> bytes:
        """``size`` bytes of guest-physical memory at ``gpa``, as QEMU itself reads them (``pmemsave``).

        This is QEMU's view, independent of the guest kernel: a test compares it with what the
        guest claims lives at a GPA before it trusts that GPA for an injection.
        """
        if size < 1 or size > 1 << 20:
            raise ValueError(f"size must be 1..{1 << 20} bytes, got {size}")
        if gpa < 0:
            raise GpaOutOfRange(gpa, self.ram_ranges(), "gpa must be >= 0")
        fd, name = tempfile.mkstemp(prefix="pmem-", suffix=".bin", dir=self.workdir)
        os.close(fd)
        dump = Path(name)
        try:
            self.qmp("pmemsave", val=gpa, size=size, filename=str(dump))
            data = dump.read_bytes()
        finally:
            dump.unlink(missing_ok=True)
        if len(data) != size:
            raise MachineStateError(f"pmemsave of {size} bytes at {gpa:#x} wrote {len(data)} bytes")
        return data

    def cpu_indexes(self) -> list[int]:
        """cpu-index of every vCPU (``query-cpus-fast``)."""
        return sorted(int(cpu["cpu-index"]) for cpu in self.qmp("query-cpus-fast"))

    def inject_mce(self, kind: str | MceKind, gpa: int, *, cpu: int = 0, bank: int = 9,
                   broadcast: bool = False) -> MceInjection:
        """Inject a machine check at ``gpa`` via HMP ``mce`` after validating every input.

        Validation happens before anything is sent: the kind, the bank (QEMU's x86 CPUs
        have ``MCE_BANKS`` = 10 banks), the cpu index (QEMU silently ignores unknown ones)
        and the gpa (must be in a RAM region and resolvable by ``gpa2hva``).
        The #MC lands wherever the vCPU happens to be; :meth:`inject_mce_at` checks first.
        Note: the MEMORY_FAILURE event that follows is not evidence of guest recovery.
        """
        mce = self._validated_mce(kind, gpa, bank, cpus=[cpu])
        return self._send_mce(mce, gpa, cpu, bank, broadcast)

    def vcpu_states(self) -> list[VcpuState]:
        """Every vCPU's RIP, CS, CPL and halt state (``info registers -a``); exact while stopped."""
        return parse_info_registers(self.hmp("info registers -a"))

    def inject_mce_at(self, kind: str | MceKind, gpa: int, pick: Callable[[VcpuState], bool], *, what: str,
                      bank: int = 9, broadcast: bool = False, tries: int = 200,
                      gap_s: float = 0.01) -> MceInjection:
        """Inject a machine check only where ``pick`` accepts a vCPU's state, on that vCPU.

        The VM is stopped, every vCPU's registers read; if one is accepted the ``mce`` is
        sent while the VM is still stopped, so the #MC interrupts exactly the state that was
        checked when the VM continues (measured under TCG: the guest's MCE record names the
        RIP read here). Otherwise the VM continues for ``gap_s`` and is stopped again, at
        most ``tries`` times; then :class:`LandingNotReached` names ``what`` and the positions
        seen. The VM runs again on return, also on error.
        """
        if tries < 1:
            raise ValueError(f"tries must be >= 1, got {tries}")
        if self.status() != "running":
            raise MachineStateError(f"machine {self.name} is {self.status()!r}; inject_mce_at needs a running VM")
        mce = self._validated_mce(kind, gpa, bank, cpus=self.cpu_indexes())
        seen: list[str] = []
        for attempt in range(1, tries + 1):
            self.qmp("stop")
            try:
                states = self.vcpu_states()
                chosen = next((state for state in states if pick(state)), None)
                if chosen is not None:
                    injection = self._send_mce(mce, gpa, chosen.cpu, bank, broadcast)
                    return replace(injection, landing=chosen, landing_tries=attempt, landing_skipped=tuple(seen))
                seen.append(", ".join(state.where() for state in states))
            finally:
                self.qmp("cont")
            time.sleep(gap_s)
        raise LandingNotReached(what, tries, seen)

    def _validated_mce(self, kind: str | MceKind, gpa: int, bank: int, *, cpus: Sequence[int]) -> MceKind:
        mce = kind if isinstance(kind, MceKind) else mce_kind(kind)
        if not 0 <= bank < MCE_BANKS:
            raise ValueError(f"MCE bank {bank} is invalid; the guest has {MCE_BANKS} banks "
                             f"(valid: 0..{MCE_BANKS - 1})")
        existing = self.cpu_indexes()
        for cpu in cpus:
            if cpu not in existing:
                raise ValueError(f"cpu index {cpu} does not exist; vCPU indexes: {existing}")
        ranges = self.ram_ranges()
        if not any(start <= gpa <= end for start, end, _ in ranges):
            raise GpaOutOfRange(gpa, ranges)
        self.gpa2hva(gpa)
        return mce

    def _send_mce(self, mce: MceKind, gpa: int, cpu: int, bank: int, broadcast: bool) -> MceInjection:
        command_line = mce_command_line(mce, gpa, cpu, bank, broadcast)
        mark = self.event_mark()
        t_before = time.monotonic()
        text = self.hmp(command_line)
        t_after = time.monotonic()
        _LOG.info("%s: injected %s at gpa %#x: %s", self.name, mce.name, gpa, command_line)
        injection = MceInjection(mce, gpa, cpu, bank, broadcast, command_line, text.strip(),
                                 t_before, t_after, mark)
        if injection.guest_reset:
            _LOG.warning("%s: QEMU reset the guest instead of delivering #MC: %s",
                         command_line, text.strip())
        return injection

    # ----- teardown ---------------------------------------------------------------------
    def shutdown(self, timeout: float = 10.0) -> int | None:
        """QMP ``quit``, then SIGTERM, then SIGKILL; always reaps and cleans. Idempotent.

        Returns QEMU's exit status (None if it never started).
        """
        process = self._process
        if process is not None and process.running() and self._qmp is not None:
            try:
                self._qmp.execute("quit", timeout=min(timeout, self.qmp_timeout))
            except Exception as exc:  # QEMU may already be gone or hung: escalate below
                _LOG.debug("QMP quit of %s: %r", self.name, exc)
            process.wait(timeout)
        returncode = process.stop(term_timeout=min(3.0, timeout)) if process else None
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._transcript is not None:
            self._transcript.write("shutdown", returncode=returncode)
            self._transcript.close()
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None
        if self._socket_path is not None:
            self._socket_path.unlink(missing_ok=True)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        return returncode

    def __enter__(self) -> QemuMachine:
        return self.launch()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()
