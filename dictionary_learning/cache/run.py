"""A cache run from names (what ``python -m dictionary_learning cache`` takes) and the
``train --cache`` side: a :class:`~dictionary_learning.train_run.TrainRun` made to fit the
cache it reads.

    model, text -> held-out docs skipped | the rest -> write_cache -> DIR/manifest.json
                                                                     DIR/shard_*.safetensors
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from ..train_run import _opt  # one field helper for both run dataclasses
from .manifest import CacheError, human_bytes, read_manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheRun:
    """One cache to write. The model, text and collection options mean what they mean for
    ``train`` (:class:`~dictionary_learning.train_run.TrainRun`)."""

    model: str = _opt("EleutherAI/pythia-70m-deduped",
                      "HF hub id or local folder of the language model; 'demo' for the "
                      "small offline model")
    submodule: tuple[str, ...] = _opt(("1.mlp",), "submodule(s), collected in one forward "
                                      "pass: dotted paths or LAYER.COMPONENT")
    io: str = _opt("out", "which activation: out, in, or in_to_out")
    data: str = _opt("monology/pile-uncopyrighted",
                     "HF dataset name (streamed), a local .jsonl/.jsonl.zst/.txt file or "
                     "folder, or 'stdlib'")
    text_field: str = _opt("text", "field of a JSON row or dataset column holding the text")
    tokens: int | None = _opt(None, "activations (tokens) to collect; default: until the text "
                              "runs out")
    out: str = _opt("runs/cache", "output folder")
    ctx_len: int = _opt(128, "tokens per context")
    refresh_batch_size: int = _opt(32, "texts per forward pass")
    pack: bool = _opt(False, "pack documents into full ctx_len windows")
    remove_bos: bool = _opt(False, "drop the first real token of every context")
    dtype: str = _opt("float32", "dtype of the model")
    store_dtype: str | None = _opt(None, "dtype of the stored activations (bfloat16 or "
                                   "float16 halve the disk; default: --dtype)")
    shard_mb: float = _opt(256.0, "MiB per shard")
    skip_texts: int = _opt(256, "documents at the start of the text left out of the cache: "
                           "train's held-out evaluation documents (--eval-texts)")
    device: str = _opt("cpu", "device of the model")

    def __post_init__(self):
        from ..sources import check_device, torch_dtype

        for name in ("tokens", "ctx_len", "refresh_batch_size", "shard_mb"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.skip_texts < 0:
            raise ValueError(f"--skip-texts must be 0 or more, got {self.skip_texts}")
        if not self.submodule:
            raise ValueError("--submodule is empty: name at least one")
        if self.io not in ("out", "in", "in_to_out"):
            raise ValueError(f"--io must be out, in or in_to_out, got {self.io!r}")
        torch_dtype(self.dtype)
        if self.store_dtype is not None:
            torch_dtype(self.store_dtype)
        check_device(self.device)


PRESETS = {"demo": dict(model="demo", data="stdlib", submodule=("1.mlp",), pack=True,
                        refresh_batch_size=16, skip_texts=150, out="runs/demo_cache"),
           "demo-quick": dict(model="demo-quick", data="stdlib", submodule=("1.mlp",),
                              pack=True, refresh_batch_size=16, skip_texts=150,
                              out="runs/demo-quick_cache")}
"""``demo`` (``demo-quick``): the activations ``train --preset demo`` (``demo-quick``)
trains on (offline)."""


def run_cache(run: CacheRun, resume: bool = False, overwrite: bool = False,
              progress: bool = True, announce=print) -> dict:
    """Write the cache ``run`` describes; returns its manifest. ``announce`` is told the
    expected disk use before the collection starts. Under torchrun each process collects
    from every world-th document (after the skipped ones) into its own shards, and rank 0
    merges the parts into one manifest."""
    from ..sources import open_texts, torch_dtype
    from ..submodules import resolve_submodule, submodule_path
    from ..train_run import open_model
    from .writer import write_cache

    from ..distributed import barrier, init_from_environment, rank_and_world, rank_device

    init_from_environment(run.device)  # under torchrun: each process writes its own part
    rank, world = rank_and_world()
    part = None if world == 1 else (rank, world)
    model = open_model(run.model, rank_device(run.device), run.dtype,
                       progress=progress and rank == 0)
    submodules = [submodule_path(model, s) for s in run.submodule]
    for s in submodules:
        resolve_submodule(model, s)  # an unknown name fails here, with nearest names
    texts = islice(open_texts(run.data, text_field=run.text_field), run.skip_texts + rank,
                   None, world)
    tokens = run.tokens
    if tokens is not None and world > 1:  # the first tokens % world parts take one more
        tokens = tokens // world + (rank < tokens % world)
    info = {"model": run.model, "model_dtype": run.dtype, "data": run.data,
            "text_field": run.text_field, "skip_texts": run.skip_texts,
            "submodule_args": list(run.submodule)}
    manifest = write_cache(
        run.out, model, texts, submodules if len(submodules) > 1 else submodules[0],
        tokens=tokens, io=run.io, ctx_len=run.ctx_len,
        refresh_batch_size=run.refresh_batch_size, pack=run.pack, remove_bos=run.remove_bos,
        dtype=torch_dtype(run.store_dtype or run.dtype), shard_mb=run.shard_mb, resume=resume,
        overwrite=overwrite, info=info, progress=progress and rank == 0,
        announce=announce if rank == 0 else None, part=part)
    if part is None:
        return manifest
    barrier()  # every part is complete
    if rank == 0:
        from .writer import merge_parts

        manifest = merge_parts(run.out, world)
    barrier()
    return read_manifest(run.out)


# TrainRun fields a cache fixes, and the manifest key holding each.
_FROM_CACHE = {"model": "model", "data": "data", "text_field": "text_field", "io": "io",
               "ctx_len": "ctx_len", "pack": "pack", "dtype": "model_dtype"}


def fit_run_to_cache(run):
    """``run`` (a TrainRun with ``cache`` set) with the model, text and collection options
    of its cache. A value given that differs from the cache's is an error (its default is
    simply replaced)."""
    from ..train_run import TrainRun

    manifest = read_manifest(run.cache)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainRun)}
    changes, clashes = {}, []
    for name, key in _FROM_CACHE.items():
        if key not in manifest:
            continue
        ours, theirs = getattr(run, name), manifest[key]
        if ours != theirs and ours != defaults[name]:
            clashes.append(f"--{name.replace('_', '-')} {ours} (the cache has {theirs})")
        changes[name] = theirs
    if clashes:
        raise CacheError(f"the cache {run.cache} was collected differently: "
                         f"{'; '.join(clashes)}: omit these options with --cache")
    skipped = manifest.get("skip_texts")
    if skipped is not None and run.eval_texts > skipped:
        raise CacheError(f"the cache {run.cache} left out only the first {skipped} documents, "
                         f"so --eval-texts {run.eval_texts} would evaluate on text it holds: "
                         f"give --eval-texts {skipped} or less"
                         + (f" (and --eval-loss-texts {skipped} or less)"
                            if run.eval_loss_texts > skipped else ""))
    return run.replace(**changes), manifest


def cache_submodule(run, manifest: dict, model) -> str:
    """Which of the cache's submodules ``run`` trains on (its ``--submodule``, or the
    cache's only one)."""
    from ..submodules import submodule_path
    from ..train_run import TrainRun

    names = manifest["submodules"]
    if run.submodule == TrainRun.submodule and len(names) == 1:
        return names[0]
    wanted = submodule_path(model, run.submodule)
    if wanted not in names:
        raise CacheError(f"the cache {run.cache} holds {', '.join(names)}, not {wanted}: "
                         "give --submodule one of those")
    return wanted


def describe(manifest: dict, folder: str | Path) -> str:
    total = sum(s["bytes"] for s in manifest["shards"])
    return (f"{manifest['tokens']:,} tokens of {', '.join(manifest['submodules'])} "
            f"({manifest['io']}, {manifest['dtype']}) in {len(manifest['shards'])} shards, "
            f"{human_bytes(total)}, {manifest['bytes_per_token']:,} bytes per token, in "
            f"{folder}")
