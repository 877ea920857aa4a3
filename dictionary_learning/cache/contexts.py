"""Reading an activation cache back in text order, for evaluation and analysis.

    shards, in order -> the rows of the hook(s) a dictionary reads      (CacheRows: metrics)
                     -> contexts rebuilt from ``positions``, left-padded
                        into [B, T] batches with their token ids        (context_batches:
                                                                         top contexts)

A context starts at the cache's first row and wherever ``positions`` does not grow by one
(:mod:`.manifest`); it may continue from one shard into the next. Rows inside a context
keep their order, so a batch of rebuilt contexts holds the rows the buffer collected from
the same forward batch, in the same row-major order (the real tokens of ``[B, T]``).

:func:`fitting_keys` says which tensors of a cache a dictionary reads, and refuses in one
error naming every difference a cache of another submodule, io or width.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from ..buffer import KINDS
from ..submodules import COMPONENTS, submodule_path
from .manifest import CacheError, hook_key
from .reader import Cache

TOKEN_KEYS = ["token_ids", "positions"]


def open_cache(cache: str | Path | Cache) -> Cache:
    """``cache`` opened for reading (a :class:`Cache` is returned as it is)."""
    return cache if isinstance(cache, Cache) else Cache(cache)


def is_short_name(spec: str) -> bool:
    """``"embed"`` or ``LAYER.COMPONENT`` (``"1.mlp"``): a name only the model resolves."""
    layer, _, component = spec.partition(".")
    return spec == "embed" or (layer.isdigit() and component in COMPONENTS)


def resolve_name(spec: str, manifest: dict, model=None) -> str:
    """The dotted path of the submodule ``spec`` names: ``spec`` when the cache holds it,
    else the model's path for it when a model is given, else the cache's own name for a
    short name it was written with (``"1.mlp"`` -> ``"gpt_neox.layers.1.mlp"``); else
    ``spec`` unchanged (:func:`fitting_keys` then says it differs)."""
    names = manifest["submodules"]
    if spec in names:
        return spec
    if model is not None:
        return submodule_path(model, spec)
    given = manifest.get("submodule_args") or []
    if len(given) == len(names) and spec in given:
        return names[given.index(spec)]
    return spec


def fitting_keys(cache: Cache, submodule: str, io: str, dictionary=None,
                 where: str = "the dictionary") -> list[str]:
    """The cache's tensor names holding what a dictionary reading ``submodule``'s ``io``
    reads: one key, or the input's and the output's for ``in_to_out`` (an ``in_to_out``
    cache also serves ``in`` and ``out``). A cache without them, or whose widths are not
    the ``dictionary``'s (``activation_dim``, ``output_dim``), is one :class:`CacheError`
    naming every difference."""
    if io not in KINDS:
        raise ValueError(f"io must be one of {tuple(KINDS)}, got {io!r}")
    manifest, hooks = cache.manifest, {h["key"]: h for h in cache.hooks}
    names = manifest["submodules"]
    diffs = []
    if submodule not in names:
        given = manifest.get("submodule_args") or []
        if is_short_name(submodule) and given and all(map(is_short_name, given)):
            held = ", ".join(f"{n} (given as {g})" for n, g in zip(names, given))
            note = ""                  # short names of the same model: they do differ
        else:
            held = ", ".join(names)
            note = (f" ({submodule!r} is a short name this cache does not record: give the "
                    "dotted path)" if is_short_name(submodule) else "")
        diffs.append(f"submodule: the cache holds {held}, the dictionary reads "
                     f"{submodule}{note}")
    # io and width are compared on this submodule, else on the cache's only one
    compared = submodule if submodule in names else names[0] if len(names) == 1 else None
    keys = [hook_key(compared, kind) for kind in KINDS[io]] if compared else []
    if compared and not all(k in hooks for k in keys):
        diffs.append(f"io: the cache holds {manifest['io']}, the dictionary reads {io}")
    elif compared and dictionary is not None:
        d_in, d_out = hooks[keys[0]]["width"], hooks[keys[-1]]["width"]
        want_in = getattr(dictionary, "activation_dim", d_in)
        want_out = getattr(dictionary, "output_dim", want_in)
        if (want_in, want_out) != (d_in, d_out):
            got = f"{d_in}" if d_in == d_out else f"{d_in} in, {d_out} out"
            want = f"{want_in}" if want_in == want_out else f"{want_in} in, {want_out} out"
            diffs.append(f"width: the cache's rows are {got} wide, the dictionary takes {want}")
    if diffs:
        raise CacheError(f"the cache {cache.folder} does not match {where}: "
                         f"{'; '.join(diffs)}. Pass a cache of the activations it was trained "
                         f"on (`python -m dictionary_learning cache --submodule {submodule} "
                         f"--io {io} ...`)")
    return keys


class CacheRows:
    """The rows of ``keys`` in text order, as batches of at most ``batch_rows`` (a batch
    never spans two shards): ``[B, d]`` tensors, or ``(x_in, x_out)`` pairs for two keys, as
    a buffer serves them. At most ``n_rows`` (all when ``None``). Iterable any number of
    times; each pass reads the memory-mapped shards afresh."""

    def __init__(self, cache: str | Path | Cache, keys: list[str], n_rows: int | None = None,
                 batch_rows: int = 4096):
        self.cache, self.keys = open_cache(cache), list(keys)
        if not 1 <= len(self.keys) <= 2:
            raise ValueError(f"keys must name one or two tensors, got {self.keys}")
        if batch_rows < 1 or (n_rows is not None and n_rows < 0):
            raise ValueError(f"need batch_rows >= 1 and n_rows >= 0, got {batch_rows}, {n_rows}")
        total = self.cache.n_tokens
        self.n_rows = total if n_rows is None else min(int(n_rows), total)
        self.batch_rows = int(batch_rows)

    def __len__(self) -> int:
        return self.n_rows

    def __iter__(self) -> Iterator:
        left = self.n_rows
        for index, entry in enumerate(self.cache.shards):
            if left <= 0:
                return
            tensors = self.cache.shard(index, self.keys)
            rows = min(int(entry["rows"]), left)
            for start in range(0, rows, self.batch_rows):
                stop = min(start + self.batch_rows, rows)
                parts = [tensors[k][start:stop] for k in self.keys]
                yield parts[0] if len(parts) == 1 else tuple(parts)
            left -= rows


class ContextBatch(NamedTuple):
    """Contexts rebuilt from a cache, left-padded as a tokenised batch is."""

    token_ids: torch.Tensor   # [B, T] int64, 0 on padding
    mask: torch.Tensor        # [B, T] bool: the cached rows (real tokens)
    rows: list[torch.Tensor]  # one [n, d] per key, n = mask.sum(), in the row-major order
                              # of the mask's true entries


# One context: its row ranges (shard tensors, start, stop), in order.
_Pieces = list[tuple[dict[str, torch.Tensor], int, int]]


def contexts(cache: str | Path | Cache, keys: list[str]) -> Iterator[_Pieces]:
    """Every context of the cache in text order, as the row ranges that hold it (one per
    shard it lies in)."""
    cache = open_cache(cache)
    pieces: _Pieces = []
    last = None  # position of the row before the current shard
    for index in range(len(cache.shards)):
        t = cache.shard(index, [*keys, *TOKEN_KEYS])
        pos = t["positions"].long()
        n = pos.shape[0]
        if n == 0:
            continue
        starts = (torch.nonzero(pos[1:] != pos[:-1] + 1).squeeze(1) + 1).tolist()
        bounds = [0, *starts, n]
        for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            continues = j == 0 and last is not None and int(pos[0]) == last + 1
            if pieces and not continues:
                yield pieces
                pieces = []
            pieces.append((t, a, b))
        last = int(pos[-1])
    if pieces:
        yield pieces


def context_batches(cache: str | Path | Cache, keys: list[str], batch_size: int,
                    n_tokens: int | None = None) -> Iterator[ContextBatch]:
    """The cache's contexts in batches of ``batch_size`` (the last may be smaller), with
    the rows of ``keys``; stops after the batch that reaches ``n_tokens`` rows (as
    :func:`~dictionary_learning.interpret.feature_activations` stops on text)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    group: list[_Pieces] = []
    seen = 0
    for context in contexts(cache, keys):
        group.append(context)
        if len(group) == batch_size:
            batch = _batch(group, keys)
            yield batch
            seen += batch.rows[0].shape[0]
            group = []
            if n_tokens is not None and seen >= n_tokens:
                return
    if group:
        yield _batch(group, keys)


def _batch(group: list[_Pieces], keys: list[str]) -> ContextBatch:
    lengths = torch.tensor([sum(b - a for _, a, b in c) for c in group])
    B, T = len(group), int(lengths.max())
    mask = torch.arange(T)[None, :] >= (T - lengths)[:, None]       # left-padded
    flat = [(t, a, b) for c in group for t, a, b in c]
    token_ids = torch.zeros(B, T, dtype=torch.long)
    token_ids[mask] = torch.cat([t["token_ids"][a:b] for t, a, b in flat]).long()
    rows = [torch.cat([t[k][a:b] for t, a, b in flat]) for k in keys]
    return ContextBatch(token_ids, mask, rows)
