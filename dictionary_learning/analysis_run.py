"""One analysis run: stream text through the model and dictionary (or read an activation
cache's rows), then write a run folder.

Run folder (all JSON, compact, floats to 4 significant digits; feature id = list index or
string key)::

    metadata.json    what was analysed and how (format "dictionary_learning.analysis/1")
    features.json    {metric: [m values]} for every ranking metric
    histograms.json  {"n_bins", "upper": [m], "counts": [m x n_bins]}
    contexts.json    {"vocab": [token text], "top": {id: [example]}, "random": {id: [example]}}
                     example = {"tokens": [vocab index], "acts": [...], "max", "pos"}
    logits.json      {id: {"promoted": [[token, value]], "suppressed": [...],
                           "ablation": {"promoted", "suppressed", "n_contexts"}}}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .interpret import (RANKINGS, ContextCollector, FeatureStatistics,
                        cached_feature_activations, feature_activations, round_significant)
from .buffer import model_name
from .logit_effects import ablation_effect, logit_lens
from .files import json_text, remove_stale_temps, write_text
from .saving import versions
from .submodules import resolve_submodule

logger = logging.getLogger(__name__)

FORMAT = "dictionary_learning.analysis/1"
FILES = ("metadata.json", "features.json", "histograms.json", "contexts.json", "logits.json")
ABLATION_NOTE = ("ablation value of a token = mean over the feature's top contexts of "
                 "log p_clean - log p_ablated of that token as the next token after the "
                 "max-activating one (positive: the feature promotes it); the contexts are the "
                 "stored windows, so the model sees at most window_before tokens before it")


@dataclass
class Analysis:
    """What :func:`analyze` measured. ``scores``: ranking name -> ``[m]``; ``lens``: the
    :func:`~.logit_effects.logit_lens` result (``None`` when not applicable, with ``lens_note``
    saying why); ``ablation``: feature id -> (mean effect ``[V]``, number of contexts);
    ``info``: what was analysed (dictionary class and widths, model, submodule, io, ctx_len)."""

    stats: FeatureStatistics
    top: ContextCollector
    random: ContextCollector
    scores: dict[str, torch.Tensor]
    n_tokens: int
    n_contexts: int
    lens: dict | None = None
    lens_note: str = ""
    ablation: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def analyze(model, submodule, dictionary, texts=None, io: str = "out", ctx_len: int = 128,
            batch_size: int = 32, n_tokens: int | None = 100_000, k_top: int = 10,
            k_random: int = 5, before: int = 24, after: int = 8, n_bins: int = 20,
            rankings: list[str] | None = None, n_ablation: int = 10,
            apply_final_norm: bool = True, remove_bos: bool = False, seed: int = 0,
            progress: bool = True, cache=None) -> Analysis:
    """Top and random contexts, statistics and ranking scores of every feature over at most
    ``n_tokens`` real tokens of ``texts``; the logit lens of every feature; ablation effects
    of the ``n_ablation`` features ranked highest by the first of ``rankings``.

    With ``cache`` (a cache folder or an open :class:`~.cache.Cache`) instead of ``texts``,
    the statistics and contexts come from the cache's rows of ``submodule``'s ``io``
    (contexts rebuilt from its token ids and positions, ``batch_size`` a batch): the model
    runs only for the ablations. The contexts are the cache's, so its ``ctx_len`` and
    ``remove_bos`` replace the arguments. A cache of another submodule, io or width is one
    :class:`~.cache.CacheError`."""
    rankings = list(dict.fromkeys(rankings or RANKINGS))
    unknown = [r for r in rankings if r not in RANKINGS]
    if unknown:
        raise ValueError(f"unknown ranking metric(s) {unknown}; known: {sorted(RANKINGS)}")
    if (texts is None) == (cache is None):
        raise TypeError("pass either texts or cache (where the activations come from)")
    m = dictionary.dict_size
    stats = FeatureStatistics(m, n_bins)
    top = ContextCollector(m, k_top, before, after, mode="top")
    rand = ContextCollector(m, k_random, before, after, mode="random",
                            generator=torch.Generator().manual_seed(seed))
    dotted = resolve_submodule(model, submodule)[1]
    source: dict = {}
    if cache is None:
        batches = feature_activations(model, submodule, dictionary, texts, io, ctx_len,
                                      batch_size, n_tokens, remove_bos, progress)
    else:
        from .cache.contexts import fitting_keys, open_cache

        cache = open_cache(cache)
        key = fitting_keys(cache, dotted, io, dictionary)[0]  # in_to_out encodes the input
        batches = cached_feature_activations(cache, key, dictionary, batch_size, n_tokens,
                                             progress)
        ctx_len, remove_bos = cache.manifest["ctx_len"], cache.manifest["remove_bos"]
        source = {"cache": str(cache.folder), "remove_bos": remove_bos}
    n_contexts = 0
    for inputs, f, mask in batches:
        stats.update(f[mask.to(f.device)])
        top.update(f, inputs["input_ids"], mask)
        rand.update(f, inputs["input_ids"], mask)
        n_contexts += f.shape[0]
    if stats.n_tokens == 0:
        raise ValueError("the texts held no tokens: nothing to analyse")
    summary = stats.summary()
    scores = {name: RANKINGS[name](summary).double().cpu() for name in rankings}
    info = {"dict_class": type(dictionary).__name__, "activation_dim": dictionary.activation_dim,
            "dict_size": m, "model": model_name(model), "submodule": dotted, "io": io,
            "ctx_len": ctx_len, **source}
    result = Analysis(stats, top, rand, scores, stats.n_tokens, n_contexts, info=info)
    try:
        result.lens = logit_lens(dictionary, model._module, apply_final_norm=apply_final_norm)
        result.lens_note = ("W_U @ (g * W_dec[i]) with g the final norm's weight (no centring, "
                            "no scaling by the residual norm, no bias)"
                            if result.lens["final_norm_applied"] else "W_U @ W_dec[i]")
    except ValueError as e:
        result.lens_note = f"not computed: {e}"
        logger.warning("logit lens %s", result.lens_note)
    alive = summary["n_fired"] > 0
    order = scores[rankings[0]].masked_fill(~alive, -torch.inf).argsort(descending=True)
    n_ablation = n_ablation if dictionary.W_dec is not None else 0
    chosen = order[: min(n_ablation, int(alive.sum()))].tolist()
    for i in tqdm(chosen, desc="Ablating features", disable=not progress or not chosen):
        examples = top.examples(i)
        effect = ablation_effect(model, submodule, dictionary, i, [e.tokens for e in examples],
                                 [e.pos for e in examples], io=io)
        result.ablation[i] = (effect, len(examples))
    return result


# -- writing -------------------------------------------------------------------------------
def _rl(values) -> list[float]:
    return round_significant(torch.as_tensor(values)).tolist()


class _TokenText:
    """Token id -> displayed text (raw, unescaped), decoded one token at a time."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                                         clean_up_tokenization_spaces=False)
        return self.cache[token_id]


