"""Writing an activation cache: the buffer's collection, with shards on disk as its sink.

    text -> ActivationBuffer.collected() (one forward per batch, rows in text order)
         -> rows gathered into shards of ``shard_rows`` -> shard file (temporary name, then
            renamed) -> manifest.json rewritten (atomically) listing it

The manifest records, with every shard, where the collection stands: the text position
(texts read, the packer's carried tokens) at the start of the forward batch holding the
first row not yet in a shard, and how many of that batch's rows are already in one. A
killed run continues from there with ``resume=True`` (it re-runs that one batch and drops
the rows already written), so its shards are the bytes an uninterrupted run writes.
"""

from __future__ import annotations

import logging
import re
import shutil
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..files import WriteError, atomic_write, check_writable, remove_stale_temps
from .manifest import (FORMAT, MANIFEST, VERSION, CacheError, RunningStats,
                       bytes_per_row, hook_key, human_bytes, manifest_name, read_manifest,
                       shard_name, write_manifest)

logger = logging.getLogger(__name__)

DEFAULT_SHARD_MB = 256
# What a resumed run must share with the run that started the cache.
_FIXED = ("hooks", "io", "dtype", "ctx_len", "pack", "remove_bos", "refresh_batch_size",
          "shard_rows")


@dataclass
class _Chunk:
    """Rows of one forward batch not yet in a shard, from ``offset`` on."""

    position: dict                   # text position before the batch was read
    offset: int                      # rows of the batch already in shards
    tensors: dict[str, torch.Tensor]

    @property
    def n(self) -> int:
        return self.tensors["token_ids"].shape[0] if self.tensors else 0

    def split(self, n: int) -> tuple[dict[str, torch.Tensor], "_Chunk"]:
        head = {k: v[:n] for k, v in self.tensors.items()}
        tail = _Chunk(self.position, self.offset + n,
                      {k: v[n:] for k, v in self.tensors.items()})
        return head, tail


