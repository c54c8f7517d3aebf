"""What a lab puts under test reaches the argv that is launched, and a bad value stops before a boot.

The argv is captured the way test_launch_argv does it: a stand-in QemuMachine records its
arguments and raises instead of starting anything. The guest image is a stand-in too (files with
a manifest whose key is computed exactly as images.build computes it), so no apt and no QEMU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import stat
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import pytest

from gmemtest import avocado_support, guest_run, under_test
from gmemtest.cli import main as cli_main
from gmemtest.under_test import MANIFEST_ENV, UnderTest
from images import build, manifest
from images.build import BuildError, image_from_manifest
from images.debs import PackagePin
from outcome import Check, Verdict

PIN = PackagePin("linux-image-6.1.0-99-amd64-unsigned", "6.1.999-1", "ab" * 32, "linux-image.deb")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_image(root: Path) -> Path:
    """An image directory the way cached_build leaves it; returns its manifest path."""
    root.mkdir(parents=True)
    for name, content in ((build.KERNEL_NAME, b"kernel"), (build.INITRD_NAME, b"initrd"),
                          (build.SSH_KEY_NAME, b"key")):
        (root / name).write_bytes(content)
    key = manifest.cache_key((PIN,), manifest.builder_source_hashes(), _sha(build.default_probe_source()))
    doc = {"schema": manifest.SCHEMA, "key": key, "kernel_release": "6.1.0-99-amd64",
           "packages": [PIN.as_json()],
           "outputs": {n: _sha(root / n) for n in (build.KERNEL_NAME, build.INITRD_NAME, build.SSH_KEY_NAME)}}
    manifest.write_manifest(root / manifest.MANIFEST_NAME, doc)
    return root / manifest.MANIFEST_NAME


class _Launched(Exception):
    """Raised by the stand-in QemuMachine once it has the argv: nothing is started."""


class _CapturingMachine:
    argv: ClassVar[list[str]] = []
    binary: ClassVar[str] = ""

    def __init__(self, args: list[str], workdir: Path, *, binary: str = "", **_: Any) -> None:
        type(self).argv, type(self).binary = list(args), binary

    def __enter__(self) -> _CapturingMachine:
        raise _Launched

    def stable_argv(self) -> list[str]:  # the snapshot key's first step: the argv is known by now
        raise _Launched

    def __exit__(self, *exc: object) -> None:  # pragma: no cover - never entered
        return None


class _Cancelled(Exception):
    pass


class _FakeTest:
    """The AvocadoTestLike protocol: outputdir, log, whiteboard, params, cancel, fail."""

    def __init__(self, outputdir: Path, params: dict[str, str]) -> None:
        self.outputdir = str(outputdir)
        self.log = logging.getLogger("fake-test")
        self.whiteboard = ""
        self.params = _Params(params)

    def cancel(self, message: str | None = None) -> NoReturn:
        raise _Cancelled(message)

    def fail(self, message: str | None = None) -> NoReturn:
        raise AssertionError(message)


class _Params:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def get(self, key: str, path: str | None = None, default: Any = None) -> Any:
        return self.values.get(key, default)


def _values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]


@pytest.fixture
def lab(tmp_path: Path) -> dict[str, str]:
    """A lab's own QEMU (an executable file), firmware, kernel, initrd and a built image."""
    qemu = tmp_path / "lab" / "qemu-system-x86_64"
    qemu.parent.mkdir()
    qemu.write_text("#!/bin/sh\nexit 1\n")
    qemu.chmod(qemu.stat().st_mode | stat.S_IXUSR)
    for name in ("OVMF.lab.fd", "vmlinuz-lab", "initrd-lab"):
        (tmp_path / "lab" / name).write_bytes(b"x")
    return {"qemu": str(qemu), "profile": "tcg-smp2-broadcast", "firmware": str(tmp_path / "lab" / "OVMF.lab.fd"),
            "guest_kernel": str(tmp_path / "lab" / "vmlinuz-lab"), "guest_initrd": str(tmp_path / "lab" / "initrd-lab"),
            "guest_manifest": str(fake_image(tmp_path / "image"))}


