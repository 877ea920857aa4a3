#!/usr/bin/env bash
# Create, or reuse, the project's virtual environment and install the package into it.
#
#   bash scripts/setup_env.sh          # prints nothing but pip's errors; exits non-zero on failure
#
# Environment: DL_VENV (default .venv), PYTHON (default python3), TORCH_SPEC (default
# torch==2.13.0, installed first and only when torch is missing, so pip never pulls a build
# you did not ask for). Reinstalls when pyproject.toml or requirements.txt change.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DL_VENV:-.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "Creating virtual environment in $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.dictionary_learning-$(cat pyproject.toml requirements.txt | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  echo "Installing dictionary_learning and its requirements into $venv (first run only)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "$venv/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" \
      || "$venv/bin/python" -m pip install -q torch
  fi
  "$venv/bin/python" -m pip install -q -e ".[test]"
  rm -f "$venv"/.dictionary_learning-*
  touch "$stamp"
fi
