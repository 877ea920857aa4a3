"""``histograms``: feature-frequency histograms of saved dictionaries, as PNG files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..files import check_writable
from .common import CLIError, format_table
from .evaluate import add_measure_arguments, assessed, check_at_least, display_name


def file_name(name: str) -> str:
    """A flat file name for a dictionary's display name (``a/b/c`` -> ``a__b__c``)."""
    return name.replace("/", "__").replace("\\", "__") + ".png"


def check_arguments(args: argparse.Namespace) -> None:
    """This command's own flags and its output folder, before anything is read."""
    check_at_least(args, {"columns": 1})
    name = args.grid_name
    if not name or Path(name).name != name or name in (".", ".."):
        raise CLIError(f"--grid-name takes a file name such as feature_frequencies_grid.png, "
                       f"not {name!r}: choose the folder with --out")
    out = Path(args.out).expanduser()
    check_writable(out)
    if args.grid and (out / name).is_dir():
        raise CLIError(f"{out / name} is a folder: pass another --grid-name")


def run(args: argparse.Namespace) -> int:
    from ..evaluation import feature_frequency_histogram
    from ..frequency_plots import frequency_grid

    check_arguments(args)
    out = Path(args.out).expanduser()
    paths, results = assessed(args, loss=False)
    rows, panels = [], {}
    # Every dictionary is measured before any file is written: a dictionary that fails
    # leaves the output folder as it was.
    for path, target, metrics, info in results:
        name = display_name(path, paths, args.dict_dirs)
        title = f"{name}\n{target.submodule}, {info['activation_dim']}->{info['dict_size']}"
        panels[title] = (name, metrics.pop("feature_frequencies"), metrics["n_tokens"])
        png = out / (args.grid_name if args.grid else file_name(name))
        rows.append({"dictionary": name, "% alive": 100 * metrics["frac_alive"],
                     "L0": metrics["l0"], "tokens": metrics["n_tokens"], "png": str(png)})
        print(f"measured {name} ({len(rows)}/{len(paths)})", file=sys.stderr)
    if args.grid:
        frequency_grid({title: freqs for title, (_, freqs, _) in panels.items()},
                       out / args.grid_name, columns=args.columns)
    else:
        for title, (name, freqs, n_tokens) in panels.items():
            feature_frequency_histogram(freqs, out / file_name(name), title=title,
                                        n_tokens=n_tokens)
    print(format_table(rows))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("histograms", help="write feature-frequency histograms (one PNG per "
                       "dictionary, or one grid) for dictionary folders",
                       description="Measure how often each feature fires on --n-tokens "
                       "held-out tokens and write log-frequency histograms: one PNG per "
                       "dictionary (named after its path relative to the common folder), or "
                       "one grid PNG with --grid.")
    add_measure_arguments(p)
    p.add_argument("--out", default="histograms", help="output folder (default: %(default)s)")
    p.add_argument("--grid", action="store_true", help="one PNG with a panel per dictionary")
    p.add_argument("--grid-name", default="feature_frequencies_grid.png",
                   help="file name of the grid (default: %(default)s)")
    p.add_argument("--columns", type=int, default=None, help="grid columns (default: up to 4)")
    p.set_defaults(func=run)
