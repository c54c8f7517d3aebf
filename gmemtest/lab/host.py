"""Run commands on the lab host in a box: an L1 KVM host under TCG (FACTS section 5).

Userland: L1 has none of its own. Its init chroots into this machine's root, shared
read-only over 9p, so a command in L1 finds the same QEMU, venv, checkout (at the same
absolute path) and image cache as on the host, with nothing to download or keep in
step. Only /tmp, /run, /dev, /proc, /sys are L1's own (tmpfs or kernel file systems);
results go to a writable 9p share at ``$GMEMTEST_RESULTS`` (/run/gmemtest/results).

Channels, each with one job:

- ttyS0 (``console.log``): kernel messages and the READY / FAILED marker of init;
- hvc0, a virtio console (``output.log``): only the command's stdout+stderr, raw, then an exit marker
  ``\\x1eGMEMTEST-LABHOST-EXIT <nonce> <rc>\\n`` (ASCII RS, not a newline, so a line the command
  ends with is shown at once rather than held as a possible marker start); the per-job nonce means no output of the
  command can fake it. The runner tails this file to stream output while it runs;
- the ``ctl`` 9p share (``ctl/``): the runner renames ``job-<n>.sh`` in (the argv,
  quoted by :func:`shlex.quote`, and the cwd); ``halt`` asks init to power off.

So one boot serves any number of :meth:`LabhostRun.run` calls, each waited for with
its own deadline, and teardown is always QEMU's (``QemuMachine``: QMP quit, then kill,
PDEATHSIG when the runner itself dies).
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import secrets
import shlex
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gmemtest.errors import GmemtestError
from guests.profiles import GuestProfile, get_profile
from images.labhost import LabhostImage
from qmp_helpers import DEFAULT_QEMU, MachineStateError, QemuMachine, opt_escape

__all__ = [
    "DEFAULT_PROFILE",
    "EXIT_FRAME",
    "EXIT_MARKER",
    "READY_MARKER",
    "STATE_RE",
    "LabhostDied",
    "LabhostError",
    "LabhostFrozen",
    "LabhostResult",
    "LabhostRun",
    "LabhostTimeout",
    "LabhostTimings",
    "booted_labhost",
    "copy_evidence",
    "fresh_ctl",
    "job_script",
    "labhost_qemu_args",
    "run_in_labhost",
]

LOG = logging.getLogger(__name__)

DEFAULT_PROFILE = "labhost-svm"
READY_MARKER = "GMEMTEST-LABHOST-READY"
FAILED_MARKER = "GMEMTEST-LABHOST-FAILED"
EXIT_MARKER = "GMEMTEST-LABHOST-EXIT"
# Starts the exit marker on hvc0: a byte commands hardly print, so nothing useful is held back.
EXIT_FRAME = "\x1e"
RESULTS_IN_L1 = "/run/gmemtest/results"
STATE_RE = re.compile(rf"({READY_MARKER}|{FAILED_MARKER})([^\r\n]*)\r?\n")
_UPTIME_RE = re.compile(r"uptime=([0-9.]+)")
_POLL_S = 0.02
# L1 writes its heartbeat every 2 s; this long without one while QEMU runs is a freeze (a
# busy L1 under TCG still beats: its two vCPUs are never both starved for seconds).
FREEZE_AFTER_S = 20.0
HEARTBEAT = "heartbeat"
_TAIL_CHARS = 2000


class LabhostError(GmemtestError, RuntimeError):
    """L1 failed (did not come up, died, or broke the protocol); the message has its tails."""


class LabhostTimeout(LabhostError, TimeoutError):
    """A step of L1 (boot to READY, a command, power-off) missed its deadline."""


class LabhostNotReady(LabhostTimeout):
    """L1 never reached READY: its QEMU runs, its console stayed quiet (``loglevel=4``) past the boot
    deadline. A failure of the nested stack under TCG, not of anything under test (seen once in about
    forty boots, CI, with the machine otherwise idle); callers retry it once."""


class LabhostDied(LabhostError):
    """L1's QEMU exited while a command ran: with ``-no-reboot`` and ``panic=-1`` that is an L1
    kernel panic (its oops is at the end of the console tail in the message)."""


class LabhostFrozen(LabhostError):
    """L1's heartbeat stopped while its QEMU runs: L1 froze. ``evidence`` names the file with
    QEMU's view of every vCPU (``info registers -a``, ``query-cpus-fast``, run state)."""

    def __init__(self, message: str, evidence: Path) -> None:
        super().__init__(message)
        self.evidence = evidence


