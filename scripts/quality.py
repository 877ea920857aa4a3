"""Training quality on the demo LM: every architecture at 3+ sparsities, one budget.

    .venv/bin/python scripts/quality.py                 # issue 19's budget, all architectures
    .venv/bin/python scripts/quality.py --arch relu topk --steps 300
    PYTHONPATH=/tmp/up .venv/bin/python scripts/quality.py --arch relu upstream-relu

(``upstream-relu``: upstream's ReLU trainer on the same rows; see
``dictionary_learning.measure.quality.UPSTREAM`` for how to make its package importable.)

Writes the table (JSON, printed as Markdown) and the frontier plot (FVE and CE recovered
against L0). The logic is :mod:`dictionary_learning.measure.quality`.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dictionary_learning.measure.quality import (SWEEP, UPSTREAM, QualitySetup,  # noqa: E402
                                                 format_table, run_quality, write_report)


def main(argv=None) -> int:
    defaults = QualitySetup()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(defaults.archs),
                        choices=[*SWEEP, UPSTREAM],
                        help=f"architectures to train (default: all of ours; {UPSTREAM}: "
                             "upstream's StandardTrainer on the same rows, when its package "
                             "is importable as upstream_dl)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--expansion", type=int, default=defaults.expansion)
    parser.add_argument("--alive-rows", type=int, default=defaults.alive_rows,
                        help="count features alive on the run's last this many training "
                             "activations too (default: %(default)s; 0: only on the "
                             "held-out documents)")
    parser.add_argument("--json", default="runs/quality/quality.json",
                        help="where the table goes (default: %(default)s)")
    parser.add_argument("--png", default="runs/quality/quality.png",
                        help="where the plot goes (default: %(default)s; the README's is "
                             "docs/quality.png)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        setup = QualitySetup(steps=args.steps, batch_size=args.batch_size,
                             expansion=args.expansion, alive_rows=args.alive_rows,
                             archs=tuple(args.arch))
    except ValueError as e:
        parser.error(str(e))
    report = run_quality(setup, progress=True,
                         on_progress=lambda r: write_report(r, args.json, args.png))
    print(format_table(report))
    print(f"table: {args.json}  plot: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
