"""Host-side client of the in-guest probe (``gmem-probe``), spoken over an SSH channel.

The probe's replies are evidence, so the client keeps a transcript of every command it sent
and every line it received, with host timestamps, and can write it as JSONL next to the
other evidence of a test.  Lines it does not understand (a kernel message on the terminal, a
half-written line cut by a signal) are kept in the transcript and quoted in errors, never
silently dropped and never fatal by themselves.

A ``sigbus`` event is the reply to the command named in its ``during`` field (the probe
abandons that command); one that arrives while the probe is idle, or during another command
(an action-optional early kill), is queued and handed out by :meth:`ProbeClient.wait_sigbus`.
See docs/architecture.md, "Probe protocol".
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Protocol, Self

from guests.errors import GuestError
from polling import poll_until

__all__ = [
    "MAP_KINDS",
    "PAGE_4K",
    "ByteChannel",
    "FlagsReport",
    "KillResult",
    "LocateResult",
    "LockResult",
    "Mapping",
    "PageCheck",
    "PageInfo",
    "PoisonedFrame",
    "ProbeAbortedError",
    "ProbeClient",
    "ProbeCommandError",
    "ProbeError",
    "ProbeExitedError",
    "ProbeTimeoutError",
    "SigbusReport",
    "SpinResult",
    "TouchResult",
    "UnexpectedSigbusError",
    "WaitResult",
    "fill_byte",
    "fill_page",
    "pattern_byte",
]

LOG = logging.getLogger(__name__)

MapKind = Literal["anon4k", "thp", "hugetlb2m", "memfd4k"]
MAP_KINDS: Final[tuple[str, ...]] = ("anon4k", "thp", "hugetlb2m", "memfd4k")
KILL_MODES: Final[tuple[str, ...]] = ("early", "late")
RECENT_LINES = 12
# How often an abort condition is polled while a reply is awaited.
ABORT_POLL_S: Final = 0.2


PAGE_4K: Final = 4096


def pattern_byte(mapping_id: int, offset: int) -> int:
    """The byte the probe writes at ``offset`` of mapping ``mapping_id`` (see gmem_probe.c)."""
    return (mapping_id * 17 + offset % 251) & 0xFF


def fill_byte(seed: int, index: int) -> int:
    """The byte ``fill`` writes at ``index`` of a 4 KiB page for ``seed`` (see gmem_probe.c)."""
    return (seed ^ (index * 7 + (index >> 8))) & 0xFF


def fill_page(seed: int) -> bytes:
    """The whole 4 KiB page ``fill`` writes for ``seed``: what a host must (not) see at the gpa."""
    return bytes(fill_byte(seed, i) for i in range(PAGE_4K))


class ByteChannel(Protocol):
    """The part of ``paramiko.Channel`` the client needs."""

    def sendall(self, data: bytes, /) -> None: ...

    def recv(self, nbytes: int, /) -> bytes: ...

    def recv_ready(self) -> bool: ...

    def settimeout(self, timeout: float | None, /) -> None: ...

    def close(self) -> None: ...


class ProbeError(GuestError):
    """Base of the client's errors; ``recent`` holds the last lines received."""

    def __init__(self, message: str, recent: list[str] | None = None) -> None:
        lines = recent or []
        if lines:
            message += "\nlast lines from the probe:\n  " + "\n  ".join(lines)
        else:
            message += "\n(no lines received from the probe yet)"
        super().__init__(message)
        self.recent = lines


class ProbeTimeoutError(ProbeError):
    """The expected reply did not arrive in time."""


class ProbeAbortedError(ProbeError):
    """The caller's abort condition (say, a guest panic) ended the wait for a reply."""


class ProbeExitedError(ProbeError):
    """The probe's output ended (it exited or the channel closed)."""


class ProbeCommandError(ProbeError):
    """The probe answered a command with an ``error`` event."""

    def __init__(self, message: str, recent: list[str], probe_message: str) -> None:
        super().__init__(message, recent)
        self.probe_message = probe_message


