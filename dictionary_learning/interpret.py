"""What features respond to: streaming top and random contexts, and per-feature statistics.

Data flow: texts -> left-padded token batches (``tokens.py``) -> one nnsight trace per batch,
stopped after the submodule (or an activation cache's rows, in contexts rebuilt from their
positions: :func:`cached_feature_activations`) -> the dictionary's features ``f``
``[B, T, m]`` on real tokens (padding rows stay 0) -> :class:`ContextCollector` and
:class:`FeatureStatistics`, whose memory is bounded by the number of features
(``m x k x window`` and ``m x n_bins``), never by the amount of text.

A feature *fires* on a token when its activation is ``> 0``. A *context* is one row of a
batch (one document, truncated to ``ctx_len`` tokens). Each context counts once per feature:
an example is the context's max-activating token for that feature, with a window of up to
``before`` tokens before it and ``after`` tokens after it (within the context) and the
feature's activation on every token of the window.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch
from tqdm.auto import tqdm

from .submodules import IO_MODES, hidden_states, resolve_submodule
from .tokens import real_token_mask, tokenize_batch

N_BINS = 20


@dataclass
class Example:
    """One context of one feature: ``tokens`` (token ids) and ``acts`` (the feature's
    activation on each), ``pos`` the index of the max-activating token, ``max`` its value."""

    tokens: list[int]
    acts: list[float]
    pos: int
    max: float


class ContextCollector:
    """The ``k`` best contexts of every feature, kept as a running top-k merge.

    ``mode="top"`` scores a context by the feature's max activation in it; ``mode="random"``
    by a uniform random key among the contexts where the feature fired, which keeps a uniform
    sample of ``k`` of them without replacement (a reservoir sample). State: scores
    ``[m, k]``, window token ids and activations ``[m, k, W]`` with ``W = before + 1 + after``.
    """

    def __init__(self, dict_size: int, k: int, before: int = 24, after: int = 8,
                 mode: str = "top", generator: torch.Generator | None = None):
        if mode not in ("top", "random"):
            raise ValueError(f"mode must be 'top' or 'random', got {mode!r}")
        if k < 1 or before < 0 or after < 0:
            raise ValueError(f"need k >= 1 and before, after >= 0; got {k}, {before}, {after}")
        self.m, self.k, self.before, self.after, self.mode = dict_size, k, before, after, mode
        self.generator = generator
        W = before + 1 + after
        self.scores = torch.full((dict_size, k), -torch.inf)
        self.tokens = torch.full((dict_size, k, W), -1, dtype=torch.int32)  # -1: no token
        self.acts = torch.zeros(dict_size, k, W)

    def _follow(self, device: torch.device) -> None:
        """Keep the state on the device of the data (no copy of whole batches to the CPU)."""
        if self.scores.device != device:
            self.scores, self.tokens, self.acts = (t.to(device) for t in (
                self.scores, self.tokens, self.acts))

    @torch.no_grad()
    def update(self, f: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Merge one batch: features ``f`` ``[B, T, m]`` (0 off real tokens), ``input_ids``
        and the real-token ``mask`` ``[B, T]``."""
        f = f.float()
        dev = f.device
        self._follow(dev)
        input_ids, mask = input_ids.to(dev), mask.to(dev).bool()
        B, T, m = f.shape
        peak, pos = f.max(dim=1)                                   # [B, m]
        if self.mode == "top":
            score = peak.clone()
        else:
            score = torch.rand(B, m, generator=self.generator).to(dev)
        score[peak <= 0] = -torch.inf                              # never fired here
        kk = min(self.k, B)
        cand, rows = score.topk(kk, dim=0)                         # [kk, m]
        centre = pos.gather(0, rows)                               # [kk, m]
        t = centre[..., None] + torch.arange(-self.before, self.after + 1, device=dev)
        # t: [kk, m, W] token positions of each candidate's window
        inside = (t >= 0) & (t < T)
        t = t.clamp(0, T - 1)
        b = rows[..., None].expand_as(t)
        valid = inside & mask[b, t]
        feat = torch.arange(m, device=dev)[None, :, None].expand_as(t)
        tok = torch.where(valid, input_ids[b, t], -1).int()
        act = torch.where(valid, f[b, t, feat], 0.0)
        # Merge with the running state: [m, k + kk] -> best k.
        scores = torch.cat([self.scores, cand.T], dim=1)
        best, idx = scores.topk(self.k, dim=1)                     # [m, k]
        W = t.shape[-1]
        gather = idx[..., None].expand(m, self.k, W)
        self.tokens = torch.cat([self.tokens, tok.transpose(0, 1)], 1).gather(1, gather)
        self.acts = torch.cat([self.acts, act.transpose(0, 1)], 1).gather(1, gather)
        self.scores = best

    def examples(self, feature: int, acts_round=None) -> list[Example]:
        """The feature's kept contexts, best first (for ``"random"``: by max activation too).
        ``acts_round`` (e.g. :func:`round_significant`) is applied to the activations."""
        return self.all_examples(acts_round, [feature])[0]

    def all_examples(self, acts_round=None, features=None) -> list[list[Example]]:
        """:meth:`examples` of every feature (or of ``features``), read out in one pass."""
        ids = torch.arange(self.m) if features is None else torch.as_tensor(features)
        ids = ids.to(self.scores.device)
        acts = self.acts[ids] if acts_round is None else acts_round(self.acts[ids])
        n_kept = (self.scores[ids] > -torch.inf).sum(dim=1).tolist()
        tokens, acts = self.tokens[ids].tolist(), acts.tolist()   # [n, k, W] as lists
        out = []
        for n, tok_rows, act_rows in zip(n_kept, tokens, acts):
            examples = []
            for tok, act in zip(tok_rows[:n], act_rows[:n]):
                lo = next(j for j, t in enumerate(tok) if t >= 0)  # valid slots: one run
                hi = len(tok) - next(j for j, t in enumerate(reversed(tok)) if t >= 0)
                pos = self.before - lo
                examples.append(Example(tok[lo:hi], act[lo:hi], pos, act[self.before]))
            if self.mode == "random":
                examples.sort(key=lambda e: -e.max)
            out.append(examples)
        return out


