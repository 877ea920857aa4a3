"""``evaluate``: metrics of saved dictionaries on held-out text (or an activation cache's
rows), one table row each."""

from __future__ import annotations

import argparse
import os
import sys
from itertools import chain, islice
from pathlib import Path

from ..sources import SourceError, load_model, open_texts
from .common import CLIError, format_table, write_json

DEFAULT_DATA = "monology/pile-uncopyrighted"


def add_measure_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by the commands that measure saved dictionaries."""
    p.add_argument("dict_dirs", nargs="+", metavar="DICT_DIR",
                   help="a dictionary folder (ae.pt + optional config.json), a foreign-format "
                   "dictionary, or a folder tree: every dictionary under it is measured")
    g = p.add_argument_group("what the dictionaries read (default: what config.json records)")
    g.add_argument("--model", help="HF hub id or local model folder")
    g.add_argument("--submodule", help="dotted submodule path (gpt_neox.layers.1.mlp), or a layer and "
                   "component (1.mlp, 3.attn, 2.resid) or embed")
    g.add_argument("--io", choices=("out", "in", "in_to_out"), help="submodule output, input "
                   "or both (default: config's buffer.io, else out)")
    g.add_argument("--ctx-len", type=int, help="tokens per context (default: config's "
                   "buffer.ctx_len, else 128)")
    g.add_argument("--activation-dim", type=int, help="width check, or the width of a "
                   "weightless dictionary (IdentityDict)")
    g.add_argument("--dict-size", type=int, help="number of features, checked against the weights")
    g.add_argument("--dict-class", help="dictionary class of an ae.pt whose config.json names "
                   "none, e.g. BatchTopKSAE (default: from config.json or the weights' keys)")
    g.add_argument("--load-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for reading another tool's format, e.g. "
                   "hookpoint=layers.3.mlp (a sparsify folder of several hookpoints) or "
                   "norm_scaling_factor=0.37 (SAELens expected_average_only_in); repeatable")
    d = p.add_argument_group("held-out text")
    d.add_argument("--data", default=None, help="'stdlib', a local .jsonl/.jsonl.zst/"
                   f".txt file or folder, or a HF dataset name (default: the text the run was "
                   f"trained on, from its train_args.json; else {DEFAULT_DATA}, streamed; "
                   "with --cache, the text the cache was collected from)")
    d.add_argument("--skip-texts", type=int, default=0, help="skip this many documents first, "
                   "e.g. those a training run read (default: 0)")
    d.add_argument("--n-tokens", type=int, default=8192,
                   help="activations for the reconstruction metrics; with --cache, its first "
                   "rows in order (default: %(default)s)")
    d.add_argument("--cache", metavar="DIR", default=None,
                   help="read the activations from this activation cache (written by the "
                   "`cache` command) instead of running the model on --data: no model is "
                   "opened for them. It must hold the dictionaries' submodule, io and width. "
                   "Metrics that patch the model still run on --data")
    d.add_argument("--batch-size", type=int, default=32,
                   help="texts per forward pass (default: %(default)s)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="model dtype (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the activation sampling")


# -- checks made before any model is opened or dictionary read --------------------------------
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.manual_seed accepts


def check_at_least(args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """Each flag in ``minimums`` (argument name -> smallest allowed value) that was given
    (not ``None``) must be at least that value."""
    for name, low in minimums.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            flag = "--" + name.replace("_", "-")
            what = {0: "0 or more", 1: "a positive number"}.get(low, f"{low} or more")
            raise CLIError(f"{flag} must be at least {low}, got {value}: pass {what}")


def check_seed(seed: int) -> None:
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise CLIError(f"--seed {seed} is out of range: pass an integer from 0 to 2**64 - 1")


def check_memory(n_bytes: int, what: str, fix: str) -> None:
    """:func:`dictionary_learning.buffer.check_memory` on the CPU, imported only when a
    command checks (the command line starts without torch)."""
    from ..buffer import check_memory as check

    check(n_bytes, what, fix)


def check_output_file(path: str | None, flag: str) -> None:
    """``path`` (``None`` or ``-``: stdout) can be written: not a folder, and its folder
    writable. Creates nothing."""
    from ..files import check_writable

    if path in (None, "-"):
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise CLIError(f"{flag} {path} is a folder: pass a file path such as "
                       f"{p / 'results.json'}")
    check_writable(p.parent)


def _config_width(path: Path) -> int | None:
    """The input width a dictionary's config records (no weights are read), if any."""
    from ..assess import folder_config

    config = folder_config(path)
    sections = [config.get("trainer", {}), config.get("buffer", {}), config]
    for section in sections:
        for key in ("activation_dim", "d_submodule", "d_in"):
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def check_device_flags(args: argparse.Namespace) -> None:
    """``--device`` (a device this machine has; normalised, e.g. ``CPU`` -> ``cpu``) and
    ``--dtype``, when given."""
    from ..sources import check_device, torch_dtype

    if getattr(args, "device", None) is not None:
        args.device = str(check_device(args.device))
    if getattr(args, "dtype", None) is not None:
        torch_dtype(args.dtype)


