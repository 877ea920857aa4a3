"""A synthetic analysis run folder, in exactly the format ``analyze`` writes: for trying the
viewer without a trained dictionary, and for testing it at any size.

    write_synthetic_run("runs/fake", n_features=10_000)   # then: viewer runs/fake

The numbers are random (seeded) but consistent with each other: a feature's max activation
is the largest value in its contexts and histogram, density 0 means no contexts.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone
from pathlib import Path

from ..files import json_text, write_text

WORDS = ["the", " cat", " sat", " on", " mat", ".", "\n", " ", "\t", " def", "(", ")", ":",
         " return", " x", " +", " 1", " is", " a", " function", " of", " and", " for", " in"]


def _context(rng: random.Random, peak: float, n_vocab: int, ctx_len: int,
             forced: list[int] | None = None) -> dict:
    """One context window whose largest activation is ``peak`` (at a random position)."""
    tokens = [rng.randrange(n_vocab) for _ in range(ctx_len)]  # [ctx_len]
    if forced:
        tokens[: len(forced)] = forced[:ctx_len]
    acts = [round(rng.random() * peak * 0.8, 4) if rng.random() < 0.4 else 0.0
            for _ in range(ctx_len)]
    pos = rng.randrange(ctx_len)
    acts[pos] = peak
    return {"tokens": tokens, "acts": acts, "max": peak, "pos": pos}


def write_synthetic_run(out: str | Path, n_features: int = 64, n_top: int = 4,
                        n_random: int = 2, ctx_len: int = 12, n_bins: int = 20,
                        extra_tokens: list[str] | None = None, special_feature: int = 0,
                        seed: int = 0, created: str | None = None) -> Path:
    """Write a run folder with ``n_features`` features to ``out`` and return its path.

    ``extra_tokens`` (e.g. HTML strings) are added to the vocabulary and placed at the start
    of ``special_feature``'s first top context, which always fires. Every seventh feature
    (other than ``special_feature``) never fires. Feature 1 (when it exists and fires) also
    gets ablation effects.
    """
    rng = random.Random(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = WORDS + [f" w{i}" for i in range(200)] + list(extra_tokens or [])
    forced = list(range(len(vocab) - len(extra_tokens or []), len(vocab)))
    cols = {"density": [], "max_activation": [], "mean_activation": [], "frac_top_tokens": []}
    upper, counts, top, rand, logits = [], [], {}, {}, {}
    for i in range(n_features):
        fires = i == special_feature or i % 7 != 3
        peak = round(rng.uniform(0.5, 20.0), 4) if fires else 0.0
        cols["density"].append(round(rng.random() ** 3, 6) if fires else 0.0)
        cols["max_activation"].append(peak)
        cols["mean_activation"].append(round(peak * rng.uniform(0.1, 0.5), 4))
        cols["frac_top_tokens"].append(round(rng.random(), 4))
        upper.append(peak)
        counts.append([rng.randrange(50) if fires else 0 for _ in range(n_bins)])
        if not fires:
            continue
        peaks = sorted((round(peak * rng.uniform(0.3, 1.0), 4) for _ in range(n_top - 1)),
                       reverse=True)
        top[str(i)] = [_context(rng, p, len(vocab), ctx_len,
                                forced if (i == special_feature and j == 0) else None)
                       for j, p in enumerate([peak] + peaks)]
        rand[str(i)] = [_context(rng, round(peak * rng.uniform(0.05, 0.5), 4), len(vocab),
                                 ctx_len) for _ in range(n_random)]
        promoted = [[vocab[rng.randrange(len(vocab))], round(rng.uniform(0.5, 3), 3)]
                    for _ in range(5)]
        suppressed = [[vocab[rng.randrange(len(vocab))], -round(rng.uniform(0.5, 3), 3)]
                      for _ in range(5)]
        logits[str(i)] = {"promoted": sorted(promoted, key=lambda p: -p[1]),
                          "suppressed": sorted(suppressed, key=lambda p: p[1])}
        if i == 1:
            logits[str(i)]["ablation"] = {"promoted": [[" cat", 0.25], [" mat", 0.1]],
                                          "suppressed": [[" sat", -0.3]], "n_contexts": 8}
    metadata = {
        "format": "dictionary_learning.analysis/1", "dictionary": "synthetic",
        "dict_class": "AutoEncoder", "activation_dim": 64, "dict_size": n_features,
        "model": "synthetic-model", "submodule": "layers.1.mlp", "io": "out",
        "ctx_len": ctx_len, "n_tokens": 100_000, "n_contexts": 100_000 // ctx_len,
        "k_top": n_top, "k_random": n_random, "rankings": list(cols),
        "logit_lens": {"final_norm_applied": True, "note": "synthetic numbers, not a model"},
        "ablation_features": [1] if n_features > 1 else [],
        "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"dictionary_learning": "synthetic"},
    }
    files = {"metadata.json": metadata, "features.json": cols,
             "histograms.json": {"n_bins": n_bins, "upper": upper, "counts": counts},
             "contexts.json": {"vocab": vocab, "top": top, "random": rand},
             "logits.json": logits}
    for name, obj in files.items():
        write_text(out / name, json_text(obj, indent=None, compact=True))
    return out
