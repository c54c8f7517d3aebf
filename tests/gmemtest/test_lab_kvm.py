"""The lab host's choice of KVM, for real: Debian's stock modules, or the pair rebuilt with
CONFIG_KVM_SW_PROTECTED_VM and swapped in before the command (one L1 boot each)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gmemtest.cli import main
from gmemtest.host_checks import host_checks_of
from host_stack.kvm_uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_X86_DEFAULT_VM, KVM_X86_SW_PROTECTED_VM

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def _json_documents(text: str) -> list[dict[str, object]]:
    """Every JSON object in L1's output, in order (its stdout and stderr share one console)."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while (start := text.find("{", at)) >= 0:
        doc, at = decoder.raw_decode(text, start)
        docs.append(doc)
    return docs


# After preflight, under the stock KVM: the private-memory section of a qualification, its report
# printed whole (L1's /tmp is its own).
_PRIVATE_SECTION = ('; "$@" qualify --no-guest --memory private --out /tmp/private > /dev/null; '
                    'cat /tmp/private/qualification.json')


def _preflight_in_l1(tmp_path: Path, choice: str, capfd: pytest.CaptureFixture[str], then: str = "",
                     ) -> tuple[list[dict[str, object]], dict[str, object], list[dict[str, object]]]:
    """The swap records (none for the stock KVM), the host part of L1's preflight and what ``then``
    (more shell after it) printed as JSON."""
    rc = main(["labhost", "run", "--kvm", choice, "--results", str(tmp_path), "--timeout", "300",
               "--", "sh", "-c", '"$@" preflight --json --no-plan' + then, "sh", sys.executable, "-m", "gmemtest.cli"])
    out, err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    docs = _json_documents(out)
    at = next(i for i, doc in enumerate(docs) if "host" in doc)
    host = docs[at]["host"]
    assert isinstance(host, dict)
    return docs[:at], host, docs[at + 1:]


@pytest.mark.timeout(900)
def test_the_rebuilt_kvm_creates_private_memory_vms_and_the_stock_one_does_not(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    swaps, stock, (private,) = _preflight_in_l1(tmp_path / "stock", "stock", capfd, _PRIVATE_SECTION)
    assert swaps == []
    assert stock["vm_types_mask"] == 1 << KVM_X86_DEFAULT_VM, stock["vm_types_mask"]
    assert stock["kvm_module_taint"] == "" and stock["private_memory_vm_types"] == []
    # Run by hand under the stock KVM, the private-memory checks cannot run, with the probed reason.
    items = {i["name"]: (i["status"], i["summary"]) for i in private["items"]}  # type: ignore[attr-defined]
    assert set(items) == {c.name for c in host_checks_of("private")}, items
    assert all(st == "CANNOT RUN" and "sw_protected_vm" in why and "KVM_CAP_VM_TYPES 0x1" in why
               for st, why in items.values()), items

    (swap,), rebuilt, _ = _preflight_in_l1(tmp_path / "sw", "sw-protected", capfd)
    assert swap["unloaded"] == ["kvm_amd", "kvm"] and swap["kvm_taint"] == "OE", swap
    assert rebuilt["vm_types_mask"] == (1 << KVM_X86_DEFAULT_VM) | (1 << KVM_X86_SW_PROTECTED_VM)
    caps = {t: (attrs, flags) for t, attrs, flags in rebuilt["vm_type_caps"]}  # type: ignore[attr-defined]
    # Asked of each VM: private memory and MMAP-only guest_memfd on the software-protected type,
    # neither private memory nor a change of the default type's MMAP|INIT_SHARED.
    assert caps[KVM_X86_SW_PROTECTED_VM] == (KVM_MEMORY_ATTRIBUTE_PRIVATE, 0x1), caps
    assert caps[KVM_X86_DEFAULT_VM] == (0, 0x3), caps
    assert "O" in str(rebuilt["kvm_module_taint"]) and rebuilt["private_memory_vm_types"] == [KVM_X86_SW_PROTECTED_VM]
    summary = json.loads((tmp_path / "sw" / "summary.json").read_text())
    assert summary["kvm"] == "sw-protected"


def test_a_kernel_whose_source_is_not_served_is_refused_by_name() -> None:
    from images.build import BuildError
    from images.kvm_modules import build_kvm_modules

    with pytest.raises(BuildError, match=r"does not serve linux-source-7\.99 or linux-headers-7\.99\.1\+deb13-amd64 "
                                         r"for kernel 7\.99\.1\+deb13-amd64; its sources: .*linux-source-7\.3"):
        build_kvm_modules("7.99.1+deb13-amd64")