# Failures of the nested stack under TCG, not of what runs in L1: retried once in a fresh L1 by the
# shared run and the batches (seen: an L1 freeze about once in 20 chain runs; an L1 oops, a stack
# overflow of recursive page faults in the exception entry while a vCPU thread ran KVM_RUN, about
# once in ten L1 runs that start L2 guests; an L1 silent past its boot deadline, once).
L1_FAILURES: tuple[type[LabhostError], ...] = (LabhostFrozen, LabhostDied, LabhostNotReady)


def l1_attempt_name(exc: BaseException) -> str:
    """Where a frozen, dead or never-ready L1's evidence is kept before the retry."""
    kind = "frozen" if isinstance(exc, LabhostFrozen) else "not-ready" if isinstance(exc, LabhostNotReady) else "died"
    return f"{kind}-attempt-1"


@dataclass
class LabhostTimings:
    """Seconds from ``launch()``; ``ready_s`` is launch to /dev/kvm usable (READY marker)."""

    qmp_s: float = 0.0
    ready_s: float = 0.0
    guest_uptime_at_ready_s: float | None = None
    commands_s: list[float] = field(default_factory=list)
    poweroff_s: float | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LabhostResult:
    """One command's outcome: its exit status and its output (stdout and stderr merged)."""

    argv: tuple[str, ...]
    returncode: int
    output: str
    seconds: float


def job_script(argv: Sequence[str], cwd: Path, nonce: str,
               env: Mapping[str, str] | None = None) -> str:
    """The ``sh`` script init runs: every word quoted, so no argv can change its meaning."""
    if not argv:
        raise ValueError("labhost command is empty; pass the program and its arguments")
    if not re.fullmatch(r"[0-9a-f]{8,64}", nonce):
        raise ValueError(f"nonce {nonce!r} must be 8-64 lower-case hex digits")
    lines = [f"# gmemtest-job {nonce}"]
    for name, value in sorted((env or {}).items()):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"environment variable name {name!r} is not a shell name "
                             "(letters, digits, '_', not starting with a digit)")
        lines.append(f"export {name}={shlex.quote(value)}")
    quoted_cwd = shlex.quote(str(cwd))
    lines.append(f"cd -- {quoted_cwd} || {{ echo \"labhost: cannot cd to \"{quoted_cwd} >&2; exit 125; }}")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


class _ExitScanner:
    """Splits hvc0 text into the command's output and its exit marker.

    Text that could be the start of the marker is held back, so a streamed chunk never
    shows part of a marker and the output comes back byte-exact.
    """

    def __init__(self, nonce: str) -> None:
        self._marker = f"{EXIT_FRAME}{EXIT_MARKER} {nonce} "
        self._marker_re = re.compile(re.escape(self._marker) + r"(\d+)\n")
        self._held = ""

    def feed(self, text: str) -> tuple[str, int | None]:
        """(output now safe to show, exit status once the marker is complete)."""
        buf = self._held + text
        match = self._marker_re.search(buf)
        if match is not None:
            self._held = ""
            return buf[:match.start()], int(match.group(1))
        keep = 0
        for n in range(min(len(buf), len(self._marker) + 4), 0, -1):
            tail = buf[-n:]
            if self._marker.startswith(tail) or (tail.startswith(self._marker)
                                                 and tail[len(self._marker):].isdigit()):
                keep = n
                break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], None


def _tail(text: str, n: int = _TAIL_CHARS) -> str:
    return text[-n:] if len(text) > n else text


