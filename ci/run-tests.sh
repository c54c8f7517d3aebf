#!/usr/bin/env bash
# The project's test command (README quick start, second command; .ci/run calls it).
# Installs what it needs (bootstrap-host.sh), builds the guest and lab-host images (cache hits when
# warm), then runs the linters and the pytest suite against the real QEMU, SSH and KVM.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash ci/bootstrap-host.sh
venv=${GMEMTEST_VENV:-$repo/.venv}
export PATH="$venv/bin:$PATH"

echo "== images (guest, lab host)"
python -m images build --json >/dev/null
gmemtest labhost image --json >/dev/null
python -m images qemu --json >/dev/null  # Debian's newest QEMU in its own root (the chain runs under it)
echo "== ruff"
ruff check .
echo "== mypy --strict (library packages)"
mypy host_stack qmp_helpers guests images gmemtest
echo "== pytest"
exec python -m pytest "$@"
