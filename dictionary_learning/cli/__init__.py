"""Command line: ``python -m dictionary_learning COMMAND ...`` (or ``dictionary-learning``).

Each command is a module of this package (``cli/train.py``, ``cli/evaluate.py``, ...) with
``add_parser(sub)``, which adds the command's parser and sets ``func`` to a function of the
parsed arguments returning an exit status; ``common.py`` holds what they share. Commands
parse arguments, call library functions and print results; the logic lives in the library.

Errors a user can fix (a bad path, an unknown submodule, a width mismatch, no network)
print one line, ``error: ...``, and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from ..cpu_memory import keep_freed_memory
from .common import USER_ERRORS, CLIError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dictionary_learning",
                                     description="Train, evaluate and inspect sparse "
                                     "autoencoders on language-model activations.")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "add_parser"):
            module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    keep_freed_memory()
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if args.debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return 2 if not isinstance(e, CLIError) else e.exit_code
    except KeyboardInterrupt as e:  # TrainingInterrupted says where its checkpoint is
        print(f"{e or 'interrupted'}", file=sys.stderr)
        return 130
