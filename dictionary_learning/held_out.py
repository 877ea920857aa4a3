"""Evaluating the dictionaries of a training run on documents it never trained on.

The held-out activations are collected once and every dictionary is measured on the same
ones, so the rows of a sweep's table compare like with like. Each dictionary's folder
gets ``eval.json`` (the metrics, with the number of tokens they are over) and
``feature_frequencies.png``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .buffer import ActivationBuffer
from .evaluation import feature_frequency_histogram, loss_recovered, reconstruction_metrics

logger = logging.getLogger(__name__)

EVAL_NAME = "eval.json"
HISTOGRAM_NAME = "feature_frequencies.png"


def held_out_activations(texts: list[str], model, submodule: str, io: str, ctx_len: int,
                         batch_size: int = 4096, dtype: torch.dtype = torch.float32) -> list:
    """Every real token's activation(s) of ``texts`` (truncated to ``ctx_len``), as a list
    of batches (tensors, or ``(x_in, x_out)`` pairs for ``io="in_to_out"``)."""
    buffer = ActivationBuffer(texts, model, submodule, io=io, n_ctxs=len(texts),
                              ctx_len=ctx_len, refresh_batch_size=min(32, len(texts)),
                              out_batch_size=batch_size, dtype=dtype, progress=False)
    return list(buffer)


def evaluate_held_out(dictionaries, folders: list[Path], texts: list[str], model,
                      submodule: str, run, progress: bool = True) -> list[dict]:
    """Metrics of each dictionary on ``texts`` (see :mod:`dictionary_learning.evaluation`):
    reconstruction statistics over every real token of the texts, and the loss recovered
    on the first ``run.eval_loss_texts`` of them. Writes ``eval.json`` and the histogram
    into each folder and returns the metrics (``feature_frequencies`` removed)."""
    activations = held_out_activations(texts, model, submodule, run.io, run.ctx_len,
                                       run.batch_size, getattr(torch, run.dtype))
    loss_texts = texts[: run.eval_loss_texts]
    results = []
    for dictionary, folder in tqdm(list(zip(dictionaries, folders)), desc="Evaluating",
                                   unit="dictionary", disable=not progress):
        metrics = reconstruction_metrics(dictionary, activations)
        loss = loss_recovered(loss_texts, model, submodule, dictionary, io=run.io,
                              ctx_len=run.ctx_len)
        metrics["n_loss_tokens"] = loss.pop("n_tokens")
        metrics.update(loss)
        metrics["n_eval_texts"] = len(texts)
        frequencies = metrics.pop("feature_frequencies")
        feature_frequency_histogram(frequencies, Path(folder) / HISTOGRAM_NAME,
                                    title=f"{submodule}, {type(dictionary).__name__} "
                                          f"{dictionary.activation_dim}->{dictionary.dict_size}")
        (Path(folder) / EVAL_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
        results.append(metrics)
    return results