class LabhostRun:
    """A booted L1 ready for commands; made by :func:`booted_labhost`."""

    def __init__(self, machine: QemuMachine, image: LabhostImage, *, workdir: Path, share_dir: Path,
                 ctl_dir: Path, output_log: Path, profile: GuestProfile, cwd: Path,
                 timings: LabhostTimings, ready_line: str, freeze_after_s: float = FREEZE_AFTER_S) -> None:
        self.machine = machine
        self.freeze_after_s = freeze_after_s
        self.image = image
        self.workdir = workdir
        self.share_dir = share_dir
        self.ctl_dir = ctl_dir
        self.output_log = output_log
        self.profile = profile
        self.cwd = cwd
        self.timings = timings
        self.ready_line = ready_line
        self._jobs = 0
        self._offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._broken: str | None = None

    def _read_output(self) -> str:
        try:
            with self.output_log.open("rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return ""
        self._offset += len(chunk)
        return self._decoder.decode(chunk)

    def _failure(self, cls: type[LabhostError], what: str, output: str) -> LabhostError:
        console = self.machine.console_text()
        return cls(f"{what}\n--- command output tail ({self.output_log}) ---\n{_tail(output)}\n"
                   f"--- L1 console tail ({self.machine.console_log}) ---\n{_tail(console)}")

    def run(self, argv: Sequence[str], timeout: float = 600.0, *,
            on_output: Callable[[str], None] | None = None, cwd: Path | None = None,
            env: Mapping[str, str] | None = None) -> LabhostResult:
        """Run ``argv`` in L1's chroot; its exit status and output, streamed to ``on_output``.

        A command that fails is a result, not an error. A command that outlives
        ``timeout`` raises :class:`LabhostTimeout` and leaves this L1 unusable (the
        command may still run): the context manager then kills QEMU. Every command learns
        this host's cache (``HOST_CACHE_ENV``), which L1 sees read-only at the same path:
        the project's QEMU built here is found there (``--qemu project``, preflight).
        """
        from images.build import default_cache_root
        from images.qemu_build import HOST_CACHE_ENV

        env = {HOST_CACHE_ENV: str(default_cache_root().absolute()), **(env or {})}
        if self._broken is not None:
            raise LabhostError(f"this L1 cannot run more commands: {self._broken}")
        self._jobs += 1
        nonce = secrets.token_hex(8)
        script = job_script(argv, cwd if cwd is not None else self.cwd, nonce, env)
        name = f"job-{self._jobs}.sh"
        tmp = self.ctl_dir / f".{name}.tmp"
        tmp.write_text(script)
        scanner = _ExitScanner(nonce)
        parts: list[str] = []
        started = time.monotonic()
        beat, beat_seen = self._heartbeat(), started
        os.replace(tmp, self.ctl_dir / name)  # init sees the job whole or not at all
        LOG.info("labhost job %d: %s", self._jobs, shlex.join(argv))
        while True:
            shown, rc = scanner.feed(self._read_output())
            if shown:
                parts.append(shown)
                if on_output is not None:
                    on_output(shown)
            if rc is not None:
                seconds = time.monotonic() - started
                self.timings.commands_s.append(round(seconds, 3))
                return LabhostResult(tuple(argv), rc, "".join(parts), seconds)
            if not self.machine.running():
                self._broken = "QEMU exited during a command"
                raise self._failure(LabhostDied, f"L1 exited while running {shlex.join(argv)!r} "
                                    f"(see {self.machine.stderr_log})", "".join(parts))
            now = self._heartbeat()
            if now != beat:
                beat, beat_seen = now, time.monotonic()
            elif time.monotonic() - beat_seen > self.freeze_after_s:
                self._broken = f"L1 froze (no heartbeat for {self.freeze_after_s:.0f} s)"
                evidence = self._freeze_evidence()
                raise LabhostFrozen(str(self._failure(
                    LabhostError, f"L1 froze while running {shlex.join(argv)!r}: its heartbeat stopped at "
                    f"uptime {beat or '?'} s, {time.monotonic() - beat_seen:.0f} s ago; QEMU's view of "
                    f"every vCPU is in {evidence}", "".join(parts))), evidence)
            if time.monotonic() - started > timeout:
                self._broken = f"command timed out after {timeout:.1f} s"
                raise self._failure(LabhostTimeout, f"command {shlex.join(argv)!r} did not exit "
                                    f"within {timeout:.1f} s in L1", "".join(parts))
            time.sleep(_POLL_S)

    def _heartbeat(self) -> str | None:
        try:
            return (self.ctl_dir / HEARTBEAT).read_text().strip()
        except OSError:
            return None

    def _registers_later(self, delay_s: float = 2.0) -> str:
        time.sleep(delay_s)
        return self.machine.hmp("info registers -a")

    def _freeze_evidence(self) -> Path:
        """What QEMU says of a frozen L1: run state, every vCPU's registers (HLT, RIP, RFLAGS.IF),
        twice, 2 s apart: a vCPU whose RIP moved is running (a livelock), one that did not is stuck."""
        path = self.workdir / "frozen.txt"
        parts = []
        asks: tuple[tuple[str, Callable[[], str]], ...] = (
            ("query-status", lambda: str(self.machine.qmp("query-status"))),
            ("query-cpus-fast", lambda: str(self.machine.qmp("query-cpus-fast"))),
            ("info registers -a", lambda: self.machine.hmp("info registers -a")),
            ("info registers -a, 2 s later", self._registers_later))
        for label, ask in asks:
            try:
                parts.append(f"== {label}\n{ask()}\n")
            except Exception as exc:  # evidence of a broken VM is gathered best-effort
                parts.append(f"== {label}\n<failed: {type(exc).__name__}: {exc}>\n")
        path.write_text("".join(parts))
        return path

    def power_off(self, timeout: float = 30.0) -> bool:
        """Ask init to power off and wait for QEMU to exit; False if it did not in time."""
        if not self.machine.running():
            return True
        t0 = time.monotonic()
        (self.ctl_dir / "halt").write_text("")
        deadline = t0 + timeout
        while self.machine.running() and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        if self.machine.running():
            LOG.warning("L1 did not power off within %.1f s; QEMU will be killed", timeout)
            return False
        self.timings.poweroff_s = round(time.monotonic() - t0, 3)
        return True


def labhost_qemu_args(profile: GuestProfile, image: LabhostImage, *, share_dir: Path, ctl_dir: Path,
               output_log: Path, work_dir: Path, extra_kernel_args: Sequence[str]) -> list[str]:
    def virtfs(path: Path | str, tag: str, *extra: str) -> list[str]:
        return ["-virtfs", ",".join((f"local,path={opt_escape(str(path))}", f"mount_tag={tag}",
                                     "security_model=none", *extra))]

    return [
        *profile.qemu_args(image.kernel, image.initrd, extra_kernel_args=extra_kernel_args),
        # hvc0 (a virtio console) for the command's output only; kernel messages stay on the
        # machine owner's ttyS0. A second 8250 UART under TCG delivered a job's output only when
        # the job ended (no streaming), and a virtio console moves bulk output far faster.
        "-device", "virtio-serial-pci,id=lhvs",
        "-chardev", f"file,id=lhout,path={opt_escape(str(output_log))}",
        "-device", "virtconsole,chardev=lhout,name=org.gmemtest.output",
        # multidevs=remap: the host's / spans several file systems; without it their
        # inode numbers can collide in L1's (loosely cached) view.
        *virtfs("/", "hostroot", "readonly=on", "multidevs=remap"),
        *virtfs(ctl_dir, "ctl"),
        # The commands' cwd (the checkout), mounted at its own path in the chroot: under the
        # host's /tmp or /run it would be hidden by L1's own tmpfs there.
        *virtfs(work_dir, "work", "readonly=on", "multidevs=remap"),
        *virtfs(share_dir, "results"),
    ]


def fresh_ctl(ctl_dir: Path, output_log: Path, cwd: Path) -> Path:
    """The host side of L1's job protocol before a boot: an empty ctl share naming ``cwd``, an empty output log.

    Returns ``cwd`` as an absolute path (where L1's commands start).
    """
    work = cwd.absolute()
    if "\n" in str(work) or not work.is_dir():
        raise LabhostError(f"cwd {str(work)!r} must be an existing directory without a newline in its path")
    ctl_dir.mkdir(parents=True, exist_ok=True)
    for stale in ctl_dir.iterdir():
        if stale.is_file():
            stale.unlink()
    output_log.write_bytes(b"")
    (ctl_dir / "work-path").write_text(f"{work}\n")
    return work


@contextmanager
def booted_labhost(
    image: LabhostImage,
    workdir: Path,
    *,
    share_dir: Path,
    profile: str | GuestProfile = DEFAULT_PROFILE,
    boot_timeout_s: float = 90.0,
    poweroff_timeout_s: float = 30.0,
    cwd: Path | None = None,
    binary: str = DEFAULT_QEMU,
    extra_kernel_args: Sequence[str] = (),
    freeze_after_s: float = FREEZE_AFTER_S,
) -> Iterator[LabhostRun]:
    """Boot L1 and wait until /dev/kvm is usable; power it off (or kill it) on exit.

    ``share_dir`` is L1's writable results directory; ``workdir`` keeps the evidence
    (``console.log``, ``output.log``, ``qmp.jsonl``, ``ctl/dmesg.txt``). ``cwd`` (default:
    the caller's) is where commands start; it must be visible in the host's root.
    """
    prof = get_profile(profile) if isinstance(profile, str) else profile
    workdir = workdir.absolute()
    share = share_dir.absolute()
    ctl_dir = workdir / "ctl"
    output_log = workdir / "output.log"
    for path in (workdir, share):
        path.mkdir(parents=True, exist_ok=True)
    work = fresh_ctl(ctl_dir, output_log, cwd if cwd is not None else Path.cwd())
    args = labhost_qemu_args(prof, image, share_dir=share, ctl_dir=ctl_dir, output_log=output_log,
                      work_dir=work, extra_kernel_args=extra_kernel_args)
    with ExitStack() as stack:
        t0 = time.monotonic()
        machine = stack.enter_context(QemuMachine(
            args, workdir, binary=binary, name=f"gmemtest-labhost-{uuid.uuid4().hex[:8]}",
            ssh_forward_port=None))
        timings = LabhostTimings(qmp_s=round(time.monotonic() - t0, 3))
        try:
            match = machine.wait_console(STATE_RE, timeout=boot_timeout_s)
        except MachineStateError as exc:
            exited = not machine.running()
            cls = LabhostError if exited else LabhostNotReady
            why = (f"QEMU exited before L1 was ready (see {machine.stderr_log})" if exited
                   else f"L1 not ready within {boot_timeout_s:.1f} s")
            raise cls(f"{why}; no {READY_MARKER} on the console\n--- L1 console tail "
                      f"({machine.console_log}) ---\n{_tail(machine.console_text())}") from exc
        if match.group(1) == FAILED_MARKER:
            raise LabhostError(f"L1 init failed:{match.group(2)}\n--- L1 console tail "
                               f"({machine.console_log}) ---\n{_tail(machine.console_text())}")
        timings.ready_s = round(time.monotonic() - t0, 3)
        uptime = _UPTIME_RE.search(match.group(2))
        timings.guest_uptime_at_ready_s = float(uptime.group(1)) if uptime else None
        LOG.info("L1 ready in %.2f s (guest uptime %s s): %s", timings.ready_s,
                 timings.guest_uptime_at_ready_s, match.group(0).strip())
        run = LabhostRun(machine, image, workdir=workdir, share_dir=share, ctl_dir=ctl_dir,
                         output_log=output_log, profile=prof,
                         cwd=work, timings=timings,
                         ready_line=match.group(0).strip(), freeze_after_s=freeze_after_s)
        # On an exception (a timeout, ^C) there is no clean power-off to wait for:
        # leaving the stack kills QEMU. Otherwise init writes dmesg and powers off.
        yield run
        if run._broken is None:
            run.power_off(poweroff_timeout_s)


def run_in_labhost(image: LabhostImage, argv: Sequence[str], workdir: Path, *,
                   share_dir: Path | None = None, timeout: float = 600.0,
                   on_output: Callable[[str], None] | None = None,
                   env: Mapping[str, str] | None = None,
                   **boot: Any) -> tuple[LabhostResult, LabhostTimings]:
    """Boot L1, run one command, power off: the CLI's path and the simplest API.

    ``boot`` goes to :func:`booted_labhost` (``boot_timeout_s``, ``cwd``, ``binary``, ...).
    """
    share = share_dir if share_dir is not None else workdir / "results"
    with booted_labhost(image, workdir, share_dir=share, **boot) as run:
        result = run.run(argv, timeout, on_output=on_output, env=env)
    return result, run.timings


def copy_evidence(workdir: Path, dest: Path) -> list[str]:
    """Copy L1's logs (console, output, QMP transcript, QEMU stderr, dmesg) to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for rel in ("console.log", "output.log", "qmp.jsonl", "qemu-stderr.log", "ctl/dmesg.txt"):
        src = workdir / rel
        if src.is_file():
            shutil.copyfile(src, dest / src.name)
            copied.append(src.name)
    return copied
