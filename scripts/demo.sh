#!/usr/bin/env bash
# Set up (or reuse) the environment, then train and evaluate a dictionary offline on the
# embedded default (`train --preset demo`): a small Pythia-architecture model trained here
# once and cached, and the standard library's docstrings. With --quick (first argument):
# `train --preset demo-quick`, a smaller cached model and fewer steps, into runs/demo-quick.
# Other arguments go to the train command (see `python -m dictionary_learning train --help`),
# e.g. --steps 300. Each run replaces the previous one in its folder (--overwrite). The
# train command ends by printing the commands that evaluate, analyze and view the result.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=demo
if [[ "${1:-}" == "--quick" ]]; then
    preset=demo-quick
    shift
fi
bash scripts/setup_env.sh
exec "${DL_VENV:-.venv}/bin/python" -m dictionary_learning train --preset "$preset" --overwrite "$@"