def check_measure_arguments(args: argparse.Namespace, loss: bool) -> None:
    """The flags of :func:`add_measure_arguments` (and ``--n-loss-texts`` when the loss is
    measured), before anything is read."""
    check_at_least(args, {"ctx_len": 1, "activation_dim": 1, "dict_size": 1, "skip_texts": 0,
                          "n_tokens": 1, "batch_size": 1})
    if loss:
        check_at_least(args, {"n_loss_texts": 1})
    check_seed(args.seed)
    check_device_flags(args)
    load_options(args.load_option)
    if args.dict_class is not None:
        from .. import registry

        registry.get_dictionary_class(args.dict_class)


def check_measure_memory(args: argparse.Namespace, paths: list[Path]) -> None:
    """The held-out activations (``--n-tokens`` rows of each dictionary's width, collected
    once in memory beside the buffer they come from) must fit in memory; a cache's are
    streamed. Reads only config files: a width no config records counts as 1."""
    from ..assess import read_target

    need = 0
    for path in paths:
        width = args.activation_dim or _config_width(path) or 1
        io = read_target(path, io=args.io).io
        need = max(need, 2 * args.n_tokens * width * 4 * (2 if io == "in_to_out" else 1))
    if args.cache is None:  # a cache's rows are read from disk batch by batch
        check_memory(need, f"--n-tokens {args.n_tokens:,} (held-out activations)",
                     "pass a smaller --n-tokens")


def run_data(paths: list[Path]) -> str | None:
    """The text the dictionaries at ``paths`` were trained on, from their runs'
    ``train_args.json`` (said on stderr), when every one names the same; ``None`` when
    none does. Training kept its first ``eval_texts`` documents aside, so reading from
    the start (``--skip-texts 0``) measures on held-out text first."""
    from ..session import ARGS_NAME, run_args

    found = {}
    for path in paths:
        args = run_args(path)
        if args.get("data"):
            found.setdefault(str(args["data"]), (path, args.get("eval_texts")))
    if not found:
        return None
    if len(found) > 1:
        raise CLIError(f"the dictionaries were trained on different text ({', '.join(found)}): "
                       "pass --data")
    (data, (path, held)), = found.items()
    folder = path if path.is_dir() else path.parent
    where = next((f / ARGS_NAME for f in (folder, folder.parent) if (f / ARGS_NAME).is_file()),
                 folder / ARGS_NAME)
    print(f"using --data {data} from {where}"
          + (f" (its first {held} documents were held out from training)" if held else "")
          + "; pass --data to choose other text", file=sys.stderr)
    return data


def _texts(spec: str, skip: int):
    """A fresh stream of ``spec``'s documents after the first ``skip``."""
    texts = islice(open_texts(spec), skip, None)
    first = next(texts, None)
    if first is None:
        raise CLIError(f"{spec} has no documents left after skipping the first {skip} "
                       "(--skip-texts): lower it or pass more data")
    return chain([first], texts)


def assessed(args: argparse.Namespace, loss: bool):
    """``(paths, iterator of (path, target, metrics, info))`` for the parsed arguments.
    With ``--cache`` the activation metrics read the cache; ``args.data`` is set to the
    text read (the cache's own by default), ``None`` when none is (a cache and no loss)."""
    import torch

    from ..assess import assess, find_dictionaries

    check_measure_arguments(args, loss)  # flags first: each refusal before any work
    paths = find_dictionaries(args.dict_dirs)
    check_measure_memory(args, paths)
    cache = None
    if args.cache is not None:
        from ..cache.contexts import open_cache

        cache = open_cache(Path(args.cache).expanduser())  # a bad cache fails here
    if args.data is None:
        args.data = (cache.manifest.get("data") or DEFAULT_DATA) if cache else \
            (run_data(paths) or DEFAULT_DATA)
    if cache is not None and not loss:
        args.data = None  # no text is read
    else:
        _texts(args.data, args.skip_texts)  # bad data fails before any model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def open_model(name: str):
        print(f"Loading {name} ...", file=sys.stderr)
        from ..demo_lm import demo_config

        if demo_config(name) is not None:  # an offline demo's model (`--preset demo...`)
            from ..train_run import open_model as open_demo

            return open_demo(name, device=device, dtype=args.dtype or "float32")
        try:
            return load_model(name, device=device, dtype=args.dtype)
        except SourceError as e:
            if cache is None:
                raise
            raise SourceError(f"{e} (the loss metrics need the model; pass --no-loss to "
                              "measure only the cache's activations)") from None

    overrides = {"model": args.model, "submodule": args.submodule, "io": args.io,
                 "ctx_len": args.ctx_len}
    widths = {"activation_dim": args.activation_dim, "dict_size": args.dict_size,
              **load_options(args.load_option)}
    results = assess(paths, open_model, lambda: _texts(args.data, args.skip_texts),
                     overrides=overrides, device=device, dict_class=args.dict_class,
                     widths=widths, n_tokens=args.n_tokens,
                     n_loss_texts=getattr(args, "n_loss_texts", 0), batch_size=args.batch_size,
                     loss=loss, seed=args.seed, cache=cache)
    return paths, results


