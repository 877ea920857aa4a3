"""Reading an activation cache: the shards back as the batches a buffer serves.

    manifest -> shard order (one permutation per epoch) -> shards memory-mapped, checked
             -> a shuffle window of ``window`` rows, refilled when half read (as the
                buffer's store) -> batches of ``batch_size`` rows in one random order per fill

:class:`CachedActivations` is an activation source like
:class:`~dictionary_learning.buffer.ActivationBuffer`: it serves tensors, ``(x_in, x_out)``
pairs or ``{name: batch}`` dicts, has a ``config`` and ``state_dict()`` /
``load_state_dict()``. Its state is small: the unread rows are saved as their indices into
the cache (8 bytes a row), not as activations, with the shard order, the cursor and the
shuffling generator, so a resumed run serves exactly the batches the original would have.
"""

from __future__ import annotations

import logging
import mmap
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .manifest import CacheError, read_manifest

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 2**18


class Cache:
    """A cache folder opened for reading: its manifest and its shards.

    ``verify``: ``"first"`` checks each shard's CRC-32 the first time this object reads
    it, ``True`` every time, ``False`` never (sizes and headers are always checked)."""

    def __init__(self, folder: str | Path, verify: bool | str = "first"):
        if verify not in (True, False, "first"):
            raise ValueError(f"verify must be True, False or 'first', got {verify!r}")
        self.folder, self.verify = Path(folder), verify
        self.manifest = read_manifest(self.folder)
        self.hooks: list[dict] = self.manifest["hooks"]
        self.shards: list[dict] = self.manifest["shards"]
        self.dtype = getattr(torch, self.manifest["dtype"])
        starts = [0]
        for s in self.shards:
            starts.append(starts[-1] + int(s["rows"]))
        self.starts = torch.tensor(starts)  # global index of each shard's first row
        self._verified: set[int] = set()
        if not self.manifest.get("complete"):
            logger.warning("%s is an unfinished cache (%d tokens in %d shards so far); "
                           "continue it with `cache --resume`", self.folder, self.n_tokens,
                           len(self.shards))

    @property
    def n_tokens(self) -> int:
        return int(self.starts[-1])

    def __len__(self) -> int:
        return self.n_tokens

    def stats(self, key: str) -> dict:
        """count, mean_norm, mean [d] and var [d] of one hook's stored activations."""
        return self.manifest["stats"][key]

    def shard(self, index: int, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one shard (memory-mapped), checked against the manifest."""
        entry = self.shards[index]
        path = self.folder / entry["file"]
        what = f"shard {entry['file']} of the cache {self.folder}"
        fix = "write the cache again (or continue it with `cache --resume` after deleting " \
              "the damaged shard and the ones after it from the manifest)"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CacheError(f"{what} is missing: {fix}") from None
        if size != entry["bytes"]:
            raise CacheError(f"{what} is {'truncated' if size < entry['bytes'] else 'too long'}"
                             f" ({size} bytes, the manifest says {entry['bytes']}): {fix}")
        if self.verify is True or (self.verify == "first" and index not in self._verified):
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                crc = f"{zlib.crc32(m):08x}"
            if crc != entry["crc32"]:
                raise CacheError(f"{what} is damaged (CRC-32 {crc}, the manifest says "
                                 f"{entry['crc32']}): {fix}")
            self._verified.add(index)
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in (keys or f.keys())}
        except (SafetensorError, OSError, KeyError) as e:
            raise CacheError(f"{what} cannot be read ({e}): {fix}") from None
        for k, t in tensors.items():
            if t.shape[0] != entry["rows"]:
                raise CacheError(f"{what} holds {t.shape[0]} rows of {k}, the manifest says "
                                 f"{entry['rows']}: {fix}")
        return tensors

    def rows(self, index: torch.Tensor, keys: list[str]) -> dict[str, torch.Tensor]:
        """The rows with global indices ``index`` (any order), read shard by shard."""
        shard_of = torch.searchsorted(self.starts, index, right=True) - 1
        out = {}
        for s in torch.unique(shard_of).tolist():
            where = (shard_of == s).nonzero().squeeze(1)
            tensors = self.shard(s, keys)
            local = index[where] - self.starts[s]
            for k in keys:
                t = tensors[k]
                if k not in out:
                    out[k] = torch.empty((len(index), *t.shape[1:]), dtype=t.dtype)
                out[k][where] = t[local]
        return out


class CachedActivations:
    """Shuffled batches from an activation cache, served like an ``ActivationBuffer``'s.

    Args:
        cache: a cache folder (or an open :class:`Cache`).
        batch_size: rows per batch (the last one may be smaller).
        submodule: which submodule(s) to serve: ``None`` for the cache's own (several are
            served as ``{name: batch}`` dicts), a name (plain batches), or a list of names.
        window: rows held in memory for shuffling (a permutation of the shards per epoch,
            then a random order within the window, refilled when half read).
        epochs: passes over the cache.
        shuffle: ``False`` serves the rows in the cache's order (for evaluation).
        seed: seed of the reader's own generator (drawn from torch's global one if None).
        device, dtype: where the window is kept and batches served, and their dtype
            (default: the cache's).
        rank, world_size: read only the shards ``rank::world_size`` of each epoch's order.
        verify: see :class:`Cache`.
        prefetch: check and page in the next shard in a background thread.
    """

    def __init__(self, cache: str | Path | Cache, batch_size: int = 4096, *,
                 submodule: str | list[str] | None = None, window: int | None = None,
                 epochs: int = 1, shuffle: bool = True, seed: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 rank: int = 0, world_size: int = 1, verify: bool | str = "first",
                 prefetch: bool = True):
        self.cache = cache if isinstance(cache, Cache) else Cache(cache, verify=verify)
        for name, value in [("batch_size", batch_size), ("epochs", epochs),
                            ("world_size", world_size)] + (
                                [("window", window)] if window is not None else []):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if len(self.cache.shards) < world_size:
            raise ValueError(f"the cache has {len(self.cache.shards)} shards, fewer than "
                             f"world_size={world_size}: write it with smaller shards")
        m = self.cache.manifest
        names = m["submodules"]
        many = submodule is None and len(names) > 1 or isinstance(submodule, (list, tuple))
        chosen = names if submodule is None else (
            list(submodule) if isinstance(submodule, (list, tuple)) else [submodule])
        unknown = [s for s in chosen if s not in names]
        if unknown:
            raise ValueError(f"the cache holds {names}, not {unknown}: choose among those")
        self.submodule_names = chosen if many else None
        self.submodule_name = chosen[0]
        self.hooks = [h for h in self.cache.hooks if h["submodule"] in chosen]
        self.keys = [h["key"] for h in self.hooks]
        self.io, self.batch_size, self.epochs = m["io"], int(batch_size), int(epochs)
        self.shuffle, self.rank, self.world_size = shuffle, int(rank), int(world_size)
        self.device = torch.device(device)
        self.dtype = dtype or self.cache.dtype
        capacity = int(min(window or DEFAULT_WINDOW, self.cache.n_tokens))
        from ..buffer import check_memory

        check_memory(capacity * sum(h["width"] for h in self.hooks) * self.dtype.itemsize,
                     f"the shuffle window ({capacity} rows)", "give a smaller window",
                     self.device)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        self._generator = torch.Generator().manual_seed(int(seed))
        pinned = self.device.type == "cpu" and torch.cuda.is_available()
        self._store = [torch.empty(capacity, h["width"], dtype=self.dtype, device=self.device,
                                   pin_memory=pinned) for h in self.hooks]
        self._origin = torch.empty(capacity, dtype=torch.long)  # global row of each slot
        self._n_stored = 0
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0
        # Cursor: the epoch, its shard order (this rank's share), the next shard, and the
        # first unread row of the current one.
        self._epoch, self._shard_order, self._next_shard, self._row = 0, [], 0, 0
        self._shard_tensors: dict[str, torch.Tensor] | None = None
        self.tokens_seen = 0
        self._pool = ThreadPoolExecutor(1) if prefetch else None
        self._ahead: dict[int, object] = {}
        self._start_epoch()

    texts_seen = None  # a cache has no text position; checkpoints record none

    # -- the cursor over shards ----------------------------------------------------------------
    def _start_epoch(self) -> None:
        n = len(self.cache.shards)
        order = (torch.randperm(n, generator=self._generator) if self.shuffle
                 else torch.arange(n)).tolist()
        self._shard_order = order[self.rank::self.world_size]
        self._next_shard, self._row, self._shard_tensors = 0, 0, None

    @property
    def _exhausted(self) -> bool:
        return self._epoch >= self.epochs

    def _current_shard(self) -> int:
        return self._shard_order[self._next_shard]

    def _open(self, index: int) -> dict[str, torch.Tensor]:
        future = self._ahead.pop(index, None)
        tensors = future.result() if future is not None else self.cache.shard(index, self.keys)
        if self._pool is not None:  # check and page in the one after it meanwhile
            upcoming = self._upcoming()
            if upcoming is not None and upcoming not in self._ahead:
                self._ahead[upcoming] = self._pool.submit(self._touch, upcoming)
        return tensors

    def _touch(self, index: int) -> dict[str, torch.Tensor]:
        tensors = self.cache.shard(index, self.keys)
        for t in tensors.values():  # fault the pages in now, not during the copy
            t.view(-1)[::1024].sum()
        return tensors

    def _upcoming(self) -> int | None:
        if self._next_shard + 1 < len(self._shard_order):
            return self._shard_order[self._next_shard + 1]
        return None

    def _read(self, n: int) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """Up to ``n`` rows from the cursor on (within one shard), or ``None`` at the end."""
        while not self._exhausted:
            if self._next_shard >= len(self._shard_order):
                self._epoch += 1
                if self._exhausted:
                    return None
                self._start_epoch()
                continue
            index = self._current_shard()
            if self._shard_tensors is None:
                self._shard_tensors = self._open(index)
            rows = int(self.cache.shards[index]["rows"])
            take = min(n, rows - self._row)
            sl = slice(self._row, self._row + take)
            out = [self._shard_tensors[k][sl] for k in self.keys]
            origin = torch.arange(sl.start, sl.stop) + self.cache.starts[index]
            self._row += take
            if self._row >= rows:
                self._next_shard, self._row, self._shard_tensors = self._next_shard + 1, 0, None
            return out, origin
        return None

    # -- the shuffle window (as the buffer's store) --------------------------------------------
    @torch.no_grad()
    def refresh(self) -> None:
        """Fill the window's free slots (rows already served, or never filled) and draw the
        next serving order. Rows are not moved: the order is a permutation of the *logical*
        list (the unread rows in their serving order, then the new rows in reading order),
        mapped to slots, so the batches are those of a store that moves its unread rows to
        the front (the buffer's), without that copy."""
        capacity = self._origin.shape[0]
        unread = self._order[self._pos:]
        free = torch.ones(capacity, dtype=torch.bool)
        free[unread] = False
        free_slots = free.nonzero().squeeze(1)
        n_new = 0
        while n_new < len(free_slots):
            got = self._read(len(free_slots) - n_new)
            if got is None:
                break
            rows, origin = got
            slots = free_slots[n_new:n_new + len(origin)]
            for store, r in zip(self._store, rows):
                if int(slots[-1] - slots[0]) == len(slots) - 1:  # contiguous: a plain copy
                    store[int(slots[0]):int(slots[-1]) + 1].copy_(r)
                else:
                    store.index_copy_(0, slots.to(store.device), r.to(store.device))
            self._origin[slots] = origin
            n_new += len(origin)
        logical = torch.cat([unread, free_slots[:n_new]])
        self._n_stored = len(logical)
        self._order = (logical[torch.randperm(len(logical), generator=self._generator)]
                       if self.shuffle else logical)
        self._pos = 0

    @property
    def n_unread(self) -> int:
        return len(self._order) - self._pos

    def __iter__(self):
        return self

    def __next__(self):
        capacity = self._origin.shape[0]
        if self.n_unread < capacity // 2 and not self._exhausted:
            self.refresh()
        if self.n_unread == 0:
            raise StopIteration
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += len(idx)
        self.tokens_seen += len(idx)
        rows = [self._gather(store, idx) for store in self._store]
        if not self.submodule_names:
            return rows[0] if len(rows) == 1 else tuple(rows)
        served: dict[str, list[torch.Tensor]] = {}
        for r, h in zip(rows, self.hooks):
            served.setdefault(h["submodule"], []).append(r)
        return {name: rs[0] if len(rs) == 1 else tuple(rs) for name, rs in served.items()}

    @staticmethod
    def _gather(store: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(store.device)
        if not store.is_pinned():
            return torch.index_select(store, 0, idx)  # ~16x faster than store[idx] on CPU
        out = torch.empty((len(idx), store.shape[1]), dtype=store.dtype, pin_memory=True)
        return torch.index_select(store, 0, idx, out=out)

    # -- resuming --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Small: the unread rows as indices into the cache, in serving order, and the
        cursor and generator."""
        return {"kind": "cache", "unread": self._origin[self._order[self._pos:]].clone(),
                "epoch": self._epoch, "shard_order": list(self._shard_order),
                "next_shard": self._next_shard, "row": self._row,
                "generator": self._generator.get_state(), "tokens_seen": self.tokens_seen,
                "n_tokens": self.cache.n_tokens, "keys": list(self.keys)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "cache":
            raise ValueError("this checkpoint's activation state is from a buffer, not a "
                             "cache: resume with the source the run was started with")
        if state["n_tokens"] != self.cache.n_tokens or state["keys"] != self.keys:
            raise ValueError(f"the saved position is in a cache of {state['n_tokens']} tokens "
                             f"of {state['keys']}; this one has {self.cache.n_tokens} of "
                             f"{self.keys}: resume on the cache the run was started with")
        unread = state["unread"]
        if len(unread) > self._origin.shape[0]:
            raise ValueError(f"the saved position holds {len(unread)} unread rows, more than "
                             f"this window's {self._origin.shape[0]}: resume with the same "
                             "window")
        n = len(unread)
        if n:
            got = self.cache.rows(unread, self.keys)
            for store, k in zip(self._store, self.keys):
                store[:n].copy_(got[k])
        self._origin[:n] = unread
        self._n_stored, self._order, self._pos = n, torch.arange(n), 0
        self._epoch, self._shard_order = int(state["epoch"]), list(state["shard_order"])
        self._next_shard, self._row = int(state["next_shard"]), int(state["row"])
        self._shard_tensors = None
        self._generator.set_state(state["generator"])
        self.tokens_seen = int(state["tokens_seen"])

    # -- what it is ------------------------------------------------------------------------------
    @property
    def d_submodule(self):
        per: dict[str, list[int]] = {}
        for h in self.hooks:
            per.setdefault(h["submodule"], []).append(h["width"])
        widths = {n: ws[0] if len(ws) == 1 else tuple(ws) for n, ws in per.items()}
        return widths if self.submodule_names else widths[self.submodule_name]

    def mean_norm(self, submodule: str | None = None) -> float:
        """The mean norm of the input-side activations (what normalisation scales) of
        ``submodule``, from the manifest's statistics: no pass over the data."""
        name = submodule or self.submodule_name
        hook = next(h for h in self.hooks if h["submodule"] == name)
        return float(self.cache.stats(hook["key"])["mean_norm"])

    @property
    def config(self) -> dict:
        m = self.cache.manifest
        return {
            "d_submodule": self.d_submodule, "io": self.io, "n_ctxs": None,
            "ctx_len": m["ctx_len"], "refresh_batch_size": m["refresh_batch_size"],
            "out_batch_size": self.batch_size, "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."), "remove_bos": m["remove_bos"],
            "lm_name": m.get("model"), "submodule_name": self.submodule_name,
            "submodule_names": self.submodule_names, "tokenizer": m.get("tokenizer"),
            "tokenization": m.get("tokenization"), "tokens_seen": self.tokens_seen,
            "cache": str(self.cache.folder), "cache_tokens": self.cache.n_tokens,
            "window": self._origin.shape[0], "epochs": self.epochs,
        }

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