class UnexpectedSigbusError(ProbeError):
    """A SIGBUS aborted a command whose only valid outcome is its normal reply."""

    def __init__(self, message: str, recent: list[str], report: SigbusReport) -> None:
        super().__init__(message, recent)
        self.report = report


@dataclass(frozen=True)
class PageInfo:
    """One page of a mapping (``page_size`` of the mapping) as the probe saw it."""

    va: int
    pfn: int
    gpa: int
    flags: int | None
    hwpoison: bool | None = None


@dataclass(frozen=True)
class Mapping:
    """A region the probe mapped and populated."""

    id: int
    kind: str
    va: int
    size: int
    page_size: int
    npages: int
    pages: tuple[PageInfo, ...]
    thp: bool | None = None
    fd: int | None = None

    def va_at(self, offset: int) -> int:
        self._check(offset)
        return self.va + offset

    def expected_value(self, offset: int) -> int:
        """What a touch at ``offset`` must read back while the page is healthy."""
        self._check(offset)
        return pattern_byte(self.id, offset)

    def _check(self, offset: int) -> None:
        if not 0 <= offset < self.size:
            raise ValueError(f"offset {offset} outside mapping {self.id} (valid 0..{self.size - 1})")


@dataclass(frozen=True)
class TouchResult:
    id: int
    offset: int
    va: int
    value: int


@dataclass(frozen=True)
class PhysRead:
    """One byte the guest kernel loaded at a guest-physical address (``readphys``, via /proc/kcore)."""

    gpa: int
    va: int  # the direct-map address the kernel read it at
    value: int


@dataclass(frozen=True)
class LocateResult:
    """Where one byte of a mapping lives now (pagemap re-read at the time of the command)."""

    id: int
    offset: int
    va: int
    present: bool
    pfn: int
    gpa: int
    flags: int | None


@dataclass(frozen=True)
class LockResult:
    """``lock``: the mapping is mlocked; ``moved`` of its 4 KiB pages had another frame than when mapped."""

    id: int
    pages: int
    moved: int


@dataclass(frozen=True)
class PageCheck:
    """``check``: one 4 KiB page read back and compared with ``fill``'s bytes for ``seed``."""

    id: int
    offset: int  # of the page in the mapping
    seed: int
    matches: int  # bytes that hold fill_byte(seed, i)
    zeros: int
    first: int  # the page's first 8 bytes, little endian

    @property
    def holds_fill(self) -> bool:
        return self.matches == PAGE_4K

    @property
    def all_zero(self) -> bool:
        return self.zeros == PAGE_4K

    def describe(self) -> str:
        if self.holds_fill:
            return f"the fill of seed {self.seed}"
        if self.all_zero:
            return "zeros"
        return (f"{self.matches} of {PAGE_4K} bytes of seed {self.seed}'s fill, {self.zeros} zero bytes, "
                f"first bytes {self.first.to_bytes(8, 'little').hex()}")


@dataclass(frozen=True)
class PoisonedFrame:
    offset: int
    pfn: int
    gpa: int


@dataclass(frozen=True)
class FlagsReport:
    id: int
    pages: tuple[PageInfo, ...]
    hwpoison_frames: tuple[PoisonedFrame, ...]


@dataclass(frozen=True)
class SpinResult:
    seconds: int
    iterations: int


@dataclass(frozen=True)
class WaitResult:
    seconds: int


@dataclass(frozen=True)
class KillResult:
    mode: str
    prctl_get: int


@dataclass(frozen=True)
class SigbusReport:
    """One SIGBUS as the probe's handler recorded it, plus when the host read it."""

    si_signo: int
    si_code: int
    si_addr: int
    si_addr_lsb: int
    during: str
    seq: int
    t_mono_ns: int
    host_time: float
    host_monotonic: float


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"field {key!r} must be an integer, got {value!r}")
    return value