def round_significant(x: torch.Tensor, digits: int = 4) -> torch.Tensor:
    """``x`` rounded to ``digits`` significant digits, in float64, so that ``tolist()``
    prints short decimals (``n / 10**j`` is correctly rounded, like parsing the decimal)."""
    x = x.double()
    e = torch.floor(torch.log10(x.abs().clamp_min(1e-300)))
    j = (digits - 1 - e).clamp(-300, 300)                           # decimals to keep
    small = j >= 0
    n_small = torch.round(x * torch.pow(10.0, j.clamp_min(0)))
    n_large = torch.round(x / torch.pow(10.0, (-j).clamp_min(0)))
    out = torch.where(small, n_small / torch.pow(10.0, j.clamp_min(0)),
                      n_large * torch.pow(10.0, (-j).clamp_min(0)))
    return torch.where(x == 0, x, out)


class FeatureStatistics:
    """Streaming density, mean and max activation, and an exact histogram per feature.

    Histograms have ``n_bins`` linear bins from 0 to an upper edge per feature, counting only
    firing values: bin ``j`` holds ``j * upper / n_bins <= v < (j + 1) * upper / n_bins``.
    The upper edge is the smallest power of two strictly above the feature's max activation,
    so it is known while streaming: when a larger value arrives the edge doubles and pairs of
    bins merge, exactly. The top bins of a feature may therefore be empty (its max lies in
    ``[upper / 2, upper)``); dead features have upper 0 and no counts.
    """

    def __init__(self, dict_size: int, n_bins: int = N_BINS):
        if n_bins < 2 or n_bins % 2:
            raise ValueError(f"n_bins must be an even number >= 2, got {n_bins}")
        self.n_bins, self.n_tokens = n_bins, 0
        self.count = torch.zeros(dict_size, dtype=torch.int64)
        self.sum = torch.zeros(dict_size, dtype=torch.float64)
        self.max = torch.zeros(dict_size)
        self.exponent = torch.zeros(dict_size, dtype=torch.int64)  # upper = 2 ** exponent
        self.counts = torch.zeros(dict_size, n_bins, dtype=torch.int64)

    @torch.no_grad()
    def update(self, f: torch.Tensor) -> None:
        """Add the features ``[N, m]`` of ``N`` real tokens (the state follows their device)."""
        f = f.float()
        if self.count.device != f.device:
            for name in ("count", "sum", "max", "exponent", "counts"):
                setattr(self, name, getattr(self, name).to(f.device))
        fired = f > 0
        self.n_tokens += f.shape[0]
        self.count += fired.sum(dim=0)
        self.sum += f.clamp_min(0).sum(dim=0, dtype=torch.float64)  # firing values only
        self.max = torch.maximum(self.max, f.max(dim=0).values.clamp_min(0))
        alive = self.max > 0
        # floor(log2(max)) + 1, exact for floats (frexp: max = mant * 2**e, mant in [0.5, 1)).
        exponent = torch.where(alive, torch.frexp(self.max).exponent.long(), 0)
        shift = (exponent - self.exponent).clamp_min(0)
        if bool((shift > 0).any()):                  # upper doubled `shift` times: merge bins
            src = torch.arange(self.n_bins, device=f.device)[None] >> shift.clamp_max(62)[:, None]
            self.counts = torch.zeros_like(self.counts).scatter_add_(1, src, self.counts)
        self.exponent = torch.where(alive, exponent, self.exponent)
        upper = torch.ldexp(torch.ones((), device=f.device), self.exponent.float())   # [m]
        rows, cols = fired.nonzero(as_tuple=True)
        values = f[rows, cols]
        bins = (values / upper[cols] * self.n_bins).floor().long().clamp_(0, self.n_bins - 1)
        self.counts.view(-1).scatter_add_(0, cols * self.n_bins + bins,
                                          torch.ones_like(bins))

    @property
    def upper(self) -> torch.Tensor:
        """Upper histogram edge ``[m]`` (0 for dead features)."""
        upper = torch.ldexp(torch.ones(()), self.exponent.float().cpu())
        return torch.where(self.max.cpu() > 0, upper, 0.0)

    def summary(self) -> dict[str, torch.Tensor]:
        """``density`` (fraction of real tokens firing), ``mean_activation`` (over firing
        tokens, 0 for dead features), ``max_activation``, ``n_fired``: each ``[m]``."""
        n = max(self.n_tokens, 1)
        count = self.count.cpu()
        return {"density": count.double() / n,
                "mean_activation": self.sum.cpu() / count.clamp_min(1),
                "max_activation": self.max.double().cpu(), "n_fired": count}


