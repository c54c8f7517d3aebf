"""The kernel config check on synthetic configs: each way an option can be wrong."""

from __future__ import annotations

import pytest

from images.kconfig import BUILTIN_REQUIRED, KernelConfigError, check_config, parse_config

PKG = "linux-image-test-amd64-unsigned"


def _good() -> dict[str, str]:
    text = "\n".join(f"CONFIG_{req.alternatives[0]}=y" for req in BUILTIN_REQUIRED)
    return parse_config(text + "\nCONFIG_VIRTIO_PCI=m\nCONFIG_VIRTIO_NET=m\n"
                        "CONFIG_PVPANIC=y\nCONFIG_PVPANIC_MMIO=m\n")


def test_parse_reads_values_and_unset_lines() -> None:
    values = parse_config('CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="text"\n# comment\n')
    assert values == {"A": "y", "B": "n", "C": "text"}


def test_good_config_lists_the_modules_to_load() -> None:
    assert check_config(_good(), PKG) == ("virtio_pci", "virtio_net", "pvpanic-mmio")


def test_builtin_drivers_need_no_modules() -> None:
    values = _good() | {"VIRTIO_PCI": "y", "VIRTIO_NET": "y", "PVPANIC_MMIO": "y"}
    assert check_config(values, PKG) == ()


def test_missing_option_names_option_package_and_value() -> None:
    values = _good()
    del values["MEMORY_FAILURE"]
    with pytest.raises(KernelConfigError) as info:
        check_config(values, PKG)
    message = str(info.value)
    assert info.value.option == "MEMORY_FAILURE"
    assert "CONFIG_MEMORY_FAILURE must be y" in message
    assert PKG in message
    assert message.endswith("found absent")


def test_not_set_option_is_reported_as_n() -> None:
    values = _good() | {"X86_MCE": "n"}
    with pytest.raises(KernelConfigError, match=r"CONFIG_X86_MCE must be y .* found CONFIG_X86_MCE=n"):
        check_config(values, PKG)


def test_module_where_builtin_is_needed() -> None:
    values = _good() | {"HUGETLBFS": "m"}
    with pytest.raises(KernelConfigError, match="found CONFIG_HUGETLBFS=m") as info:
        check_config(values, PKG)
    assert info.value.found == "CONFIG_HUGETLBFS=m"


def test_either_tracing_option_is_enough() -> None:
    values = _good() | {"TRACING": "n", "FTRACE": "y"}
    check_config(values, PKG)
    values["FTRACE"] = "n"
    with pytest.raises(KernelConfigError, match=r"TRACING\|FTRACE"):
        check_config(values, PKG)


def test_missing_nic_driver() -> None:
    values = _good()
    values["VIRTIO_NET"] = "n"
    with pytest.raises(KernelConfigError, match="CONFIG_VIRTIO_NET must be y or m"):
        check_config(values, PKG)
