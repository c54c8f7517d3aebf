#!/usr/bin/env bash
# Idempotent host set-up for gmemtest on Debian 12 (bookworm): QEMU >= 10 from
# bookworm-backports, the tools the image builder and probe build need, and the
# project's virtual environment. Safe to run again: every step checks first.
#
# Environment (all optional):
#   GMEMTEST_VENV   where the virtual environment lives (default: <repo>/.venv)
#   GMEMTEST_PYTHON interpreter to build the venv from (default: python3)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${GMEMTEST_VENV:-$repo/.venv}
python=${GMEMTEST_PYTHON:-python3}
qemu_min_major=10

log() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

qemu_major() {
    local v
    v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
    printf '%s' "${v:-0}"
}

# The backports suite is added with the URI of the Debian source the machine
# already uses, so the repository never names a mirror.
debian_uri() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ {if (u) {print u; exit}}' "$f")
        [ -n "$uri" ] && { printf '%s' "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri=$(awk '$1 == "deb" && $0 ~ / bookworm / {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' "$f")
        [ -n "$uri" ] && { printf '%s' "$uri"; return; }
    done
}

ensure_backports() {
    if apt-cache policy 2>/dev/null | grep -q 'bookworm-backports'; then
        return
    fi
    local uri
    uri=$(debian_uri)
    [ -n "$uri" ] || die "no Debian bookworm apt source found to derive the bookworm-backports URI from"
    log "adding bookworm-backports from the machine's Debian source"
    as_root tee /etc/apt/sources.list.d/gmemtest-bookworm-backports.sources >/dev/null <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    as_root apt-get update -qq
}

ensure_packages() {
    local need=()
    local pkg
    # flex, bison, bc, libssl-dev, xz-utils: building the lab host's KVM modules from Debian's source.
    # ninja-build .. dpkg-dev: building the project's QEMU from Debian's source (images/qemu_build.py).
    for pkg in gcc libc6-dev make cpio python3-venv ca-certificates dropbear-bin openssh-client zstd debian-archive-keyring \
               flex bison bc libssl-dev xz-utils libelf1 \
               ninja-build pkg-config libglib2.0-dev zlib1g-dev libpixman-1-dev libslirp-dev patch perl dpkg-dev; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
    done
    if [ "$(qemu_major)" -lt "$qemu_min_major" ]; then
        ensure_backports
        log "installing qemu-system-x86 from bookworm-backports"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
    fi
    if [ "${#need[@]}" -gt 0 ]; then
        log "installing ${need[*]}"
        [ -n "$(find /var/lib/apt/lists -name '*_Packages*' -print -quit 2>/dev/null)" ] || as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
    [ "$(qemu_major)" -ge "$qemu_min_major" ] || die "qemu-system-x86_64 is $(qemu-system-x86_64 --version 2>&1 | head -1); need >= $qemu_min_major"
}

ensure_venv() {
    local stamp="$venv/.gmemtest-installed"
    if [ -f "$stamp" ] && [ "$stamp" -nt "$repo/setup.cfg" ]; then
        return
    fi
    if [ ! -x "$venv/bin/python" ]; then
        log "creating virtual environment in $venv"
        "$python" -m venv "$venv"
    fi
    log "installing gmemtest and its test extras into the venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$repo[test]"
    touch "$stamp"
}

ensure_packages
ensure_venv
log "ready: $(qemu-system-x86_64 --version | head -1); venv $venv"
