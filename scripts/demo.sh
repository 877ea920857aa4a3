#!/usr/bin/env bash
# Set up (or reuse) the environment, then train and evaluate a dictionary offline on the
# embedded default (`train --preset demo`): a small Pythia-architecture model trained here
# once and cached, and the standard library's docstrings. Extra arguments go to the train
# command (see `python -m dictionary_learning train --help`), e.g. --steps 300. Each run
# replaces the previous demo run in runs/demo (--overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${DL_VENV:-.venv}/bin/python" -m dictionary_learning train --preset demo --overwrite "$@"
