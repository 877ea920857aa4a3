"""ActivationBuffer: a shuffled store of submodule activations, refilled from text.

Data flow: strings -> token batches (``tokens.py``: left-padded and masked, or packed into
full windows) -> one nnsight trace per batch, stopped right after the deepest hooked
submodule -> the real tokens' rows are written in place into a preallocated
``[n_ctxs * ctx_len, d]`` store per hooked tensor -> batches of ``out_batch_size`` rows are
served in the order of one random permutation per refill, so no row is served twice within
a fill. When fewer than half of the stored rows are unread, the unread rows are moved to
the front and the rest is refilled from new text.

``state_dict()`` / ``load_state_dict()`` capture everything that decides the batches still to
come: the unread rows in the order they will be served, rows that did not fit the last
refill, the packer's carried-over tokens, the shuffling generator and how many texts were
read. A buffer built on the same text from its start and given that state serves exactly
the batches the original would have served next (it skips the texts already read).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .submodules import IO_MODES, forward_order, hidden_states, resolve_submodule
from .tokens import TokenPacker, real_token_mask, tokenize_batch

logger = logging.getLogger(__name__)

# 2000 contexts x 128 tokens = 256k activations: 0.5 GB for a 512-wide fp32 submodule
# (Pythia-70m), about 40 s to fill for an early layer on 2 CPU cores.
DEFAULT_N_CTXS = 2000
KINDS = {"out": ("output",), "in": ("input",), "in_to_out": ("input", "output")}


class Collected(NamedTuple):
    """The rows one forward pass produced, in text order (unshuffled)."""

    rows: list[torch.Tensor]   # one [n, d] per hook (see ActivationBuffer.hooks)
    token_ids: torch.Tensor    # [n] the token at each row
    positions: torch.Tensor    # [n] its position among its context's real tokens (0 = first)


def _linear_width(module: torch.nn.Module, kind: str) -> int | None:
    if isinstance(module, torch.nn.Linear):
        return module.in_features if kind == "input" else module.out_features
    return None


class ActivationBuffer:
    """Serves shuffled batches of a submodule's activations on real (non-padding) tokens.

    Args:
        data: any iterable of strings (documents).
        model: an nnsight model of a causal LM (``LanguageModel`` or ``TransformersModel``).
        submodule: an envoy of ``model``, its ``nn.Module`` or its dotted path; or a list of
            them, collected in one forward pass and served as ``{name: batch}`` dicts whose
            rows are the same tokens.
        d_submodule: activation width; for ``io="in_to_out"`` an int (both widths) or
            ``(d_in, d_out)``. Inferred when omitted.
        io: ``"out"`` (the submodule's output), ``"in"`` (its input) or ``"in_to_out"``
            (``(x_in, x_out)`` pairs, for an MLP stretcher).
        n_ctxs: the store holds ``n_ctxs * ctx_len`` activations.
        ctx_len: tokens per context (longer texts are truncated, unless packed).
        refresh_batch_size: contexts per forward pass when refilling.
        out_batch_size: rows per served batch (the last one may be smaller).
        device, dtype: where and how the store is kept (and batches served); a half
            precision dtype halves the memory.
        remove_bos: drop the first real token of every context.
        pack: pack documents into full ``ctx_len`` windows (no padding, no truncation)
            instead of truncating and padding each document.
        seed: seed of the shuffling generator (the buffer's own, so resuming can restore
            it); by default drawn from torch's global generator, so ``torch.manual_seed``
            still makes a run reproducible.
        in_feats, out_feats, in_batch_size: older names of ``d_submodule`` (input and output
            widths) and ``refresh_batch_size``, accepted so existing code runs unchanged.
    """

    def __init__(self, data: Iterable[str], model, submodule, d_submodule=None, io: str = "out",
                 n_ctxs: int = DEFAULT_N_CTXS, ctx_len: int = 128, refresh_batch_size: int = 512,
                 out_batch_size: int = 8192, device: str | torch.device = "cpu",
                 remove_bos: bool = False, dtype: torch.dtype = torch.float32, *,
                 pack: bool = False, in_feats: int | None = None, out_feats: int | None = None,
                 in_batch_size: int | None = None, progress: bool = True,
                 seed: int | None = None):
        if io not in IO_MODES:
            raise ValueError(f"io must be one of {IO_MODES}, got {io!r}")
        for name, value in [("n_ctxs", n_ctxs), ("ctx_len", ctx_len),
                            ("refresh_batch_size", refresh_batch_size),
                            ("out_batch_size", out_batch_size)]:
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(data, str):
            raise TypeError("data must be an iterable of strings, not a single string; "
                            "wrap it in a list")
        self.model, self.io, self.ctx_len = model, io, int(ctx_len)
        many = isinstance(submodule, (list, tuple))
        resolved = [resolve_submodule(model, s) for s in (submodule if many else [submodule])]
        if not resolved:
            raise ValueError("submodule is an empty list: name at least one submodule")
        names = [name for _, name in resolved]
        if len(set(names)) != len(names):
            raise ValueError(f"a submodule is named twice: {names}")
        self.submodule, self.submodule_name = resolved[0]
        self.submodule_names = names if many else None
        self.refresh_batch_size = int(in_batch_size or refresh_batch_size)
        self.out_batch_size, self.n_ctxs = int(out_batch_size), int(n_ctxs)
        self.device, self.dtype, self.remove_bos = torch.device(device), dtype, remove_bos
        self.pack, self.progress = pack, progress
        self._packer = TokenPacker(model.tokenizer, self.ctx_len) if pack else None

        self.tokens_seen = 0                    # real tokens collected so far
        self.texts_seen = 0
        self._data = iter(data)
        first = self._next_texts(1)
        if not first:
            raise ValueError("data yielded no text: pass a non-empty iterable of strings")
        self._data, self.texts_seen = chain(first, self._data), 0

        # One (envoy, name, "input"|"output") per stored tensor, in forward order.
        hooks = [(envoy, name, kind) for envoy, name in resolved for kind in KINDS[io]]
        order = forward_order(model._module, [(e._module, k) for e, _, k in hooks])
        self._hooks = [hooks[i] for i in order]
        self.widths = self._resolve_widths(d_submodule, in_feats, out_feats, first[0])

        pinned = self.device.type == "cpu" and torch.cuda.is_available()
        capacity = self.n_ctxs * self.ctx_len
        check_memory(capacity * sum(self.widths) * dtype.itemsize,
                     f"the activation buffer ({self.n_ctxs} contexts x {self.ctx_len} tokens x "
                     f"width {sum(self.widths)} x {dtype.itemsize} bytes)", "lower n_ctxs",
                     self.device)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        self._generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self._store = [torch.empty(capacity, w, dtype=dtype, device=self.device,
                                   pin_memory=pinned) for w in self.widths]
        self._n_stored = 0                      # rows [0, n) of the store hold activations
        self._order = torch.empty(0, dtype=torch.long, device=self.device)  # unread rows
        self._pos = 0
        self._pending: list[list[torch.Tensor]] = []  # rows that did not fit the last refill
        self._text_exhausted = False

    # -- widths ------------------------------------------------------------------------------
    @property
    def d_submodule(self):
        widths = {}
        for (_, name, _), w in zip(self._hooks, self.widths):
            widths.setdefault(name, []).append(w)
        per = {n: ws[0] if len(ws) == 1 else tuple(ws) for n, ws in widths.items()}
        return per if self.submodule_names else per[self.submodule_name]

    def _resolve_widths(self, d_submodule, in_feats, out_feats, probe_text) -> list[int]:
        kinds = KINDS[self.io]
        if isinstance(d_submodule, (tuple, list)):
            if len(d_submodule) != len(kinds):
                raise ValueError(f"io={self.io!r} needs {len(kinds)} widths, got {d_submodule}")
            given = dict(zip(kinds, d_submodule))
        elif d_submodule is not None:
            given = dict.fromkeys(kinds, d_submodule)
        else:
            given = {"input": in_feats, "output": out_feats}
        widths = [given.get(kind) or _linear_width(envoy._module, kind)
                  for envoy, _, kind in self._hooks]
        if any(w is None for w in widths):
            probe = tokenize_batch(self.model.tokenizer, [probe_text], self.ctx_len)
            probed = [t.shape[-1] for t in self._trace(probe)]
            widths = [w if w is not None else p for w, p in zip(widths, probed)]
        return [int(w) for w in widths]

    # -- text ----------------------------------------------------------------------------------
    def _next_texts(self, n: int) -> list[str]:
        texts = list(islice(self._data, n))
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"data must yield strings, got {type(t).__name__}: {t!r:.80}")
        self.texts_seen += len(texts)
        return texts

    def text_batch(self, batch_size: int | None = None) -> list[str]:
        """The next ``batch_size`` texts of the stream (consumed: they are not collected)."""
        return self._next_texts(batch_size or self.refresh_batch_size)

    def tokenized_batch(self, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        return tokenize_batch(self.model.tokenizer, self.text_batch(batch_size), self.ctx_len)

    def _next_inputs(self) -> dict[str, torch.Tensor] | None:
        """The next model batch of ``refresh_batch_size`` contexts, or ``None`` at the end."""
        if self._packer is None:
            texts = self._next_texts(self.refresh_batch_size)
            return tokenize_batch(self.model.tokenizer, texts, self.ctx_len) if texts else None
        while self._packer.n_full_windows < self.refresh_batch_size:
            texts = self._next_texts(max(8, self.refresh_batch_size // 4))
            if not texts:
                return self._packer.windows(self.refresh_batch_size, final=True)
            self._packer.add(texts)
        return self._packer.windows(self.refresh_batch_size)

    # -- collection ----------------------------------------------------------------------------
    def _trace(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Activations ``[B, T, d]`` at every hook, from one forward pass stopped right after
        the last hooked value."""
        saved = []
        with torch.inference_mode(), self.model.trace(inputs) as tracer:
            for envoy, _, kind in self._hooks:
                saved.append((envoy.input if kind == "input" else envoy.output).save())
            tracer.stop()
        return [hidden_states(v, f"{name} {kind}")
                for v, (_, name, kind) in zip(saved, self._hooks)]

    def _collect(self, inputs: dict[str, torch.Tensor]) -> Collected:
        """Rows ``[n, d]`` of real-token activations, one tensor per hook, with their
        tokens."""
        acts = self._trace(inputs)
        mask = inputs["attention_mask"]
        keep = real_token_mask(mask, self.remove_bos)
        rows = []
        for a, w, (_, name, kind) in zip(acts, self.widths, self._hooks):
            if a.shape[-1] != w:
                raise ValueError(f"{name} {kind} has width {a.shape[-1]}, but the buffer was "
                                 f"told {w}: fix d_submodule (or omit it)")
            rows.append(a[keep.to(a.device)])
        self.tokens_seen += int(keep.sum())
        return Collected(rows, inputs["input_ids"][keep], (mask.cumsum(-1) - 1)[keep])

    @property
    def hooks(self) -> list[tuple[str, str]]:
        """``(submodule name, "input"|"output")`` of each collected tensor, in forward order
        (the order of :attr:`Collected.rows` and of a batch's ``(x_in, x_out)``)."""
        return [(name, kind) for _, name, kind in self._hooks]

    def collected(self) -> Iterator[Collected]:
        """The rows of each forward pass in text order, unshuffled and unstored: the
        buffer's collection without its store (what a cache on disk is written from)."""
        while (inputs := self._next_inputs()) is not None:
            yield self._collect(inputs)

    def text_position(self) -> dict:
        """Where the collection stands in the text: texts read and the packer's carried
        tokens. :meth:`seek` on a new buffer over the same text continues from here."""
        return {"texts_seen": self.texts_seen,
                "packer_carry": None if self._packer is None else list(self._packer.carry)}

    def seek(self, position: dict) -> None:
        """Skip to a :meth:`text_position` of a buffer over the same text, from its start."""
        if self.tokens_seen or self.texts_seen:
            raise ValueError("seek needs a buffer that has read nothing yet: build a new one "
                             "on the same text from its start")
        if (position["packer_carry"] is None) != (self._packer is None):
            raise ValueError("the saved position is from a "
                             f"{'packed' if self._packer is None else 'unpacked'} collection, "
                             f"this buffer is {'packed' if self.pack else 'unpacked'}: resume "
                             "with the arguments of the run that saved it")
        wanted = int(position["texts_seen"])
        skipped = len(self._next_texts(wanted))
        if skipped < wanted:
            raise ValueError(f"the text ran out after {skipped} texts, but the saved position "
                             f"had read {wanted}: resume on the text of the run that saved it")
        if self._packer is not None:
            self._packer.carry = list(position["packer_carry"])

    def _write(self, rows: list[torch.Tensor]) -> None:
        capacity = self._store[0].shape[0]
        n = min(rows[0].shape[0], capacity - self._n_stored)
        for store, r in zip(self._store, rows):
            store[self._n_stored:self._n_stored + n].copy_(r[:n])
        self._n_stored += n
        if n < rows[0].shape[0]:
            self._pending.append([r[n:] for r in rows])

    @torch.no_grad()
    def refresh(self) -> None:
        """Move the unread rows to the front and fill the rest of the store from new text."""
        unread = self._order[self._pos:]
        for store in self._store:
            store[:len(unread)] = store[unread]
        self._n_stored = len(unread)
        capacity = self._store[0].shape[0]
        bar = tqdm(total=capacity, initial=self._n_stored, desc="Filling activation buffer",
                   unit="act", leave=False, disable=not self.progress or self.tokens_seen > 0)
        while self._n_stored < capacity:
            before = self._n_stored
            if self._pending:
                self._write(self._pending.pop(0))
            else:
                inputs = self._next_inputs()
                if inputs is None:
                    self._text_exhausted = True
                    break
                self._write(self._collect(inputs).rows)
            bar.update(self._n_stored - before)
        bar.close()
        self._order = torch.randperm(self._n_stored, device=self.device,
                                     generator=self._generator)
        self._pos = 0

    # -- resuming ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What decides every batch still to come (see the module docstring), on CPU."""
        unread = self._order[self._pos:]
        return {
            "texts_seen": self.texts_seen,
            "tokens_seen": self.tokens_seen,
            "unread": [store[unread].cpu() for store in self._store],
            "pending": [[r.cpu() for r in rows] for rows in self._pending],
            "packer_carry": (None if self._packer is None
                             else torch.tensor(self._packer.carry, dtype=torch.long)),
            "generator": self._generator.get_state(),
            "text_exhausted": self._text_exhausted,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` of a buffer over the same text, built the same
        way: skips the texts that buffer had read, then serves what it would have served."""
        if self.tokens_seen or self.texts_seen:
            raise ValueError("load_state_dict needs a buffer that has read nothing yet: build "
                             "a new one on the same text from its start")
        widths = [u.shape[-1] for u in state["unread"]]
        if widths != self.widths or (state["packer_carry"] is None) != (self._packer is None):
            raise ValueError(f"the saved buffer state (widths {widths}, "
                             f"{'unpacked' if state['packer_carry'] is None else 'packed'}) "
                             f"does not fit this buffer (widths {self.widths}, "
                             f"{'packed' if self.pack else 'unpacked'}): resume with the "
                             "arguments of the run that saved it")
        n = state["unread"][0].shape[0]
        if n > self._store[0].shape[0]:
            raise ValueError(f"the saved buffer state holds {n} rows, more than this "
                             f"buffer's {self._store[0].shape[0]}: resume with the same n_ctxs "
                             "and ctx_len")
        self.seek({"texts_seen": state["texts_seen"], "packer_carry": (
            None if state["packer_carry"] is None else state["packer_carry"].tolist())})
        for store, rows in zip(self._store, state["unread"]):
            store[:n].copy_(rows)
        self._n_stored = n
        self._order = torch.arange(n, device=self.device)
        self._pos = 0
        self._pending = [[r.to(self.device) for r in rows] for rows in state["pending"]]
        self._generator.set_state(state["generator"])
        self._text_exhausted = bool(state["text_exhausted"])
        self.tokens_seen = int(state["tokens_seen"])

    # -- serving -------------------------------------------------------------------------------
    @property
    def n_unread(self) -> int:
        return len(self._order) - self._pos

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        capacity = self._store[0].shape[0]
        can_refill = not self._text_exhausted or self._pending
        if self.n_unread < capacity // 2 and can_refill:
            self.refresh()
        if self.n_unread == 0:
            raise StopIteration
        idx = self._order[self._pos:self._pos + self.out_batch_size]
        self._pos += len(idx)
        rows = [self._gather(store, idx) for store in self._store]
        if not self.submodule_names:
            return rows[0] if len(rows) == 1 else tuple(rows)
        served: dict[str, list[torch.Tensor]] = {}
        for r, (_, name, _) in zip(rows, self._hooks):
            served.setdefault(name, []).append(r)
        return {name: rs[0] if len(rs) == 1 else tuple(rs) for name, rs in served.items()}

    @staticmethod
    def _gather(store: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``store[idx]``; into pinned memory when the store is pinned, so that copying the
        batch to a GPU can overlap computation."""
        if not store.is_pinned():
            return store[idx]
        out = torch.empty((len(idx), store.shape[1]), dtype=store.dtype, pin_memory=True)
        return torch.index_select(store, 0, idx, out=out)

    @property
    def config(self) -> dict:
        """What this buffer is, for ``config.json``."""
        tokenizer = self.model.tokenizer
        return {
            "d_submodule": self.d_submodule,
            "io": self.io,
            "n_ctxs": self.n_ctxs,
            "ctx_len": self.ctx_len,
            "refresh_batch_size": self.refresh_batch_size,
            "out_batch_size": self.out_batch_size,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "remove_bos": self.remove_bos,
            "lm_name": model_name(self.model),
            "submodule_name": self.submodule_name,
            "submodule_names": self.submodule_names,
            "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
            "tokenization": "packed" if self.pack else "truncate, left-pad, mask",
            "tokens_seen": self.tokens_seen,
        }


def check_memory(n_bytes: int, what: str, fix: str, device: str | torch.device = "cpu"
                 ) -> None:
    """Refuse, before allocating, what the device's memory cannot hold (CPU: physical
    memory; CUDA: the device's total); ``what`` and ``fix`` make the message."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            available = torch.cuda.mem_get_info(device)[1]
        elif device.type == "cpu":
            available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        else:
            return
    except (ValueError, OSError, AttributeError):  # the system does not say
        return
    if n_bytes > available:
        raise ValueError(f"{what} would need about {n_bytes / 2**30:,.1f} GiB of "
                         f"{device.type} memory, more than this machine's "
                         f"{available / 2**30:,.1f} GiB: {fix}")


def model_name(model) -> str | None:
    """The hub id or path the model came from, when it has one."""
    name = getattr(model, "repo_id", None)
    if not isinstance(name, str) or not name:
        name = getattr(getattr(model._module, "config", None), "_name_or_path", None) or None
    return name