def _contexts_json(result: Analysis, text: _TokenText) -> dict:
    vocab: dict[int, int] = {}

    def encode(e) -> dict:  # acts are rounded already
        return {"tokens": [vocab.setdefault(t, len(vocab)) for t in e.tokens],
                "acts": e.acts, "max": e.max, "pos": e.pos}

    out = {"top": {}, "random": {}}
    for name, collector in (("top", result.top), ("random", result.random)):
        for i, examples in enumerate(collector.all_examples(acts_round=round_significant)):
            if examples:
                out[name][str(i)] = [encode(e) for e in examples]
    return {"vocab": [text(t) for t in vocab], **out}


def _logits_json(result: Analysis, text: _TokenText, top: int = 10) -> dict:
    def pairs(values, ids) -> list:
        return [[text(t), v] for v, t in zip(_rl(values), ids.tolist())]

    out: dict[str, dict] = {}
    if result.lens is not None:
        (pv, pi), (sv, si) = result.lens["promoted"], result.lens["suppressed"]
        for i in range(pv.shape[0]):
            out[str(i)] = {"promoted": pairs(pv[i], pi[i]), "suppressed": pairs(sv[i], si[i])}
    for i, (effect, n) in result.ablation.items():
        k = min(top, effect.numel())
        pv, pi = effect.topk(k)
        sv, si = effect.topk(k, largest=False)
        out.setdefault(str(i), {})["ablation"] = {
            "promoted": pairs(pv, pi), "suppressed": pairs(sv, si), "n_contexts": n}
    return out


def write_run_folder(result: Analysis, out: str | Path, tokenizer,
                     info: dict | None = None) -> list[Path]:
    """Write the five files of a run folder into ``out`` (created if needed) and return their
    paths. Each file is written atomically with the user's permissions
    (:func:`~dictionary_learning.files.atomic_write`); temporary files a killed earlier run
    left in ``out`` are removed first. ``info`` adds to or overrides ``result.info`` in the metadata (e.g. the
    ``dictionary`` path, or a ``model`` name to show)."""
    out = Path(out)
    text = _TokenText(tokenizer)
    summary = result.stats.summary()
    metadata = {
        "format": FORMAT, "dictionary": None, **result.info, **(info or {}), "n_tokens": result.n_tokens, "n_contexts": result.n_contexts,
        "k_top": result.top.k, "k_random": result.random.k,
        "window_before": result.top.before, "window_after": result.top.after,
        "rankings": list(result.scores),
        "logit_lens": {"final_norm_applied": bool(result.lens and
                                                  result.lens["final_norm_applied"]),
                       "note": result.lens_note},
        "ablation_features": list(result.ablation), "ablation_note": ABLATION_NOTE,
        "histogram_note": "linear bins from 0 to `upper`, the smallest power of two above the "
                          "feature's max activation; only firing (> 0) values are counted",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    features = {name: _rl(s) for name, s in result.scores.items()}
    for name in ("density", "mean_activation", "max_activation"):
        features.setdefault(name, _rl(summary[name]))
    histograms = {"n_bins": result.stats.n_bins, "upper": _rl(result.stats.upper),
                  "counts": result.stats.counts.tolist()}
    documents = dict(zip(FILES, (metadata, features, histograms, _contexts_json(result, text),
                                 _logits_json(result, text))))
    removed = remove_stale_temps(out)  # what a killed earlier run left
    if removed:
        logger.info("removed %d temporary file(s) a killed run left in %s", removed, out)
    paths = []
    for name, obj in documents.items():
        write_text(out / name, json_text(obj, indent=None, compact=True))
        paths.append(out / name)
    return paths
