#!/usr/bin/env bash
# The main job (README quick start, first command): the default Avocado suite against the
# built-in default guest. Installs what it needs first. Extra arguments go to `avocado run`.
#
# Environment (optional):
#   GMEMTEST_RESULTS    job results directory (default: <repo>/results)
#   GMEMTEST_PARALLEL   --max-parallel-tasks (default: 2; each guest runs one TCG vCPU thread)
#   GMEMTEST_JOB_TIMEOUT --job-timeout in seconds (default: 1500): a hung job ends, it never
#                        outlives CI; each test also has its own timeout
#   GMEMTEST_GUEST_MANIFEST the guest image every test uses (default: the one built here)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash ci/bootstrap-host.sh
venv=${GMEMTEST_VENV:-$repo/.venv}
export PATH="$venv/bin:$PATH"
results=${GMEMTEST_RESULTS:-$repo/results}
parallel=${GMEMTEST_PARALLEL:-2}
job_timeout=${GMEMTEST_JOB_TIMEOUT:-1500}

# Resolve the guest image once for the whole job: every test loads this manifest (its key and
# output hashes checked) instead of asking apt again. A GMEMTEST_GUEST_MANIFEST of the caller wins.
manifest=$(python -m images build --json | python -c 'import json, sys; print(json.load(sys.stdin)["manifest"])')
export GMEMTEST_GUEST_MANIFEST=${GMEMTEST_GUEST_MANIFEST:-$manifest}
gmemtest labhost image --json >/dev/null  # the L1 of the labhost tests
python -m images qemu --json >/dev/null   # Debian's newest QEMU in its own root (the chain runs under it)
status=0
avocado run --max-parallel-tasks="$parallel" --job-timeout "$job_timeout" --job-results-dir "$results" \
    avocado_tests/ "$@" || status=$?
latest=$(readlink -f "$results/latest" 2>/dev/null || true)
echo "results: ${latest:-$results}"
[ -n "$latest" ] && echo "html: $latest/results.html"
exit "$status"