def _no_requirements(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(avocado_support, "unmet_requirements", lambda *a, **k: [])
    monkeypatch.setattr("gmemtest.requirements.unmet_requirements", lambda *a, **k: [])


def _check_lab_argv(lab: dict[str, str]) -> None:
    argv = _CapturingMachine.argv
    assert _CapturingMachine.binary == lab["qemu"], f"binary {_CapturingMachine.binary!r}, want {lab['qemu']!r}"
    assert _values(argv, "-bios") == [lab["firmware"]], f"-bios in {argv}"
    assert _values(argv, "-kernel") == [lab["guest_kernel"]], f"-kernel in {argv}"
    assert _values(argv, "-initrd") == [lab["guest_initrd"]], f"-initrd in {argv}"
    assert _values(argv, "-smp") == ["2"] and "model=85" in _values(argv, "-cpu")[0], f"profile not in {argv}"


def test_avocado_parameters_reach_the_launched_argv(lab: dict[str, str], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _no_requirements(monkeypatch)
    monkeypatch.setattr(guest_run, "QemuMachine", _CapturingMachine)
    test = _FakeTest(tmp_path / "job" / "test-results" / "1-t" / "data", lab)
    Path(test.outputdir).mkdir(parents=True)
    with pytest.raises(_Launched):
        avocado_support.run_guest_scenario(test, "srao-late-touch-4k")
    _check_lab_argv(lab)
    recorded = json.loads((Path(test.outputdir) / "under-test.json").read_text())
    assert recorded["qemu"] == lab["qemu"] and recorded["firmware"] == lab["firmware"], recorded


def test_cli_options_reach_the_launched_argv(lab: dict[str, str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _no_requirements(monkeypatch)
    monkeypatch.setattr(guest_run, "QemuMachine", _CapturingMachine)
    argv = ["run", "srao-late-touch-4k", "--out", str(tmp_path / "out")]
    for name, value in lab.items():
        argv += [f"--{name.replace('_', '-')}", value]
    with pytest.raises(_Launched):
        cli_main(argv)
    _check_lab_argv(lab)


def test_the_job_manifest_variable_is_the_default_image(lab: dict[str, str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MANIFEST_ENV, lab["guest_manifest"])
    monkeypatch.setattr(build, "build_default_image", lambda **_: pytest.fail("resolved pins again"))
    monkeypatch.setattr(under_test, "build_default_image", lambda **_: pytest.fail("resolved pins again"))
    image = UnderTest.from_params(lambda _: None).guest_image(tmp_path / "job")
    assert image.manifest == Path(lab["guest_manifest"]) and image.kernel_release == "6.1.0-99-amd64"


@pytest.mark.parametrize(("name", "value", "sentence"), [
    ("qemu", "/opt/qemu-9.2/bin/qemu-system-x86_64", "QEMU binary '/opt/qemu-9.2/bin/qemu-system-x86_64' (qemu) "
                                                     "does not exist"),
    ("qemu", "qemu-system-nowhere", "and is not on PATH"),
    ("profile", "kvm-sev-snpp", "unknown guest profile 'kvm-sev-snpp' (profile); valid: tcg-default"),
    ("firmware", "/nonexistent/OVMF.fd", "firmware file '/nonexistent/OVMF.fd' (firmware) does not exist"),
    ("guest_kernel", "/nonexistent/vmlinuz", "guest kernel file '/nonexistent/vmlinuz' (guest_kernel) does not"),
    ("guest_initrd", "/nonexistent/initrd", "guest initrd file '/nonexistent/initrd' (guest_initrd) does not"),
    ("guest_kernel_version", "latest", "guest kernel version 'latest' (guest_kernel_version) is not"),
])
def test_a_bad_value_cancels_or_exits_2_naming_it_before_any_boot(
        name: str, value: str, sentence: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def no_boot(*_: object, **__: object) -> NoReturn:
        raise AssertionError("a guest was booted despite a bad parameter")

    monkeypatch.setattr(guest_run, "QemuMachine", no_boot)
    monkeypatch.setattr(under_test, "build_default_image", no_boot)
    test = _FakeTest(tmp_path / "data", {name: value})
    with pytest.raises(_Cancelled, match="bad test parameter") as cancelled:
        avocado_support.run_guest_scenario(test, "srao-late-touch-4k")
    assert sentence in str(cancelled.value), f"expected {sentence!r} in the CANCEL reason, got {cancelled.value}"
    assert cli_main(["run", "srao-late-touch-4k", f"--{name.replace('_', '-')}", value]) == 2
    err = capsys.readouterr().err
    assert sentence in err, f"expected {sentence!r} on stderr, got {err!r}"


def test_a_labhost_kernel_version_reaches_the_labhost_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import images.labhost

    asked: list[object] = []

    def build_labhost_image(*_: object, kernel: object = None, **__: object) -> NoReturn:
        asked.append(kernel)
        raise BuildError("no such kernel here")

    monkeypatch.setattr(images.labhost, "build_labhost_image", build_labhost_image)
    test = _FakeTest(tmp_path / "data", {"labhost_kernel_version": "7.3.9+deb13", "labhost_kernel_suite": "sid"})
    with pytest.raises(_Cancelled, match=r"lab host kernel debian:sid:7\.3\.9\+deb13"):
        avocado_support.run_labhost_item(test, avocado_support.LABHOST_PREFLIGHT)
    assert asked == [images.labhost.DebianKernel("sid", "7.3.9+deb13")]


def test_a_manifest_loads_only_while_its_key_and_outputs_hold(tmp_path: Path) -> None:
    path = fake_image(tmp_path / "image")
    image = image_from_manifest(path)
    assert image.kernel == tmp_path / "image" / "kernel" and image.packages == (PIN,)
    (tmp_path / "image" / "initrd.img").write_bytes(b"tampered")
    with pytest.raises(BuildError, match=r"does not match its manifest: initrd.img: sha256"):
        image_from_manifest(path)
    doc = manifest.read_manifest(path)
    doc["key"] = "0" * 64
    manifest.write_manifest(path, doc)
    with pytest.raises(BuildError, match="is stale: its key is 000000000000000000000000, but this checkout"):
        image_from_manifest(path)


def test_the_image_is_resolved_once_per_job_and_a_stale_record_is_resolved_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    path = fake_image(tmp_path / "image")
    calls: list[object] = []

    def resolve(**kwargs: object) -> build.GuestImage:
        calls.append(kwargs)
        return image_from_manifest(path)

    monkeypatch.setattr(under_test, "build_default_image", resolve)
    monkeypatch.delenv(MANIFEST_ENV, raising=False)
    job = tmp_path / "job"
    first, second = UnderTest().guest_image(job), UnderTest().guest_image(job)
    assert first == second and len(calls) == 1, f"resolved {len(calls)} times in one job"
    (tmp_path / "image" / "kernel").write_bytes(b"changed under the job")
    with pytest.raises(BuildError):  # the record is refused, and so is the re-resolved stand-in
        UnderTest().guest_image(job)
    assert len(calls) == 2 and "no longer valid, resolving again" in caplog.text


def test_the_verdict_json_carries_the_launch_record() -> None:
    setup = {"qemu": {"binary": "/opt/qemu/bin/qemu-system-x86_64", "version": "9.2.0"}, "profile": {"name": "p"}}
    verdict = Verdict("s", (Check("c", "1", "1", True),), setup=setup)
    assert json.loads(verdict.to_json())["setup"] == setup
    assert verdict == Verdict("s", (Check("c", "1", "1", True),)), "the record is not part of the judgement"


def test_launch_record_reads_the_launched_machine(tmp_path: Path) -> None:
    from guests.profiles import get_profile

    class Machine:
        args = ("/lab/qemu", "-bios", "/lab/OVMF.fd", "-kernel", "/lab/k", "-initrd", "/lab/i")
        binary = "qemu"

        def qmp(self, cmd: str) -> dict[str, Any]:
            assert cmd == "query-version"
            return {"qemu": {"major": 9, "minor": 2, "micro": 1}, "package": "lab build"}

    image = build.GuestImage(Path("/lab/k"), Path("/lab/i"), Path("/lab/key"), tmp_path / "m.json", "lab kernel k",
                             True, ())
    run = guest_run.GuestRun(Machine(), None, get_profile("tcg-default"), image, tmp_path)  # type: ignore[arg-type]
    record = run.launch_record()
    assert record["qemu"] == {"binary": "/lab/qemu", "version": "9.2.1", "package": "lab build"}
    assert record["firmware"] == "/lab/OVMF.fd" and record["image"]["kernel"] == "/lab/k"
    assert record["profile"]["name"] == "tcg-default"


def test_the_matrix_file_has_a_variant_per_guest_profile() -> None:
    """avocado_tests/matrix.yaml: one !mux leaf per guest profile, each setting that profile."""
    import subprocess
    import sys

    from guests.profiles import PROFILES

    repo = Path(__file__).resolve().parents[2]
    avocado = str(Path(sys.executable).with_name("avocado"))
    out = subprocess.run([avocado, "variants", "-m", str(repo / "avocado_tests" / "matrix.yaml"), "-c"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    leaves = re.findall(r"/run/profile/([\w-]+):profile => ([\w-]+)", out)
    guest_profiles = [name for name in PROFILES if name != "labhost-svm"]  # L1 is not a guest profile
    assert [a for a, _ in leaves] == guest_profiles and all(a == b for a, b in leaves), out


def test_the_lab_class_runs_every_scenario_under_its_profile_leaving_out_only_the_meaningless(
        lab: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gmemtest.scenarios import SCENARIOS, unsupported_under
    from guests.profiles import get_profile

    _no_requirements(monkeypatch)
    ran: list[tuple[str, str]] = []

    def fake_run(spec: Any, image: Any, outdir: Path, **kwargs: Any) -> Any:
        ran.append((spec.name, kwargs["under"].profile_for(spec).name))
        verdict = Verdict(spec.name, (Check("c", "1", "1", True),))
        return type("R", (), {"verdict": verdict, "spec": spec})()

    monkeypatch.setattr(avocado_support, "run_in_fresh_guest", fake_run)
    test = _FakeTest(tmp_path / "data", {"guest_manifest": lab["guest_manifest"]})
    avocado_support.run_every_scenario_under(test, "kvm-sev-snp")
    from gmemtest.requirements import host_report

    # Left out, each with its reason: the rows meaningless under one vCPU or plain RAM (the
    # broadcast row, the hugetlb row), and the host-poison rows where this host lacks what they
    # need themselves (hwpoison-inject).
    profile = get_profile("kvm-sev-snp")
    meaningless = [s.name for s in SCENARIOS if unsupported_under(s, profile) is not None]
    lacking = [s.name for s in SCENARIOS if s.name not in meaningless
               and any(host_report().missing(r) for r in s.requirements)]
    expected = [s.name for s in SCENARIOS if s.name not in meaningless and s.name not in lacking]
    assert ran == [(name, "kvm-sev-snp") for name in expected]
    left_out = json.loads(test.whiteboard)["left_out"]
    assert len(left_out) == len(meaningless) + len(lacking) == len(SCENARIOS) - len(expected)
    assert left_out[0].startswith("scenario srao-broadcast-smp2-4k broadcasts")
    for name, why in zip([s.name for s in SCENARIOS if s.name not in expected], left_out, strict=True):
        assert name in why and ("needs what this host lacks" in why) == (name in lacking), why


def test_a_row_that_needs_qemus_private_poison_switch_gets_it_and_requires_it() -> None:
    from gmemtest.scenarios import get_scenario

    mce = UnderTest().profile_for(get_scenario("private-host-poison-mce-4k"))
    stock = UnderTest().profile_for(get_scenario("private-host-poison-touch-4k"))
    assert mce.qemu_args(Path("/k"), Path("/i"))[:2] == ["-accel", "kvm,x-private-hwpoison-mce=on"]
    assert "qemu:x-private-hwpoison-mce" in mce.requirements
    assert stock.qemu_args(Path("/k"), Path("/i"))[:2] == ["-accel", "kvm"]
    assert "qemu:x-private-hwpoison-mce" not in stock.requirements
