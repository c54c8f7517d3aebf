"""The lab-host image: config check, module closure, cache protocol, private apt.

Modules and kernel trees are synthetic (tiny ELF objects with a ``.modinfo`` section),
so these run in about a second; the one real build uses the busybox-static package of
the machine's apt and a user-supplied kernel tree.
"""

from __future__ import annotations

import hashlib
import lzma
import shutil
import struct
from pathlib import Path

import pytest

from images import debs, kmod
from images.kconfig import (
    LABHOST_BUILTIN_REQUIRED,
    LABHOST_MODULE_ALLOWED,
    KernelConfigError,
    check_labhost_config,
    parse_config,
)
from images.labhost import KernelTree, build_labhost_image, newest_kernel_version

PKG = "linux-image-7.9.9+deb13-amd64"
# kvm_amd's real dependencies in Debian's 7.3.4 (read from its .modinfo).
DEPENDS = {"kvm_amd": "kvm,ccp", "kvm": "irqbypass", "ccp": "", "irqbypass": "",
           "hwpoison_inject": "", "netfs": "", "9pnet": "netfs", "9pnet_virtio": "9pnet",
           "9p": "9pnet,netfs", "virtio_pci": "", "virtio_console": ""}
FILE_NAMES = {"kvm_amd": "kvm-amd", "hwpoison_inject": "hwpoison-inject"}


def _good_config() -> dict[str, str]:
    lines = [f"CONFIG_{req.alternatives[0]}=y" for req in LABHOST_BUILTIN_REQUIRED]
    lines += [f"CONFIG_{req.alternatives[0]}=m" for req in LABHOST_MODULE_ALLOWED]
    return parse_config("\n".join(lines) + "\n")


def _config_text(values: dict[str, str]) -> str:
    return "".join(f"CONFIG_{k}={v}\n" if v != "n" else f"# CONFIG_{k} is not set\n"
                   for k, v in values.items())


def make_ko(name: str, depends: str) -> bytes:
    """A minimal little-endian ELF64 object: null, .modinfo and .shstrtab sections."""
    modinfo = f"name={name}\0depends={depends}\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    header_size, shentsize = 64, 64
    modinfo_off = header_size
    shstr_off = modinfo_off + len(modinfo)
    shoff = (shstr_off + len(shstrtab) + 7) // 8 * 8
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, 1, 62, 1, 0, 0, shoff, 0, header_size,
                         0, 0, shentsize, 3, 2)
    section = struct.Struct("<IIQQQQIIQQ")
    sections = (section.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
                + section.pack(1, 1, 0, 0, modinfo_off, len(modinfo), 0, 0, 1, 0)
                + section.pack(10, 3, 0, 0, shstr_off, len(shstrtab), 0, 0, 1, 0))
    body = header + modinfo + shstrtab
    return body + bytes(shoff - len(body)) + sections


def make_tree(root: Path, config: dict[str, str], *, xz: bool = True) -> KernelTree:
    modules = root / "lib" / "modules" / "7.9.9+deb13-amd64"
    for name, depends in DEPENDS.items():
        ko = make_ko(name, depends)
        sub = modules / "kernel" / ("virt" if "kvm" in name else "misc")
        sub.mkdir(parents=True, exist_ok=True)
        stem = FILE_NAMES.get(name, name)
        if xz:
            (sub / f"{stem}.ko.xz").write_bytes(lzma.compress(ko, format=lzma.FORMAT_XZ))
        else:
            (sub / f"{stem}.ko").write_bytes(ko)
    (root / "vmlinuz").write_bytes(b"not a real bzImage, QEMU never boots it here")
    (root / "config").write_text(_config_text(config))
    return KernelTree(root / "vmlinuz", modules, root / "config")


# ----- kernel config -------------------------------------------------------------------
def test_good_config_asks_for_the_kvm_and_9p_modules() -> None:
    assert check_labhost_config(_good_config(), PKG) == (
        "virtio_pci", "virtio_console", "kvm", "kvm_amd", "hwpoison_inject", "9pnet", "9pnet_virtio", "9p")


