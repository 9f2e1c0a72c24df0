#!/usr/bin/env bash
# The test command of the README: installs what the tests need into .venv, then runs pytest.
#   bash tests/run.sh                 # the fast default set (what CI runs)
#   bash tests/run.sh -m slow         # the long end-to-end runs
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh dev
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
export TMPDIR=${TMPDIR:-/tmp}
set +e
python -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "no tests were collected"; exit 0; fi
exit $rc
