"""What features respond to: streaming top and random contexts, and per-feature statistics.

Data flow: texts -> left-padded token batches (``tokens.py``) -> one nnsight trace per batch,
stopped after the submodule -> the dictionary's features ``f`` ``[B, T, m]`` on real tokens
(padding rows stay 0) -> :class:`ContextCollector` and :class:`FeatureStatistics`, whose memory
is bounded by the number of features (``m x k x window`` and ``m x n_bins``), never by the
amount of text.

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
        self.tokens = torch.full((dict_size, k, W), -1, dtype=torch.int64)  # -1: no token
        self.acts = torch.zeros(dict_size, k, W)
        self.offsets = torch.arange(-before, after + 1)

    @torch.no_grad()
    def update(self, f: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Merge one batch: features ``f`` ``[B, T, m]`` (0 off real tokens), ``input_ids``
        and the real-token ``mask`` ``[B, T]``."""
        f, input_ids, mask = f.float().cpu(), input_ids.cpu(), mask.cpu().bool()
        B, T, m = f.shape
        peak, pos = f.max(dim=1)                                   # [B, m]
        if self.mode == "top":
            score = peak.clone()
        else:
            score = torch.rand(B, m, generator=self.generator)
        score[peak <= 0] = -torch.inf                              # never fired here
        kk = min(self.k, B)
        cand, rows = score.topk(kk, dim=0)                         # [kk, m]
        centre = pos.gather(0, rows)                               # [kk, m]
        t = centre[..., None] + self.offsets                       # [kk, m, W]
        inside = (t >= 0) & (t < T)
        t = t.clamp(0, T - 1)
        b = rows[..., None].expand_as(t)
        valid = inside & mask[b, t]
        feat = torch.arange(m)[None, :, None].expand_as(t)
        tok = torch.where(valid, input_ids[b, t], -1)
        act = torch.where(valid, f[b, t, feat], 0.0)
        # Merge with the running state: [m, k + kk] -> best k.
        scores = torch.cat([self.scores, cand.T], dim=1)
        best, idx = scores.topk(self.k, dim=1)                     # [m, k]
        W = t.shape[-1]
        gather = idx[..., None].expand(m, self.k, W)
        self.tokens = torch.cat([self.tokens, tok.transpose(0, 1)], 1).gather(1, gather)
        self.acts = torch.cat([self.acts, act.transpose(0, 1)], 1).gather(1, gather)
        self.scores = best

    def examples(self, feature: int) -> list[Example]:
        """The feature's kept contexts, best first (by max activation for ``"top"``)."""
        out = []
        for j in range(self.k):
            if self.scores[feature, j] == -torch.inf:
                break
            keep = self.tokens[feature, j] >= 0
            acts = self.acts[feature, j][keep]
            pos = int(keep[: self.before].sum())  # the centre, counted among kept tokens
            out.append(Example(self.tokens[feature, j][keep].tolist(), acts.tolist(), pos,
                               float(acts[pos])))
        if self.mode == "random":
            out.sort(key=lambda e: -e.max)
        return out


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
        """Add the features ``[N, m]`` of ``N`` real tokens."""
        f = f.float().cpu()
        fired = f > 0
        self.n_tokens += f.shape[0]
        self.count += fired.sum(dim=0)
        self.sum += torch.where(fired, f, 0.0).double().sum(dim=0)
        self.max = torch.maximum(self.max, f.max(dim=0).values.clamp_min(0))
        alive = self.max > 0
        # floor(log2(max)) + 1, exact for floats (frexp: max = mant * 2**e, mant in [0.5, 1)).
        exponent = torch.where(alive, torch.frexp(self.max).exponent.long(), 0)
        shift = (exponent - self.exponent).clamp_min(0)
        if bool((shift > 0).any()):                  # upper doubled `shift` times: merge bins
            src = torch.arange(self.n_bins)[None] >> shift.clamp_max(62)[:, None]
            self.counts = torch.zeros_like(self.counts).scatter_add_(1, src, self.counts)
        self.exponent = torch.where(alive, exponent, self.exponent)
        upper = torch.ldexp(torch.ones(()), self.exponent.float())      # [m]
        rows, cols = fired.nonzero(as_tuple=True)
        values = f[rows, cols]
        bins = (values / upper[cols] * self.n_bins).floor().long().clamp_(0, self.n_bins - 1)
        self.counts.view(-1).scatter_add_(0, cols * self.n_bins + bins,
                                          torch.ones_like(bins))

    @property
    def upper(self) -> torch.Tensor:
        """Upper histogram edge ``[m]`` (0 for dead features)."""
        return torch.where(self.max > 0, torch.ldexp(torch.ones(()), self.exponent.float()), 0.0)

    def summary(self) -> dict[str, torch.Tensor]:
        """``density`` (fraction of real tokens firing), ``mean_activation`` (over firing
        tokens, 0 for dead features), ``max_activation``, ``n_fired``: each ``[m]``."""
        n = max(self.n_tokens, 1)
        return {"density": self.count.double() / n,
                "mean_activation": self.sum / self.count.clamp_min(1),
                "max_activation": self.max.double(), "n_fired": self.count}


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
    p = next(dictionary.parameters(), None)
    rows = x[mask.to(x.device)]
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