@pytest.mark.parametrize("option", ["KVM_AMD", "HWPOISON_INJECT", "KVM", "NET_9P_VIRTIO"])
def test_missing_module_option_names_it(option: str) -> None:
    values = _good_config() | {option: "n"}
    with pytest.raises(KernelConfigError) as info:
        check_labhost_config(values, PKG)
    assert info.value.option == option
    assert f"CONFIG_{option} must be y or m" in str(info.value)
    assert f"found CONFIG_{option}=n" in str(info.value)
    assert PKG in str(info.value)


def test_missing_memory_failure_names_it() -> None:
    values = _good_config()
    del values["MEMORY_FAILURE"]
    with pytest.raises(KernelConfigError, match=r"CONFIG_MEMORY_FAILURE must be y .*found absent"):
        check_labhost_config(values, PKG)


def test_old_guest_memfd_name_does_not_count() -> None:
    """6.12's KVM_PRIVATE_MEM gives guest_memfd only to private VM types: not enough."""
    values = _good_config()
    del values["KVM_GUEST_MEMFD"]
    values["KVM_PRIVATE_MEM"] = "y"
    with pytest.raises(KernelConfigError) as info:
        check_labhost_config(values, PKG)
    assert info.value.option == "KVM_GUEST_MEMFD"
    assert "KVM_PRIVATE_MEM" in str(info.value)


def test_memory_failure_as_module_is_refused() -> None:
    with pytest.raises(KernelConfigError, match="CONFIG_MEMORY_FAILURE must be y"):
        check_labhost_config(_good_config() | {"MEMORY_FAILURE": "m"}, PKG)


# ----- modules ---------------------------------------------------------------------------
@pytest.mark.parametrize("xz", [True, False])
def test_kvm_amd_closure_loads_its_dependencies_first(tmp_path: Path, xz: bool) -> None:
    tree = make_tree(tmp_path, _good_config(), xz=xz)
    order = kmod.load_order(["kvm_amd", "hwpoison_inject"], kmod.index_modules(tree.modules))
    names = [kmod.module_file_name(p) for p in order]
    assert names == ["irqbypass.ko", "kvm.ko", "ccp.ko", "kvm-amd.ko", "hwpoison-inject.ko"]
    assert kmod.read_module(order[3])[:4] == b"\x7fELF"


def test_missing_dependency_names_who_needs_it(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, _good_config())
    next(tree.modules.rglob("ccp.ko.xz")).unlink()
    with pytest.raises(kmod.ModuleError, match=r"module ccp \(needed by kvm_amd\) not found"):
        kmod.load_order(["kvm_amd"], kmod.index_modules(tree.modules))


def test_newest_kernel_version_picks_the_highest_generic_7x() -> None:
    names = ["linux-image-7.0.13+deb13-amd64", "linux-image-7.3.4+deb13-amd64",
             "linux-image-7.10.1+deb13-cloud-amd64", "linux-image-7.2.12+deb13-amd64",
             "linux-image-6.12.9+deb13-amd64", "linux-image-8.0.1+deb14-amd64",
             "linux-image-7.3.4+deb13-rt-amd64"]
    assert newest_kernel_version(names) == "7.3.4+deb13"
    with pytest.raises(RuntimeError, match=r"no linux-image-9\.\*-amd64 package"):
        newest_kernel_version(names, major=9)


