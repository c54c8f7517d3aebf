#!/usr/bin/env bash
# The project's test command (README quick start, second command; .ci/run calls it).
# Installs what it needs (bootstrap-host.sh), builds the guest and lab-host images (cache hits when
# warm), then runs the linters and the pytest suite against the real QEMU, SSH and KVM. Inside
# pytest, one lab-host boot runs tests/host_stack where guest_memfd and memory failure are real
# (tests/test_labhost_batch.py). Each phase's seconds are printed in pytest's summary, before its
# closing line, so that line stays the last word on the whole run.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
phases=""
t0=$(date +%s%N)
phase() {  # phase NAME: the seconds since the last phase ended
    local now ms
    now=$(date +%s%N)
    ms=$(( (now - t0) / 1000000 ))
    phases="$phases $1=$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
    echo "== $1 took $((ms / 1000)).$(printf '%03d' $((ms % 1000))) s"
    t0=$now
}

bash ci/bootstrap-host.sh
phase bootstrap
venv=${GMEMTEST_VENV:-$repo/.venv}
export PATH="$venv/bin:$PATH"

echo "== images (guest, lab host)"
python -m images build --json >/dev/null
gmemtest labhost image --kvm sw-protected --json >/dev/null  # and its KVM rebuilt for private memory
python -m images qemu --json >/dev/null  # Debian's newest QEMU in its own root (the chain runs under it)
python -m images qemu-build --json >/dev/null  # the project's QEMU: Debian's source + images/patches/qemu
phase images
echo "== ruff"
ruff check .
echo "== mypy --strict (library packages)"
mypy outcome polling host_stack qmp_helpers guests images gmemtest
phase lint
echo "== pytest"
export GMEMTEST_PHASES="${phases# }"
exec python -m pytest "$@"
