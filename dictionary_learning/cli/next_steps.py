"""The commands that follow a training run, printed at its end so that they paste as is.

They name the interpreter that ran the training (``.venv/bin/python`` after
``scripts/demo.sh``), so they work without activating the virtual environment, and the
run's own folder, text and text field::

    .venv/bin/python -m dictionary_learning evaluate runs/demo --data stdlib --n-tokens 4096
    .venv/bin/python -m dictionary_learning analyze runs/demo --data stdlib --n-tokens 20000 --out runs/demo-analysis
    .venv/bin/python -m dictionary_learning viewer runs/demo-analysis
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

ANALYZE_TOKENS = 20_000
"""Tokens the suggested ``analyze`` reads: enough for top contexts of most live features,
seconds on the demo dictionaries."""


def python_command(executable: str | None = None, cwd: str | Path | None = None) -> str:
    """How to call this interpreter from ``cwd``: its path relative to ``cwd`` when it lies
    inside (``.venv/bin/python``), else its absolute path."""
    exe = Path(executable or sys.executable)
    here = Path(cwd or os.getcwd())
    try:
        return shlex.quote(str(exe.relative_to(here)))
    except ValueError:
        return shlex.quote(str(exe))


def next_commands(run, folders: list[Path], executable: str | None = None) -> list[str]:
    """``evaluate`` (every dictionary of the run), ``analyze`` (the first) and ``viewer``
    command lines for the folders a run of ``run`` (a ``TrainRun``) wrote."""
    python = f"{python_command(executable)} -m dictionary_learning"
    text = ["--data", run.data] + (["--text-field", run.text_field]
                                   if run.text_field != "text" else [])
    first = Path(folders[0])
    out = Path(f"{Path(run.save_dir)}-analysis")
    quote = " ".join
    evaluate = quote(shlex.quote(str(f)) for f in folders)
    return [
        f"{python} evaluate {evaluate} {quote(map(shlex.quote, text))} --n-tokens 4096",
        f"{python} analyze {shlex.quote(str(first))} {quote(map(shlex.quote, text))} "
        f"--n-tokens {ANALYZE_TOKENS} --out {shlex.quote(str(out))}",
        f"{python} viewer {shlex.quote(str(out))}",
    ]


def next_steps_text(run, folders: list[Path]) -> str:
    """The end-of-run paragraph: where to run the commands from, and the commands."""
    lines = next_commands(run, folders)
    notes = ["   # MSE, L0, FVE, loss recovered", "   # top contexts, logit effects",
             "   # then open the address it prints"]
    return (f"\nNext (from {os.getcwd()}; no need to activate the environment):\n"
            + "\n".join(f"  {line}{note}" for line, note in zip(lines, notes)))
