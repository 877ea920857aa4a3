"""``cache``: collect a model component's activations once into a cache folder (safetensors
shards plus manifest.json) that ``train --cache DIR`` trains any number of sweeps from.
One option per field of :class:`~dictionary_learning.cache.run.CacheRun`."""

from __future__ import annotations

import argparse
import dataclasses
import time
import typing

from ..cache.run import PRESETS, CacheRun, describe, run_cache
from .train import _add_field


def add_parser(sub) -> None:
    p = sub.add_parser("cache", help="collect activations once into a cache on disk (for "
                       "train --cache)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named set of defaults; 'demo' collects what train --preset demo "
                   "trains on, offline")
    p.add_argument("--resume", action="store_true",
                   help="continue the cache in --out after its last complete shard (a larger "
                   "--tokens extends a finished one)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the cache already in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    hints = typing.get_type_hints(CacheRun)
    for f in dataclasses.fields(CacheRun):
        _add_field(p, f, hints)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    names = {f.name for f in dataclasses.fields(CacheRun)}
    given = {k: v for k, v in vars(args).items() if k in names}
    cache_run = CacheRun(**{**(PRESETS[args.preset] if args.preset else {}), **given})
    print(f"Caching {', '.join(cache_run.submodule)} ({cache_run.io}) of {cache_run.model} "
          f"on {cache_run.data} into {cache_run.out}"
          + (" (resuming)" if args.resume else ""))
    manifest = run_cache(cache_run, resume=args.resume, overwrite=args.overwrite,
                         progress=not args.no_progress)
    from ..distributed import rank_and_world

    if rank_and_world()[0] != 0:
        return 0
    print(f"Wrote {describe(manifest, cache_run.out)}"
          + (" (the text ran out first)" if manifest["text_exhausted"] and cache_run.tokens
             and manifest["tokens"] < cache_run.tokens else ""))
    print(f"Train from it: python -m dictionary_learning train --cache {cache_run.out} ...")
    print(f"Done in {time.perf_counter() - start:.0f} s")
    return 0