# ----- private apt -------------------------------------------------------------------------
def test_debian_uri_reads_deb822_then_one_line_sources(tmp_path: Path) -> None:
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "other.sources").write_text("Types: deb\nURIs: http://other.invalid/x\nSuites: nodistro\n")
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://list.invalid/debian bookworm main\n")
    assert debs.debian_uri(tmp_path) == "http://list.invalid/debian"
    (parts / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb822.invalid/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n")
    assert debs.debian_uri(tmp_path) == "http://deb822.invalid/debian"
    with pytest.raises(debs.PackageError, match="no Debian apt source for suite 'sid'"):
        debs.debian_uri(tmp_path, "sid")


def test_private_apt_points_every_directory_into_its_root(tmp_path: Path) -> None:
    apt = debs.private_apt(tmp_path / "apt", "trixie-backports", uri="http://mirror.invalid/debian")
    dirs = [o.split("=", 1)[1] for o in apt.options if o.startswith("Dir::")]
    assert len(dirs) >= 6
    assert all(d.startswith(str(tmp_path / "apt")) for d in dirs)
    line = (tmp_path / "apt" / "etc" / "sources.list").read_text()
    assert line.split()[2:] == ["http://mirror.invalid/debian", "trixie-backports", "main"]
    with pytest.raises(debs.PackageError, match="suite 'trixie; rm' is not a Debian suite"):
        debs.private_apt(tmp_path / "bad", "trixie; rm")


def _tree_digest(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
def test_private_apt_update_leaves_etc_apt_untouched(tmp_path: Path) -> None:
    try:
        uri = debs.debian_uri()
    except debs.PackageError as exc:
        pytest.skip(f"no Debian source to derive a mirror from: {exc}")
    before = _tree_digest(Path("/etc/apt"))
    lists_before = sorted(p.name for p in Path("/var/lib/apt/lists").iterdir())
    apt = debs.private_apt(tmp_path / "apt", "trixie-backports", uri=uri)
    try:
        debs.update(apt)
    except debs.PackageError as exc:
        pytest.skip(f"the mirror is unreachable: {exc}")
    names = debs.package_names("linux-image-7.", apt)
    assert any(n.endswith("-amd64") for n in names), names
    assert _tree_digest(Path("/etc/apt")) == before
    assert sorted(p.name for p in Path("/var/lib/apt/lists").iterdir()) == lists_before
    assert list((tmp_path / "apt" / "lists").glob("*trixie-backports*Packages*"))


def test_update_refuses_the_system_configuration() -> None:
    with pytest.raises(debs.PackageError, match="refusing"):
        debs.update(debs.SYSTEM_APT)


# ----- a real build from a user-supplied tree: cache hit and miss ---------------------------
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt for busybox-static")
def test_tree_build_hits_the_cache_and_misses_on_change(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", _good_config())
    cache = tmp_path / "cache"
    first = build_labhost_image(cache, tree)
    assert not first.cache_hit
    assert first.modules == ("virtio_pci.ko", "virtio_console.ko", "irqbypass.ko", "kvm.ko", "ccp.ko", "kvm-amd.ko",
                             "hwpoison-inject.ko", "netfs.ko", "9pnet.ko", "9pnet_virtio.ko", "9p.ko")
    assert first.kernel.read_bytes() == tree.vmlinuz.read_bytes()  # no PVH: the bzImage as is
    second = build_labhost_image(cache, tree)
    assert second.cache_hit and second.kernel == first.kernel
    # an input that decides the image changes: a module the closure takes
    kvm = next(tree.modules.rglob("kvm.ko.xz"))
    kvm.write_bytes(lzma.compress(make_ko("kvm", "irqbypass") + b"\0" * 8, format=lzma.FORMAT_XZ))
    third = build_labhost_image(cache, tree)
    assert not third.cache_hit and third.kernel.parent != first.kernel.parent
    # an output damaged on disk is rebuilt, not trusted
    third.initrd.write_bytes(b"damaged")
    fourth = build_labhost_image(cache, tree)
    assert not fourth.cache_hit and fourth.initrd.read_bytes() != b"damaged"


def test_tree_with_a_bad_config_names_the_option(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", _good_config() | {"HWPOISON_INJECT": "n"})
    with pytest.raises(KernelConfigError, match="CONFIG_HWPOISON_INJECT must be y or m"):
        build_labhost_image(tmp_path / "cache", tree)
