#!/usr/bin/env bash
# Set up (or reuse) the environment, then train and evaluate a dictionary offline on the
# embedded default: a small locally built model and the standard library's docstrings.
# Extra arguments go to `python -m dictionary_learning demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${DL_VENV:-.venv}/bin/python" -m dictionary_learning demo "$@"
