"""The main job's plan, and the no-guest_memfd path on every host.

A capability report that says 0 stands in for a host without guest_memfd (like the aborting-QEMU
wrapper stands in for an AMD host): the plan, the Avocado tests' gate and qualify must each turn
it into CANCEL / CANNOT RUN with the probed sentence, whatever this machine's KVM offers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from gmemtest import plan, qualify
from gmemtest import requirements as req
from gmemtest.host_checks import (
    BACKING_ITEM,
    HOST_CHECK_TABLE,
    MAPPING_ITEM,
    PUNCH_ITEM,
    SEED_ITEM,
    UAPI_ITEM,
    HostCheck,
    host_check,
)
from host_stack import gmem_uapi_cases, vmm
from host_stack.capabilities import HostReport
from outcome import Verdict

NO_GMEM = "unmet host requirement guest_memfd: host KVM lacks guest_memfd: KVM_CAP_GUEST_MEMFD is 0"
ZERO = HostReport(kernel_release="6.18.44-fc", kvm_device=True, kvm_reason=None, kvm_vendor_module="kvm_pvm",
                  kvm_api_version=12, cap_guest_memfd=0, guest_memfd_flags=0, cap_user_memory2=1,
                  supported_vm_types=(0,), hwpoison_reason="host kernel lacks CONFIG_MEMORY_FAILURE: "
                  "MADV_HWPOISON returned EINVAL")
NO_SW_PROTECTED = ("unmet host requirement sw_protected_vm: host KVM cannot create a software-protected VM with "
                   "private memory: KVM_CAP_VM_TYPES 0x0 (CONFIG_KVM_SW_PROTECTED_VM is off; the lab host's rebuilt "
                   "KVM has it)")
FULL = dataclasses.replace(ZERO, kernel_release="7.3.4+deb13-amd64", kvm_vendor_module="kvm_amd", cap_guest_memfd=1,
                           guest_memfd_flags=3, hwpoison=True, hwpoison_reason="MADV_HWPOISON poisoned a page",
                           vm_types_mask=0x3, supported_vm_types=(0, 1), private_memory_vm_types=(1,),
                           debugfs=True, hwpoison_inject=True)
HOST_CLASSES = ("GmemUapi.", "TinyVmm.", "SeedRegression.", "PoisonMatrix.", "PrivateMemory.")


def _plan(report: HostReport) -> dict[str, str | None]:
    planned = plan.plan_main_job(report=report, newer_qemu="qemu-system-x86_64", built_qemu="qemu-system-x86_64")
    assert not [p for p in planned if p.unknown], [p.to_json() for p in planned if p.unknown]
    return {p.test: p.cancel for p in planned}


def test_every_avocado_test_is_planned_from_its_own_source() -> None:
    found = plan.discover()
    names = [name for name, _path, _calls in found]
    assert len(names) == len(set(names)), names
    assert all(calls for _name, _path, calls in found), [n for n, _p, c in found if not c]
    by_name = {name: calls for name, _path, calls in found}
    (uapi,) = by_name["GmemUapi.test_cases"]
    assert (uapi.function, uapi.args) == ("run_host_check", (UAPI_ITEM,))
    assert by_name["TinyVmm.test_punch_hole"][0].args == (PUNCH_ITEM,)
    assert host_check(UAPI_ITEM).requirements == gmem_uapi_cases.HOST_REQUIREMENTS
    assert by_name["MachineChecks.test_srao_late_touch_thp"][0].args == ("srao-late-touch-thp",)
    assert by_name["HostPoisonChain.test_ar_touch_kvm_gmem"][0].args == ("host-ar-touch-4k", "kvm-gmem")


def test_a_host_without_guest_memfd_cancels_every_host_check_with_the_capability() -> None:
    planned = _plan(ZERO)
    host = {name: cancel for name, cancel in planned.items() if name.startswith(HOST_CLASSES)}
    assert len(host) == 9, host
    private = {name for name in host if name.startswith("PrivateMemory.")}
    assert len(private) == 3 and {host[name] for name in private} == {NO_SW_PROTECTED}, host
    assert {cancel for name, cancel in host.items() if name not in private} == {NO_GMEM}, host


def test_a_host_with_guest_memfd_and_memory_failure_runs_every_host_check() -> None:
    planned = _plan(FULL)
    host = {name: cancel for name, cancel in planned.items() if name.startswith(HOST_CLASSES)}
    assert host and all(cancel is None for cancel in host.values()), host


def test_guest_memfd_without_memory_failure_cancels_only_the_poisoning_checks() -> None:
    no_mf = dataclasses.replace(FULL, hwpoison=False, hwpoison_reason=ZERO.hwpoison_reason)
    planned = _plan(no_mf)
    poisoning = {"SeedRegression.test_poisoned_gmem_page", "PoisonMatrix.test_matrix",
                 "PrivateMemory.test_private_seed_regression", "PrivateMemory.test_private_poison_matrix"}
    assert {n for n, c in planned.items() if n.startswith(HOST_CLASSES) and c} == poisoning
    assert planned["PoisonMatrix.test_matrix"] == (
        "unmet host requirement hwpoison: host kernel lacks CONFIG_MEMORY_FAILURE: MADV_HWPOISON returned EINVAL")


@pytest.mark.kvm
def test_a_host_serving_gmem_slots_from_userspace_addr_plans_the_oracle_checks_not_meaningful(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan's sentence must be part of what the two TinyVmm tests cancel with there, and the
    tiny VM that finds out is run once per plan, not once per test."""
    from types import SimpleNamespace

    from outcome import Finding

    runs: list[int] = []

    def decoy(_system: object) -> SimpleNamespace:
        runs.append(1)
        return SimpleNamespace(findings=(Finding(vmm.FINDING_ID, "divergence", "served from userspace_addr"),))

    monkeypatch.setattr(vmm, "run_backing_source", decoy)
    monkeypatch.setattr(req, "host_report", lambda: FULL)
    monkeypatch.setattr(req, "probe_vm_creation", lambda: None)
    ctx = plan._Context(None, "qemu-system-x86_64", lambda: None)
    predicted = {name: plan._host_check(ctx, name) for name in (MAPPING_ITEM, PUNCH_ITEM, BACKING_ITEM)}
    assert predicted[BACKING_ITEM] is None and runs == [1], (predicted, runs)
    for name, what in ((MAPPING_ITEM, "the gfn -> guest_memfd index oracle check"),
                       (PUNCH_ITEM, "the punch-hole check")):
        assert predicted[name] is not None and predicted[name] in vmm.not_meaningful_reason(what)
    monkeypatch.setattr(vmm, "run_backing_source", lambda _system: SimpleNamespace(findings=()))
    assert plan._host_check(plan._Context(None, "qemu-system-x86_64", lambda: None), MAPPING_ITEM) is None


