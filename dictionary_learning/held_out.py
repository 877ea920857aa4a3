"""Evaluating the dictionaries of a training run on documents it never trained on.

The held-out activations are collected once and every dictionary is measured on the same
ones, so the rows of a sweep's table compare like with like. Each dictionary's folder
gets ``eval.json`` (the metrics, with the number of tokens they are over; strict JSON, a
non-finite metric written as ``null``) and ``feature_frequencies.png``, each written
atomically (:mod:`~dictionary_learning.files`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .assess import HeldOut, held_out_from, score
from .buffer import ActivationBuffer
from .evaluation import feature_frequency_histogram
from .files import write_json

logger = logging.getLogger(__name__)

EVAL_NAME = "eval.json"
HISTOGRAM_NAME = "feature_frequencies.png"


def held_out_activations(texts: list[str], model, submodule: str, io: str, ctx_len: int,
                         loss_texts: list[str], batch_size: int = 4096,
                         dtype: torch.dtype = torch.float32) -> HeldOut:
    """Every real token's activation(s) of ``texts`` (truncated to ``ctx_len``), in batches,
    with the texts of the loss metrics."""
    buffer = ActivationBuffer(texts, model, submodule, io=io, n_ctxs=len(texts),
                              ctx_len=ctx_len, refresh_batch_size=min(32, len(texts)),
                              out_batch_size=batch_size, dtype=dtype, progress=False)
    return held_out_from(buffer, list(buffer), loss_texts)


def evaluate_held_out(dictionaries, folders: list[Path], texts: list[str], model,
                      submodule: str, run, progress: bool = True) -> list[dict]:
    """Metrics of each dictionary on ``texts`` (:func:`~dictionary_learning.assess.score`):
    reconstruction statistics over every real token of the texts, and the loss recovered
    on the first ``run.eval_loss_texts`` of them. Writes ``eval.json`` and the histogram
    into each folder and returns the metrics (``feature_frequencies`` removed)."""
    held = held_out_activations(texts, model, submodule, run.io, run.ctx_len,
                                texts[: run.eval_loss_texts], run.batch_size,
                                getattr(torch, run.dtype))
    results = []
    for dictionary, folder in tqdm(list(zip(dictionaries, folders)), desc="Evaluating",
                                   unit="dictionary", disable=not progress):
        metrics = score(dictionary, model, submodule, run.io, run.ctx_len, held,
                        where=str(folder))
        metrics["n_eval_texts"] = len(texts)
        frequencies = metrics.pop("feature_frequencies")
        feature_frequency_histogram(frequencies, Path(folder) / HISTOGRAM_NAME,
                                    title=f"{submodule}, {type(dictionary).__name__} "
                                          f"{dictionary.activation_dim}->{dictionary.dict_size}",
                                    n_tokens=metrics["n_tokens"])
        write_json(Path(folder) / EVAL_NAME, metrics)  # NaN (no loss texts) -> null
        results.append(metrics)
    return results
