"""``train``: train (a sweep of) dictionaries on a model component, then evaluate them on
held-out text. One option per field of :class:`~dictionary_learning.train_run.TrainRun`;
comma-separated values sweep (``--l1 1e-3,3e-3 --expansion 8,16``)."""

from __future__ import annotations

import argparse
import dataclasses
import time
import typing
from pathlib import Path

from ..loading import read_config
from .next_steps import next_steps_text
from ..train_run import PRESETS, TrainRun, read_run_args, run_training
from ..training import TrainingInterrupted
from .common import CLIError, format_table

# What --resume may change from the saved arguments: how long, where, how often to save.
RESUMABLE = {"steps", "tokens", "save_steps", "device", "eval_texts", "eval_loss_texts",
             "on_nonfinite", "max_skips"}


def _parse_list(kind):
    def parse(text: str):
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def _optional(kind):
    return lambda text: None if text.lower() == "none" else kind(text)


def _add_field(p: argparse.ArgumentParser, f: dataclasses.Field, hints: dict) -> None:
    flag = "--" + f.name.replace("_", "-")
    flags = (flag, *f.metadata.get("flags", ()))
    default = "" if f.default in ((), None) else f" (default: {_show(f.default)})"
    kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"] + default)
    hint = hints[f.name]
    args = typing.get_args(hint)
    if hint is bool:
        p.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
    elif typing.get_origin(hint) is tuple:
        p.add_argument(*flags, type=_parse_list(args[0]), metavar="V[,V...]", **kwargs)
    elif type(None) in args:
        p.add_argument(*flags, type=_optional(args[0]), **kwargs)
    else:
        p.add_argument(*flags, type=hint, **kwargs)


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train dictionaries on a model component and evaluate "
                       "them on held-out text", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named set of defaults; 'demo' runs offline (a small model trained "
                   "here once and cached, and the standard library's docstrings)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --save-dir from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --save-dir (without it, a new run "
                   "refuses a folder that holds one)")
    p.add_argument("--entropy", dest="entropy_penalty", type=_parse_list(float),
                   default=argparse.SUPPRESS, metavar="V[,V...]",
                   help="entropy penalty coefficients instead of --l1 (relu dictionaries)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    hints = typing.get_type_hints(TrainRun)
    for f in dataclasses.fields(TrainRun):
        _add_field(p, f, hints)
    p.set_defaults(func=run)


def resolve_run(args: argparse.Namespace) -> TrainRun:
    """The :class:`TrainRun` the arguments ask for: the preset's values, then the options
    given; with ``--resume``, the saved run's arguments and the few options it may change."""
    names = {f.name for f in dataclasses.fields(TrainRun)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "entropy_penalty" in args:
        if "sparsity_penalty" in given:
            raise CLIError("give --l1 or --entropy, not both")
        given.update(sparsity_penalty=args.entropy_penalty, penalty="entropy")
    base = dict(PRESETS[args.preset]) if args.preset else {}
    if args.resume:
        save_dir = given.get("save_dir", base.get("save_dir", TrainRun.save_dir))
        saved = read_run_args(save_dir)
        changed = sorted(k for k, v in given.items()
                         if k not in RESUMABLE | {"save_dir"} and saved.get(k) != v)
        if changed:
            raise CLIError(f"--resume continues the run saved in {save_dir}; it cannot change "
                           f"{', '.join('--' + c.replace('_', '-') for c in changed)} "
                           f"(only {', '.join(sorted(RESUMABLE))})")
        base = saved
    return TrainRun(**{**base, **given})


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    train_run = resolve_run(args)
    from ..distributed import init_from_environment, rank_and_world

    init_from_environment(train_run.device)  # under torchrun: join the other processes
    rank, world = rank_and_world()
    shown = train_run
    if train_run.cache is not None:  # the model and submodule are the cache's
        from ..cache.run import fit_run_to_cache

        shown, manifest = fit_run_to_cache(train_run)
        if shown.submodule == type(shown).submodule and len(manifest["submodules"]) == 1:
            shown = shown.replace(submodule=manifest["submodules"][0])
    if rank == 0:
        print(f"Training on {shown.submodule} of {shown.model} "
              f"({'resuming' if args.resume else 'new run'}; output in {train_run.save_dir})"
              + (f" on {world} processes ("
                 f"{'dictionary' if train_run.shard_dictionaries else 'data'} parallel)"
                 if world > 1 else ""))
    try:
        result = run_training(train_run, resume=args.resume, progress=not args.no_progress,
                              overwrite=args.overwrite)
    except TrainingInterrupted as e:
        if e.folders:
            raise KeyboardInterrupt(f"{e}; continue it with: --resume --save-dir "
                                    f"{train_run.save_dir}") from None
        raise
    if rank != 0:  # rank 0 reports
        return 0
    rows = []
    for folder, config, m in zip(result.folders, result.configs, result.metrics):
        rows.append({
            "dictionary": str(folder), "class": config.dict_class,
            "size": config.dict_size, **_knob(config), "mse": m["mse"], "l0": m["l0"],
            "% alive": 100 * m["frac_alive"], "FVE": m["frac_variance_explained"],
            "% loss rec.": 100 * m["frac_recovered"],
        })
    first = result.metrics[0]
    print(f"\nEvaluation on held-out text ({first['n_eval_texts']:,} documents never trained "
          f"on: {first['n_tokens']:,} tokens; loss recovered on {first['n_loss_tokens']:,} "
          "token predictions)")
    print(format_table(rows))
    print(f"\nlosses (nats/token): clean {first['loss_clean']:.4f}, zero-ablated "
          f"{first['loss_zero']:.4f}, patched " + ", ".join(
              f"{m['loss_patched']:.4f}" for m in result.metrics))
    for folder in result.folders:
        n = read_config(folder).get("run", {}).get("skipped_steps")
        if not n:
            continue
        print(f"\n{folder}: {n} training step(s) skipped (batch, loss or gradients not finite)")
    written = sorted(p.name + ("/" if p.is_dir() else "")
                     for p in Path(result.folders[0]).iterdir() if not p.name.startswith("."))
    print("\nWrote, per dictionary: " + ", ".join(written))
    for folder in result.folders:
        print(f"  {folder}/")
    print(next_steps_text(shown, result.folders))
    print(f"\nDone in {time.perf_counter() - start:.0f} s")
    return 0


def _knob(config) -> dict:
    """The hyperparameter that sets the sparsity of a dictionary, for the table."""
    if "k" in config.dict_kwargs:
        return {"sparsity": f"k={config.dict_kwargs['k']}"}
    if "target_l0" in config.dict_kwargs:
        return {"sparsity": f"L0->{config.dict_kwargs['target_l0']:g}"}
    return {"sparsity": f"{config.penalty}={config.sparsity_penalty:g}"}