def load_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings as keyword arguments of ``load_dictionary`` (numbers parsed)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"--load-option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = float(value)
        except ValueError:
            options[key] = value
    return options


def display_name(path: Path, paths: list[Path], given: list[str]) -> str:
    """``path`` relative to the common folder of ``paths``; when it is the only one, relative
    to the parent of the argument ``given`` that holds it (so a tree keeps its layout)."""
    path = path.resolve()
    if len(paths) > 1:
        return str(path.relative_to(os.path.commonpath([p.resolve() for p in paths])))
    for arg in map(lambda a: Path(a).resolve(), given):
        if path == arg or arg in path.parents:
            return str(path.relative_to(arg.parent))
    return path.name


def row(name: str, target, metrics: dict) -> dict:
    r = {"dictionary": name, "submodule": f"{target.submodule} ({target.io})",
         "MSE": metrics["mse"], "L1": metrics["l1"], "L0": metrics["l0"],
         "% alive": 100 * metrics["frac_alive"], "FVE": metrics["frac_variance_explained"]}
    if "frac_recovered" in metrics:
        r.update({"% loss rec.": 100 * metrics["frac_recovered"],
                  "loss clean": metrics["loss_clean"], "patched": metrics["loss_patched"],
                  "zero": metrics["loss_zero"]})
    if "kl_div" in metrics:
        r.update({"KL": metrics["kl_div"], "KL score": metrics["kl_score"]})
    r["tokens"] = metrics["n_tokens"]
    if "n_loss_tokens" in metrics:
        r["loss tokens"] = metrics["n_loss_tokens"]
    return r


def run(args: argparse.Namespace) -> int:
    check_output_file(args.json, "--json")
    paths, results = assessed(args, loss=not args.no_loss)
    rows, records = [], []
    to_stdout = args.json == "-"
    for path, target, metrics, info in results:
        metrics.pop("feature_frequencies")
        name = display_name(path, paths, args.dict_dirs)
        rows.append(row(name, target, metrics))
        records.append({"dictionary": name, "path": str(path), **info, "model": target.model,
                        "submodule": target.submodule, "io": target.io,
                        "ctx_len": target.ctx_len, "target_from": target.source,
                        "cache": args.cache, "data": args.data,
                        "skip_texts": args.skip_texts if args.data else None, **metrics})
        if not to_stdout and len(paths) > 1:
            print(f"evaluated {name} ({len(rows)}/{len(paths)})", file=sys.stderr)
    if not to_stdout:
        print(format_table(rows))
    if args.cache is not None:
        print(f"Activation metrics from the first rows of the cache {args.cache}, in order"
              + ("; loss recovered skipped (--no-loss): no model was opened" if args.no_loss
                 else f"; loss recovered on {args.data}"), file=sys.stderr)
    if args.json is not None:
        write_json(records, args.json)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate saved dictionaries (MSE, L1, L0, %% alive, "
                       "variance explained, %% loss recovered, KL) on held-out text",
                       description="Evaluate dictionary folders on held-out text: one table "
                       "row per dictionary; KL is the mean KL(clean || patched) of the "
                       "next-token distributions over real tokens, KL score 1 - KL / KL "
                       "with the activation zeroed. Activation metrics use --n-tokens real "
                       "tokens sampled from the documents of --data after the first "
                       "--skip-texts; "
                       "loss recovered uses the next --n-loss-texts documents. With --cache "
                       "DIR the activation metrics read the cache's first --n-tokens rows "
                       "instead, and loss recovered the first --n-loss-texts documents of "
                       "--data after --skip-texts (--no-loss: activations only, no model).")
    add_measure_arguments(p)
    p.add_argument("--n-loss-texts", type=int, default=64, help="documents for the "
                   "loss-recovered metric (default: %(default)s)")
    p.add_argument("--no-loss", action="store_true", help="skip the loss metrics (no patched "
                   "forward passes)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="also write the results as JSON to PATH; '--json' alone or '--json -' "
                   "prints only JSON to stdout")
    p.set_defaults(func=run)