def _opt_int(obj: dict[str, Any], key: str) -> int | None:
    return None if obj.get(key) is None else _int(obj, key)


def _page(obj: dict[str, Any]) -> PageInfo:
    hw = obj.get("hwpoison")
    return PageInfo(va=_int(obj, "va"), pfn=_int(obj, "pfn"), gpa=_int(obj, "gpa"),
                    flags=_opt_int(obj, "flags"), hwpoison=None if hw is None else bool(hw))


class ProbeClient:
    """Drives one running probe.  Construct it on the channel of ``gmem-probe`` (it waits
    for the probe's ``ready`` line)."""

    def __init__(self, channel: ByteChannel, *, timeout: float = 30.0,
                 ready_timeout: float = 20.0, abort: Callable[[], str | None] | None = None) -> None:
        """``abort`` is polled while a reply is awaited; a sentence from it (e.g. "the guest
        panicked") ends the wait at once with :class:`ProbeAbortedError` instead of a timeout."""
        self._channel = channel
        self._abort = abort
        self.timeout = timeout
        self._buf = b""
        self._eof = False
        self._closed = False
        self._recent: deque[str] = deque(maxlen=RECENT_LINES)
        self._pending_sigbus: deque[SigbusReport] = deque()
        self._outstanding: str | None = None
        self.transcript: list[dict[str, Any]] = []
        self.sigbus_reports: list[SigbusReport] = []
        ready = self._read_reply("(start-up)", ("ready",), ready_timeout)
        self.pid = _int(ready, "pid")
        self.page_size = _int(ready, "page_size")
        self.has_kpageflags = bool(ready.get("kpageflags", False))

    # -- public commands -------------------------------------------------------------

    def map(self, kind: MapKind | str, npages: int) -> Mapping:
        if kind not in MAP_KINDS:
            raise ValueError(f"unknown map kind {kind!r}; valid: {', '.join(MAP_KINDS)}")
        obj = self._command(f"map {kind} {int(npages)}", ("mapped",))
        pages = tuple(_page(p) for p in obj.get("pages", []))
        thp = obj.get("thp")
        return Mapping(id=_int(obj, "id"), kind=str(obj.get("kind")), va=_int(obj, "va"),
                       size=_int(obj, "size"), page_size=_int(obj, "page_size"),
                       npages=_int(obj, "npages"), pages=pages,
                       thp=None if thp is None else bool(thp), fd=_opt_int(obj, "fd"))

    def touch(self, mapping_id: int, offset: int) -> TouchResult | SigbusReport:
        reply = self._command(f"touch {int(mapping_id)} {int(offset)}", ("touched",),
                              sigbus_ok=True)
        if isinstance(reply, SigbusReport):
            return reply
        return TouchResult(id=_int(reply, "id"), offset=_int(reply, "offset"),
                           va=_int(reply, "va"), value=_int(reply, "value"))

    def locate(self, mapping_id: int, offset: int) -> LocateResult:
        obj = self._command(f"locate {int(mapping_id)} {int(offset)}", ("located",))
        return LocateResult(id=_int(obj, "id"), offset=_int(obj, "offset"), va=_int(obj, "va"),
                            present=bool(obj.get("present")), pfn=_int(obj, "pfn"),
                            gpa=_int(obj, "gpa"), flags=_opt_int(obj, "flags"))

    def readphys(self, gpa: int) -> PhysRead | SigbusReport:
        """Have the guest kernel load the byte at ``gpa`` (through /proc/kcore's direct map)."""
        obj = self._command(f"readphys {int(gpa):#x}", ("physread",), sigbus_ok=True)
        if isinstance(obj, SigbusReport):
            return obj
        return PhysRead(gpa=_int(obj, "gpa"), va=_int(obj, "va"), value=_int(obj, "value"))

    def flags(self, mapping_id: int) -> FlagsReport:
        obj = self._command(f"flags {int(mapping_id)}", ("flags",))
        frames = tuple(PoisonedFrame(offset=_int(f, "offset"), pfn=_int(f, "pfn"),
                                     gpa=_int(f, "gpa"))
                       for f in obj.get("hwpoison_frames", []))
        return FlagsReport(id=_int(obj, "id"), pages=tuple(_page(p) for p in obj.get("pages", [])),
                           hwpoison_frames=frames)

    def lock(self, mapping_id: int) -> LockResult:
        """mlock the mapping, so its guest-physical pages stay put while the host converts them."""
        obj = self._command(f"lock {int(mapping_id)}", ("locked",))
        return LockResult(id=_int(obj, "id"), pages=_int(obj, "pages"), moved=_int(obj, "moved"))

    def fill(self, mapping_id: int, offset: int, seed: int) -> None:
        """Write :func:`fill_byte` of ``seed`` (1-255) over the 4 KiB page that holds ``offset``."""
        self._command(f"fill {int(mapping_id)} {int(offset)} {int(seed)}", ("filled",))

    def check(self, mapping_id: int, offset: int, seed: int) -> PageCheck | SigbusReport:
        """Read the 4 KiB page that holds ``offset`` back and compare it with ``seed``'s fill."""
        obj = self._command(f"check {int(mapping_id)} {int(offset)} {int(seed)}", ("checked",), sigbus_ok=True)
        if isinstance(obj, SigbusReport):
            return obj
        return PageCheck(id=_int(obj, "id"), offset=_int(obj, "offset"), seed=_int(obj, "seed"),
                         matches=_int(obj, "matches"), zeros=_int(obj, "zeros"), first=_int(obj, "first"))

    def set_kill(self, mode: Literal["early", "late"] | str) -> KillResult:
        if mode not in KILL_MODES:
            raise ValueError(f"unknown kill mode {mode!r}; valid: {', '.join(KILL_MODES)}")
        obj = self._command(f"kill {mode}", ("kill",))
        return KillResult(mode=str(obj.get("mode")), prctl_get=_int(obj, "prctl_get"))

    def spin(self, seconds: int, timeout: float | None = None) -> SpinResult | SigbusReport:
        self.begin_spin(seconds)
        return self.finish_spin(timeout if timeout is not None else seconds + self.timeout)

    def wait(self, seconds: int, timeout: float | None = None) -> WaitResult | SigbusReport:
        self.begin_wait(seconds)
        return self.finish_wait(timeout if timeout is not None else seconds + self.timeout)

    # Split forms: the host injects while the probe spins or waits.

    def begin_spin(self, seconds: int) -> None:
        self._send(f"spin {int(seconds)}", "spin")

    def finish_spin(self, timeout: float) -> SpinResult | SigbusReport:
        reply = self._finish("spin", ("spun",), timeout)
        if isinstance(reply, SigbusReport):
            return reply
        return SpinResult(seconds=_int(reply, "seconds"), iterations=_int(reply, "iterations"))

    def begin_wait(self, seconds: int) -> None:
        self._send(f"wait {int(seconds)}", "wait")

    def finish_wait(self, timeout: float) -> WaitResult | SigbusReport:
        reply = self._finish("wait", ("waited",), timeout)
        if isinstance(reply, SigbusReport):
            return reply
        return WaitResult(seconds=_int(reply, "seconds"))

    def wait_sigbus(self, timeout: float) -> SigbusReport:
        """Return the next SIGBUS not yet handed out (queued or arriving within ``timeout``).

        Use it after :meth:`begin_wait`/:meth:`begin_spin` to catch an asynchronous
        (action-optional) signal; if the outstanding command ends normally first, that is
        a :class:`ProbeTimeoutError` saying so.
        """
        if self._pending_sigbus:
            return self._pending_sigbus.popleft()
        deadline = time.monotonic() + timeout
        while True:
            obj = self._next_event(deadline, "a 'sigbus' event")
            event = obj.get("event")
            if event == "sigbus":
                report = self._sigbus(obj)
                self._pending_sigbus.pop()  # handed out here, so never again by pending_sigbus()
                if report.during == self._outstanding:
                    self._outstanding = None
                return report
            if event == "error":
                self._raise_error(obj, self._outstanding or "(none)")
            if self._outstanding is not None and event in ("waited", "spun"):
                self._outstanding = None
                raise ProbeTimeoutError(
                    f"expected a 'sigbus' event, but the probe finished its command normally: "
                    f"{json.dumps(obj)}", list(self._recent))
            LOG.warning("ignoring unexpected probe event while waiting for a sigbus: %s", obj)

    def pending_sigbus(self) -> list[SigbusReport]:
        """SIGBUS reports received but not yet handed out (removes them from the queue)."""
        reports = list(self._pending_sigbus)
        self._pending_sigbus.clear()
        return reports

    def has_output(self) -> bool:
        """Whether the probe has written something not read yet (nothing is read here)."""
        return bool(self._buf) or self._channel.recv_ready()

    def abandon(self) -> None:
        """Close the channel without asking the probe to quit: nobody is left to answer (a panicked guest)."""
        self._closed = True
        self._channel.close()

    def close(self, timeout: float = 5.0) -> None:
        """Ask the probe to quit (best effort) and close the channel."""
        if self._closed:
            return
        self._closed = True
        said_bye = False
        try:
            if not self._eof and self._outstanding is None:
                self._send("quit", "quit")
                self._finish("quit", ("bye",), timeout)
                said_bye = True
        except ProbeError as exc:
            LOG.warning("probe did not quit cleanly: %s", exc)
        except OSError as exc:
            LOG.warning("probe channel failed while quitting: %r", exc)
        finally:
            # After 'bye' the probe exits and the server closes the channel itself; closing from
            # our side at that moment trips a dropbear assertion that drops the whole connection
            # (see guests.ssh._await_server_close).
            if said_bye:
                poll_until(lambda: getattr(self._channel, "closed", True), timeout=min(timeout, 2.0), interval=0.002)
            self._channel.close()

    def write_transcript(self, path: Path) -> Path:
        """Write every sent command and received line, with host timestamps, as JSONL."""
        with path.open("w", encoding="utf-8") as fh:
            for entry in self.transcript:
                fh.write(json.dumps(entry) + "\n")
        return path

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------

    def _record(self, direction: str, line: str, parsed: bool) -> None:
        self.transcript.append({"t_wall": time.time(), "t_mono": time.monotonic(),
                                "dir": direction, "line": line, "json": parsed})

    def _send(self, command: str, verb: str) -> None:
        if self._outstanding is not None:
            raise ProbeError(f"cannot send {command!r}: the reply to {self._outstanding!r} "
                             "has not been read yet", list(self._recent))
        if self._eof:
            raise ProbeExitedError(f"cannot send {command!r}: the probe's output has ended",
                                   list(self._recent))
        self._record("send", command, False)
        LOG.debug("probe <- %s", command)
        try:
            self._channel.sendall(command.encode("ascii") + b"\n")
        except OSError as exc:  # paramiko raises OSError("Socket is closed") on a dead channel
            raise ProbeExitedError(f"cannot send {command!r}: the channel failed: {exc}",
                                   list(self._recent)) from exc
        self._outstanding = verb

    def _command(self, command: str, expected: tuple[str, ...], *, sigbus_ok: bool = False,
                 ) -> Any:
        verb = command.split(" ", 1)[0]
        self._send(command, verb)
        reply = self._finish(verb, expected, self.timeout)
        if isinstance(reply, SigbusReport) and not sigbus_ok:
            raise UnexpectedSigbusError(
                f"command {command!r} expected {'/'.join(expected)}, but a SIGBUS aborted it: "
                f"{reply}", list(self._recent), reply)
        return reply

    def _finish(self, verb: str, expected: tuple[str, ...], timeout: float,
                ) -> dict[str, Any] | SigbusReport:
        if self._outstanding != verb:
            raise ProbeError(f"no {verb!r} command is outstanding "
                             f"(outstanding: {self._outstanding!r})", list(self._recent))
        try:
            return self._read_reply(verb, expected, timeout)
        finally:
            self._outstanding = None

    def _read_reply(self, verb: str, expected: tuple[str, ...], timeout: float,
                    ) -> dict[str, Any] | Any:
        deadline = time.monotonic() + timeout
        what = f"{' or '.join(repr(e) for e in expected)} (or 'sigbus') in reply to {verb!r}"
        while True:
            obj = self._next_event(deadline, what)
            event = obj.get("event")
            if event in expected:
                return obj
            if event == "sigbus":
                report = self._sigbus(obj)
                if report.during == verb:
                    # The handler abandoned this command: the signal is its reply.
                    self._pending_sigbus.pop()
                    return report
                continue
            if event == "error":
                self._raise_error(obj, verb)
            if event == "bye":
                self._eof = True
                raise ProbeExitedError(f"expected {what}, but the probe said bye: {obj}",
                                       list(self._recent))
            LOG.warning("ignoring unexpected probe event while waiting for %s: %s", what, obj)

    def _raise_error(self, obj: dict[str, Any], verb: str) -> None:
        message = str(obj.get("message"))
        raise ProbeCommandError(
            f"probe rejected {verb!r} (input {obj.get('input')!r}): {message}",
            list(self._recent), message)

    def _sigbus(self, obj: dict[str, Any]) -> SigbusReport:
        report = SigbusReport(
            si_signo=_int(obj, "si_signo"), si_code=_int(obj, "si_code"),
            si_addr=_int(obj, "si_addr"), si_addr_lsb=_int(obj, "si_addr_lsb"),
            during=str(obj.get("during")), seq=_int(obj, "seq"), t_mono_ns=_int(obj, "t_mono_ns"),
            host_time=self.transcript[-1]["t_wall"], host_monotonic=self.transcript[-1]["t_mono"])
        self.sigbus_reports.append(report)
        self._pending_sigbus.append(report)
        LOG.info("probe SIGBUS: code %d addr %#x lsb %d during %s", report.si_code,
                 report.si_addr, report.si_addr_lsb, report.during)
        return report

    def _next_event(self, deadline: float, what: str) -> dict[str, Any]:
        """Next JSON object with an ``event`` key; other lines are recorded and skipped."""
        while True:
            line = self._next_line(deadline, what)
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and isinstance(obj.get("event"), str):
                self._record("recv", line, True)
                LOG.debug("probe -> %s", line)
                return obj
            self._record("recv", line, False)
            LOG.debug("probe -> (not an event) %r", line)

    def _next_line(self, deadline: float, what: str) -> str:
        while b"\n" not in self._buf:
            if self._eof:
                tail = self._buf.decode("utf-8", errors="replace")
                self._buf = b""
                if tail:
                    self._recent.append(tail)
                    self._record("recv", tail, False)
                raise ProbeExitedError(f"expected {what}, but the probe's output ended",
                                       list(self._recent))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProbeTimeoutError(f"expected {what} within the timeout, got nothing more",
                                        list(self._recent))
            if self._abort is not None:
                why = self._abort()
                if why is not None:
                    raise ProbeAbortedError(f"expected {what}, but gave up waiting: {why}",
                                            list(self._recent))
                remaining = min(remaining, ABORT_POLL_S)
            self._channel.settimeout(remaining)
            try:
                chunk = self._channel.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise ProbeExitedError(f"expected {what}, but the channel failed: {exc}",
                                       list(self._recent)) from exc
            if not chunk:
                self._eof = True
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\n", 1)
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        self._recent.append(line)
        return line