# -- rankings ----------------------------------------------------------------------------
RANKINGS = {}
"""name -> function(statistics summary) -> per-feature score ``[m]`` (higher first)."""


def register_ranking(name: str):
    """Decorator adding a ranking metric: ``fn(summary: dict[str, Tensor]) -> Tensor [m]``."""
    def add(fn):
        RANKINGS[name] = fn
        return fn
    return add


register_ranking("density")(lambda s: s["density"])
register_ranking("max_activation")(lambda s: s["max_activation"])
register_ranking("mean_activation")(lambda s: s["mean_activation"])


# -- activations ---------------------------------------------------------------------------
def _encode(dictionary, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Features ``[B, T, m]`` of ``x`` ``[B, T, d]`` on real tokens, 0 elsewhere."""
    return _encode_rows(dictionary, x[mask.to(x.device)], mask)


def _encode_rows(dictionary, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Features ``[B, T, m]`` of the real tokens' ``rows`` ``[n, d]`` (``n = mask.sum()``,
    in the row-major order of ``mask``), 0 elsewhere."""
    p = next(dictionary.parameters(), None)
    if p is not None:
        rows = rows.to(device=p.device, dtype=p.dtype)
    f_rows = dictionary.encode(rows)                                 # [n, m]
    f = f_rows.new_zeros(*mask.shape, f_rows.shape[-1])
    f[mask.to(f.device)] = f_rows
    return f


def feature_activations(model, submodule, dictionary, texts: Iterable[str], io: str = "out",
                        ctx_len: int = 128, batch_size: int = 32, n_tokens: int | None = None,
                        remove_bos: bool = False, progress: bool = True) -> Iterator[tuple]:
    """Yield ``(inputs, f, mask)`` per batch of texts: the token batch (``input_ids``,
    ``attention_mask``, ``position_ids`` ``[B, T]``), the dictionary's features ``f``
    ``[B, T, m]`` (0 off real tokens) and the real-token ``mask``. Stops when the texts end or
    after the batch that reaches ``n_tokens`` real tokens. ``io="in"``/``"in_to_out"``
    encode the submodule's input, ``"out"`` its output."""
    if io not in IO_MODES:
        raise ValueError(f"io must be one of {IO_MODES}, got {io!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not a single string")
    envoy, name = resolve_submodule(model, submodule)
    kind = "output" if io == "out" else "input"
    texts, seen = iter(texts), 0
    bar = tqdm(total=n_tokens, desc="Analysing", unit="tok", disable=not progress)
    with torch.inference_mode():
        while (n_tokens is None or seen < n_tokens) and (batch := list(islice(texts,
                                                                              batch_size))):
            inputs = tokenize_batch(model.tokenizer, batch, ctx_len)
            with model.trace(inputs) as tracer:
                x = (envoy.output if kind == "output" else envoy.input).save()
                tracer.stop()
            x = hidden_states(x, f"{name} {kind}")
            if x.shape[-1] != dictionary.activation_dim:
                raise ValueError(f"{name} {kind} has width {x.shape[-1]} but the dictionary "
                                 f"takes {dictionary.activation_dim}: choose the submodule "
                                 "and io it was trained on")
            mask = real_token_mask(inputs["attention_mask"], remove_bos)
            f = _encode(dictionary, x, mask)
            seen += int(mask.sum())
            bar.update(int(mask.sum()))
            yield inputs, f, mask
    bar.close()


def cached_feature_activations(cache, key: str, dictionary, batch_size: int = 32,
                               n_tokens: int | None = None,
                               progress: bool = True) -> Iterator[tuple]:
    """:func:`feature_activations` read from an activation cache instead of a model: the
    rows of the cache's tensor ``key`` (see :func:`~.cache.contexts.fitting_keys`), in
    contexts rebuilt from the cache's positions, ``batch_size`` contexts a batch. Yields
    ``(inputs, f, mask)`` with ``inputs`` holding the contexts' left-padded ``input_ids``
    and ``attention_mask`` ``[B, T]``. Stops after the batch that reaches ``n_tokens``
    rows. A cache written ``batch_size`` texts per forward pass from the same texts gives
    the batches ``feature_activations`` gives."""
    from .cache.contexts import context_batches

    bar = tqdm(total=n_tokens, desc="Analysing (cache)", unit="tok", disable=not progress)
    with torch.inference_mode():
        for batch in context_batches(cache, [key], batch_size, n_tokens):
            f = _encode_rows(dictionary, batch.rows[0], batch.mask)
            bar.update(int(batch.mask.sum()))
            yield ({"input_ids": batch.token_ids, "attention_mask": batch.mask.long()}, f,
                   batch.mask)
    bar.close()
