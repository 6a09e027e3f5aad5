#!/usr/bin/env bash
# stemst: one entry point for a fresh clone.
#   bash run.sh demo   set up, then run the main job end to end on real data (HER2ST)
#   bash run.sh test   set up, then run the test suite
# Setup: a virtual environment in .venv with the package and its test extras, installed by uv from PyPI.
# Data: $STEMST_DATA_DIR if set, else ../shared/data when it exists (the developers' and CI's local copy),
# else downloaded on first use into the OS cache (checksummed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
task="${1:-}"
shift || true
case "$task" in
  demo|test) ;;
  *) echo "usage: bash run.sh demo|test [extra arguments]" >&2; exit 2 ;;
esac

PY="${PYTHON:-python3}"
if ! "$PY" -m uv --version >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --disable-pip-version-check uv
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m uv venv --quiet --python "$("$PY" -c 'import sys; print(sys.executable)')" .venv
fi
"$PY" -m uv pip install --quiet --python .venv/bin/python -e ".[test]"

if [ -z "${STEMST_DATA_DIR:-}" ] && [ -d ../shared/data/her2st ]; then
  export STEMST_DATA_DIR="$(cd ../shared/data && pwd)"
fi
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

case "$task" in
  demo) exec .venv/bin/stemst demo "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
esac