@pytest.mark.parametrize("check", HOST_CHECK_TABLE, ids=[c.evidence for c in HOST_CHECK_TABLE])
def test_every_host_check_cancels_with_the_capability_before_running(check: HostCheck,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The one gate of a row (HostCheck.verdict): Avocado, qualify and the plan all go through it."""
    monkeypatch.setattr(req, "probe_vm_creation", lambda: None)
    monkeypatch.setattr(req, "host_report", lambda: ZERO)
    ran: list[int] = []

    def must_not_run(_report: HostReport | None) -> Verdict:
        ran.append(1)
        return Verdict(check.name)

    verdict = dataclasses.replace(check, run=must_not_run).verdict()
    assert (verdict.status, verdict.reason, ran) == ("CANNOT RUN", NO_SW_PROTECTED if check.private else NO_GMEM, [])
    monkeypatch.setattr(req, "host_report", lambda: FULL)
    assert req.host_unmet(check.requirements) is None


def test_a_check_whose_child_finds_what_the_probe_did_not_cannot_run() -> None:
    """ChildCancelled from the child (no memory failure after all) is CANNOT RUN, never ERROR."""
    from host_stack.live_child import ChildCancelled

    def cancelled(_report: HostReport | None) -> Verdict:
        raise ChildCancelled("host kernel lacks CONFIG_MEMORY_FAILURE: MADV_HWPOISON returned EINVAL")

    check = dataclasses.replace(host_check(SEED_ITEM), run=cancelled)
    verdict = check.verdict(FULL)
    assert (verdict.status, verdict.reason) == (
        "CANNOT RUN", "host kernel lacks CONFIG_MEMORY_FAILURE: MADV_HWPOISON returned EINVAL")


def test_a_host_without_kvm_cancels_with_the_vm_creation_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(req, "probe_vm_creation", lambda: "open /dev/kvm: No such file or directory")
    assert req.host_unmet(("kvm", "guest_memfd")) == (
        "unmet host requirement kvm: open /dev/kvm: No such file or directory")


def test_qualify_says_cannot_run_for_every_host_check_without_guest_memfd(tmp_path: Path) -> None:
    q = qualify.qualify(tmp_path, specs=(), image=None, host=ZERO)
    host = [i for i in q.items if i.section == "host"]
    got: dict[str, Any] = {i.name: (i.status, i.summary) for i in host}
    expected = [check.name for check in HOST_CHECK_TABLE]
    assert list(got) == expected, got
    assert all(v == ("CANNOT RUN", NO_SW_PROTECTED if host_check(n).private else NO_GMEM) for n, v in got.items()), got
    assert q.outcome == "INCOMPLETE" and not q.failed


def test_a_missing_newer_qemu_leaves_only_the_chain_rows_unplanned(monkeypatch: pytest.MonkeyPatch) -> None:
    """As inside the lab host, where Debian's newest QEMU cannot be fetched: the rest is planned."""
    import images.qemu_root
    from images.build import BuildError

    def unavailable() -> None:
        raise BuildError("no network here")

    monkeypatch.setattr(images.qemu_root, "build_qemu_root", unavailable)
    planned = plan.plan_main_job(report=ZERO, built_qemu="qemu-system-x86_64")
    unknown = {p.test for p in planned if p.unknown}
    assert unknown == {p.test for p in planned if p.test.startswith("HostPoisonChain.")}, unknown
    assert all("no network here" in str(p.unknown) for p in planned if p.unknown)
    assert {p.test: p.cancel for p in planned}["GmemUapi.test_cases"] == NO_GMEM


def test_a_missing_project_qemu_leaves_only_its_chain_rows_unplanned(monkeypatch: pytest.MonkeyPatch) -> None:
    """kvm-gmem and kvm-swprot run under the first QEMU that offers what they need, the project's own
    first: when it cannot be had, their rows say so and the rest is planned."""
    import images.qemu_build
    from images.build import BuildError

    def unavailable() -> None:
        raise BuildError("no QEMU source downloads")

    monkeypatch.setattr(images.qemu_build, "build_qemu", unavailable)
    planned = plan.plan_main_job(report=ZERO, newer_qemu="qemu-system-x86_64")
    unknown = {p.test for p in planned if p.unknown}
    assert unknown == {p.test for p in planned if p.test.startswith("HostPoisonChain.")
                       and ("kvm_gmem" in p.test or "kvm_swprot" in p.test)}
    assert unknown and all("python -m images qemu-build" in str(p.unknown) for p in planned if p.unknown)
