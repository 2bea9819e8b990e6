#!/usr/bin/env bash
# Install the project into ./.venv (created if missing) and run the whole test suite.
# This is the README's test command and what .ci/run calls on a clean checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# sam2 builds from source; its optional CUDA extension (video hole filling) is not needed.
SAM2_BUILD_CUDA=0 "$VENV/bin/python" -m pip install --quiet -r requirements.txt
export WANDB_MODE=offline WANDB_SILENT=true MPLBACKEND=Agg
set +e
# One xdist worker per CPU (at most 4); tests/conftest.py groups the tests so that each shared
# fixture is built on one worker only, and orders the groups so the long ones start first (kept in
# that order by --no-loadscope-reorder; xdist would otherwise order them by their number of tests).
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist loadgroup --no-loadscope-reorder "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
