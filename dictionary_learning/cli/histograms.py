"""``histograms``: feature-frequency histograms of saved dictionaries, as PNG files."""

from __future__ import annotations

import argparse
import os
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
    if args.out is not None:
        out = Path(args.out).expanduser()
        check_writable(out)
        if args.grid and (out / name).is_dir():
            raise CLIError(f"{out / name} is a folder: pass another --grid-name")


BESIDE_NAME = "frequency_histogram.png"
"""The PNG written into each dictionary's folder when no ``--out`` is given (train's own
``feature_frequencies.png`` there is left as it is)."""


def png_paths(args: argparse.Namespace, paths: list[Path], names: list[str]) -> list[Path]:
    """Where each dictionary's PNG goes (with ``--grid``: the grid, for every one): under
    ``--out``, else beside the dictionary (the grid: in the dictionaries' common folder)."""
    folders = [p if p.is_dir() else p.parent for p in paths]
    if args.grid:
        root = Path(args.out).expanduser() if args.out is not None else \
            Path(os.path.commonpath([f.resolve() for f in folders]))
        return [root / args.grid_name] * len(paths)
    if args.out is not None:
        return [Path(args.out).expanduser() / file_name(n) for n in names]
    return [f / BESIDE_NAME for f in folders]


def run(args: argparse.Namespace) -> int:
    from ..evaluation import feature_frequency_histogram
    from ..frequency_plots import frequency_grid

    check_arguments(args)
    paths, results = assessed(args, loss=False)
    names = [display_name(path, paths, args.dict_dirs) for path in paths]
    pngs = dict(zip(paths, png_paths(args, paths, names)))
    for folder in {png.parent for png in pngs.values()}:
        check_writable(folder)
    rows, panels = [], {}
    # Every dictionary is measured before any file is written: a dictionary that fails
    # leaves the output folder as it was.
    for path, target, metrics, info in results:
        name = display_name(path, paths, args.dict_dirs)
        title = f"{name}\n{target.submodule}, {info['activation_dim']}->{info['dict_size']}"
        png = pngs[path]
        panels[title] = (png, metrics.pop("feature_frequencies"), metrics["n_tokens"])
        rows.append({"dictionary": name, "% alive": 100 * metrics["frac_alive"],
                     "L0": metrics["l0"], "tokens": metrics["n_tokens"], "png": str(png)})
        print(f"measured {name} ({len(rows)}/{len(paths)})", file=sys.stderr)
    if args.grid:
        frequency_grid({title: freqs for title, (_, freqs, _) in panels.items()},
                       next(iter(pngs.values())), columns=args.columns)
    else:
        for title, (png, freqs, n_tokens) in panels.items():
            feature_frequency_histogram(freqs, png, title=title, n_tokens=n_tokens)
    print(format_table(rows))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("histograms", help="write feature-frequency histograms (one PNG per "
                       "dictionary, or one grid) for dictionary folders",
                       description="Measure how often each feature fires on --n-tokens "
                       "held-out tokens and write log-frequency histograms: one PNG per "
                       f"dictionary (beside it as {BESIDE_NAME}, or under --out named after "
                       "its path relative to the common folder), or one grid PNG with --grid.")
    add_measure_arguments(p)
    p.add_argument("--out", default=None, help="output folder (default: each PNG beside its "
                   f"dictionary, as {BESIDE_NAME}; the grid in the dictionaries' common folder)")
    p.add_argument("--grid", action="store_true", help="one PNG with a panel per dictionary")
    p.add_argument("--grid-name", default="feature_frequencies_grid.png",
                   help="file name of the grid (default: %(default)s)")
    p.add_argument("--columns", type=int, default=None, help="grid columns (default: up to 4)")
    p.set_defaults(func=run)
