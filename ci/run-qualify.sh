#!/usr/bin/env bash
# The qualification step of the lab pipelines (ci/gitlab-ci.yml, ci/Jenkinsfile,
# ci/github-workflow.yml): `gmemtest qualify --out DIR`, leaving DIR/qualification.json and
# DIR/qualification.html. Exit status as a pipeline needs it: FAILED (1) and errors fail the
# step; INCOMPLETE (3: a check could not run on this host, its reason is in the report) passes,
# like an Avocado CANCEL. Extra arguments go to `gmemtest qualify` (e.g. --qemu PATH --firmware PATH).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${1:?usage: ci/run-qualify.sh OUT_DIR [gmemtest qualify options]}
shift
bash ci/bootstrap-host.sh
venv=${GMEMTEST_VENV:-$repo/.venv}
status=0
"$venv/bin/gmemtest" qualify --out "$out" "$@" || status=$?
if [ "$status" -eq 3 ]; then
    echo "qualification INCOMPLETE: some checks cannot run on this host (see $out/qualification.html)"
    exit 0
fi
exit "$status"