def write_cache(out: str | Path, model, texts: Iterable[str], submodule, *,
                tokens: int | None, io: str = "out", ctx_len: int = 128,
                refresh_batch_size: int = 32, pack: bool = False, remove_bos: bool = False,
                dtype: torch.dtype = torch.float32, shard_rows: int | None = None,
                shard_mb: float = DEFAULT_SHARD_MB, resume: bool = False,
                overwrite: bool = False, info: dict | None = None,
                progress: bool = True, announce: Callable[[str], object] | None = None,
                part: tuple[int, int] | None = None) -> dict:
    """Collect ``tokens`` activations of ``submodule`` (one or a list, in one forward pass)
    from ``texts`` into the cache folder ``out``; returns its manifest.

    The collection is :class:`~dictionary_learning.buffer.ActivationBuffer`'s (same ``io``,
    ``ctx_len``, ``pack``, ``remove_bos``); activations are stored as ``dtype``. Shards hold
    ``shard_rows`` tokens (default: as many as fit ``shard_mb`` MiB). ``info`` (model and
    data names, text field, texts skipped) goes into the manifest as given. ``tokens=None``
    collects until the text runs out. ``announce`` (e.g. ``print``) is told the expected
    disk use before the collection starts; a disk without room for it is refused. A folder
    holding a cache is refused unless ``resume`` (continue it: pass the same text from its
    start; a larger ``tokens`` extends a finished cache) or ``overwrite`` (replace it).

    ``part=(rank, world)``: this process writes its own shards and part manifest (under
    torchrun each process collects from its share of the text); :func:`merge_parts` then
    makes the one ``manifest.json`` readers use."""
    from ..buffer import ActivationBuffer

    out = Path(out)
    if tokens is not None and (int(tokens) != tokens or tokens < 1):
        raise ValueError(f"tokens must be a positive integer or None, got {tokens!r}")
    check_writable(out)
    previous = _previous(out, resume, overwrite, part)
    if part is not None:  # every part has looked at (and cleared) the folder
        from ..distributed import barrier

        barrier()
    buffer = ActivationBuffer(texts, model, submodule, io=io, n_ctxs=1, ctx_len=ctx_len,
                              refresh_batch_size=refresh_batch_size, dtype=dtype,
                              remove_bos=remove_bos, pack=pack, progress=False)
    hooks = [{"key": hook_key(name, kind), "submodule": name, "kind": kind, "width": w}
             for (name, kind), w in zip(buffer.hooks, buffer.widths)]
    row_bytes = bytes_per_row(hooks, dtype)
    if shard_rows is None:
        shard_rows = max(1, int(shard_mb * 2**20) // row_bytes)
    manifest = {
        "format": FORMAT, "version": VERSION, "complete": False,
        **(info or {}),
        "model": (info or {}).get("model") or buffer.config["lm_name"],
        "tokenizer": buffer.config["tokenizer"],
        "submodules": buffer.submodule_names or [buffer.submodule_name],
        "io": io, "hooks": hooks, "dtype": str(dtype).removeprefix("torch."),
        "ctx_len": int(ctx_len), "pack": bool(pack), "remove_bos": bool(remove_bos),
        "tokenization": buffer.config["tokenization"],
        "refresh_batch_size": int(refresh_batch_size), "shard_rows": int(shard_rows),
        "bytes_per_token": row_bytes, "tokens_wanted": tokens,
        "tokens": 0, "texts_read": 0, "text_exhausted": False, "shards": [], "stats": {},
        "resume": {"position": buffer.text_position(), "skip_rows": 0, "sums": {}},
    }
    stats = {h["key"]: RunningStats.empty(h["width"]) for h in hooks}
    if previous is not None:
        _check_same(previous, manifest, out)
        manifest = {**previous, "tokens_wanted": tokens, "complete": False}
        stats = {k: RunningStats.from_json(v) for k, v in previous["resume"]["sums"].items()}
        buffer.seek(previous["resume"]["position"])
        logger.info("resuming the cache in %s after %d shards (%d tokens)", out,
                    len(previous["shards"]), previous["tokens"])
    remaining = None if tokens is None else tokens - manifest["tokens"]
    if remaining is not None and remaining < 0:
        raise ValueError(f"{out} already holds {manifest['tokens']} tokens, more than "
                         f"tokens={tokens}: give at least that many")
    if remaining is not None:
        if announce is not None:
            if part is None:
                announce(f"Expected disk use: {human_bytes(remaining * row_bytes)} "
                         f"({remaining:,} tokens x {row_bytes:,} bytes) in {out}")
            else:
                total = human_bytes(remaining * row_bytes * part[1])
                announce(f"Expected disk use: about {total} ({remaining:,} tokens x "
                         f"{row_bytes:,} bytes on each of {part[1]} processes) in {out}")
        _check_space(out, remaining * row_bytes)
    remove_stale_temps(out)
    writer = _ShardWriter(out, manifest, stats, hooks, shard_rows, part)
    skip = manifest["resume"]["skip_rows"]
    bar = tqdm(total=tokens, initial=manifest["tokens"], unit="tok", unit_scale=True,
               desc="Caching activations", disable=not progress)
    batches = buffer.collected()
    start = manifest["tokens"]

    def flush(n: int) -> None:
        writer.flush(n, buffer.text_position(), buffer.texts_seen)
        bar.set_postfix(shards=len(manifest["shards"]),
                        size=human_bytes(manifest["tokens"] * row_bytes))

    try:
        while remaining is None or writer.n_collected < remaining:
            position = buffer.text_position()
            collected = next(batches, None)
            if collected is None:
                manifest["text_exhausted"] = True
                break
            chunk = _Chunk(position, 0, {
                **{h["key"]: r.to(dtype) for h, r in zip(hooks, collected.rows)},
                "token_ids": collected.token_ids.to(torch.int32),
                "positions": collected.positions.to(torch.int32)})
            if skip:  # rows of this batch written before the resume
                _, chunk = chunk.split(skip)
                skip = 0
            writer.add(chunk)
            shown = writer.n_collected if remaining is None else min(writer.n_collected,
                                                                     remaining)
            bar.update(start + shown - bar.n)
            while writer.n_pending >= shard_rows and writer.room(remaining) >= shard_rows:
                flush(shard_rows)
        while (n := min(writer.n_pending, writer.room(remaining), shard_rows)) > 0:
            flush(n)
        manifest["complete"] = True
        write_manifest(out, manifest, manifest_name(part))
    except WriteError as e:
        raise WriteError(e.errno, f"{e}; the cache holds {len(manifest['shards'])} complete "
                         f"shards ({manifest['tokens']} tokens): free space or choose another "
                         f"--out, then continue with --resume") from e
    finally:
        bar.close()
    if tokens is not None and manifest["tokens"] < tokens:
        logger.warning("the text ran out after %d of %d tokens", manifest["tokens"], tokens)
    return manifest


class _ShardWriter:
    """Rows waiting for a shard, and the writing of shards and of the manifest."""

    def __init__(self, out: Path, manifest: dict, stats: dict[str, RunningStats],
                 hooks: list[dict], shard_rows: int, part: tuple[int, int] | None = None):
        self.out, self.manifest, self.stats = out, manifest, stats
        self.hooks, self.shard_rows, self.part = hooks, shard_rows, part
        self.chunks: list[_Chunk] = []
        self.written = 0  # rows written by this run

    @property
    def n_pending(self) -> int:
        return sum(c.n for c in self.chunks)

    @property
    def n_collected(self) -> int:
        return self.written + self.n_pending

    def room(self, remaining: int | None) -> int:
        """How many more rows this run may write."""
        return self.n_pending if remaining is None else remaining - self.written

    def add(self, chunk: _Chunk) -> None:
        if chunk.n:
            self.chunks.append(chunk)

    def flush(self, n: int, current: dict, texts_read: int) -> None:
        """Write the next ``n`` pending rows as one shard, then the manifest listing it
        (``current``: the text position after the last batch read)."""
        parts, taken = [], 0
        while taken < n:
            c = self.chunks.pop(0)
            if taken + c.n > n:
                head, tail = c.split(n - taken)
                parts.append(head)
                self.chunks.insert(0, tail)
            else:
                parts.append(c.tensors)
            taken += parts[-1]["token_ids"].shape[0]
        tensors = {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
        for h in self.hooks:
            self.stats[h["key"]].add(tensors[h["key"]])
        name = shard_name(len(self.manifest["shards"]), self.part)
        data = _shard_bytes(tensors)
        atomic_write(self.out / name, lambda tmp: Path(tmp).write_bytes(data))
        self.written += n
        # The first row not in a shard: the next pending one, else the next batch's first.
        first = self.chunks[0] if self.chunks else _Chunk(current, 0, {})
        m = self.manifest
        m["shards"].append({"file": name, "rows": n, "bytes": len(data),
                            "crc32": f"{zlib.crc32(data):08x}"})
        m["tokens"] += n
        m["texts_read"] = texts_read
        m["stats"] = {k: s.summary() for k, s in self.stats.items()}
        m["resume"] = {"position": first.position, "skip_rows": first.offset,
                       "sums": {k: s.to_json() for k, s in self.stats.items()}}
        write_manifest(self.out, m, manifest_name(self.part))


def _shard_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _previous(out: Path, resume: bool, overwrite: bool,
              part: tuple[int, int] | None = None) -> dict | None:
    """The manifest to continue (``resume``), or ``None`` after clearing/checking ``out``
    (a part clears only its own files, and rank 0 the merged manifest)."""
    name = manifest_name(part)
    if resume:
        if not (out / name).exists():
            raise CacheError(f"nothing to resume: {out} holds no cache ({name}); start "
                             "without --resume"
                             + ("" if part is None or not (out / MANIFEST).exists() else
                                " (it holds a cache written by another number of processes)"))
        return read_manifest(out, name)
    if any(out.glob("manifest*.json")) or any(out.glob("shard_*.safetensors")):
        if not overwrite:
            raise CacheError(f"{out} already holds a cache: continue it with --resume, "
                             "replace it with --overwrite, or choose another --out")
        # One process clears everything; a part its own files, and rank 0 what no part owns.
        for p in [*out.glob("shard_*.safetensors"), *out.glob("manifest*.json")]:
            owner = re.match(r"(?:shard_|manifest\.part)(\d+)of(\d+)", p.name)
            if (part is None or (owner and (int(owner[1]), int(owner[2])) == tuple(part))
                    or (part[0] == 0 and not owner)):
                p.unlink()
    return None


def merge_parts(out: str | Path, world: int) -> dict:
    """One ``manifest.json`` for the ``world`` complete part manifests in ``out``: their
    shards in rank order, tokens and texts summed, statistics combined from the float64
    sums. Returns it."""
    out = Path(out)
    parts = [read_manifest(out, manifest_name((r, world))) for r in range(world)]
    unfinished = [r for r, m in enumerate(parts) if not m["complete"]]
    if unfinished:
        raise CacheError(f"ranks {unfinished} of the cache in {out} did not finish: continue "
                         "it with --resume")
    stats = {k: RunningStats.from_json(v) for k, v in parts[0]["resume"]["sums"].items()}
    for m in parts[1:]:
        for k, v in m["resume"]["sums"].items():
            other = RunningStats.from_json(v)
            s = stats[k]
            stats[k] = RunningStats(s.count + other.count, s.total + other.total,
                                    s.total_sq + other.total_sq, s.norm_total + other.norm_total)
    merged = {**parts[0], "complete": True, "shards": [s for m in parts for s in m["shards"]],
              "tokens": sum(m["tokens"] for m in parts),
              "texts_read": sum(m["texts_read"] for m in parts),
              "text_exhausted": any(m["text_exhausted"] for m in parts),
              "tokens_wanted": sum(m["tokens_wanted"] or 0 for m in parts) or None,
              "stats": {k: s.summary() for k, s in stats.items()},
              "parts": [{"rank": r, "world": world, "manifest": manifest_name((r, world)),
                         "tokens": m["tokens"]} for r, m in enumerate(parts)]}
    merged.pop("resume")
    write_manifest(out, merged)
    return merged


def _check_same(previous: dict, manifest: dict, out: Path) -> None:
    changed = [k for k in _FIXED if previous.get(k) != manifest.get(k)]
    if changed:
        raise CacheError(f"{out} was written with other settings ({', '.join(changed)} "
                         "differ): resume with the arguments that started it, or write a new "
                         "cache with --overwrite")


def _check_space(out: Path, n_bytes: int) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if n_bytes > free:
        raise CacheError(f"the cache needs about {human_bytes(n_bytes)} but {probe} has "
                         f"{human_bytes(free)} free: free space, collect fewer --tokens, "
                         "store --dtype bfloat16, or choose another --out")
