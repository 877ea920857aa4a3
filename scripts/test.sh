#!/usr/bin/env bash
# Set up (or reuse) the environment, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${DL_VENV:-.venv}/bin/python" -m pytest "$@"
