"""Evaluating dictionary folders end to end: find them, tell what each was trained on,
collect held-out activations, measure.

One mechanism for every command that measures saved dictionaries (``evaluate``,
``histograms``):

- :func:`find_dictionaries` turns paths into dictionary locations: a folder holding
  ``ae.pt``, every such folder under a tree, or a file / folder in a foreign format that
  :func:`~dictionary_learning.loading.load_dictionary` reads.
- :func:`read_target` says where a dictionary's activations come from (model, submodule,
  ``io``, ``ctx_len``): from ``config.json`` (nested ``trainer``/``buffer`` sections or the
  older flat keys), else from the published pythia-70m-deduped layout
  ``{embed, attn_out_layerN, mlp_out_layerN, resid_out_layerN}/{set}/ae.pt``; explicit
  overrides win.
- :func:`collect` gathers held-out activations and loss texts for a target (or
  :func:`from_cache` reads them from an activation cache, in order, with no model),
  :func:`score` measures one loaded dictionary on them, and :func:`assess` runs both over
  many dictionaries, loading each model once (with a cache and no loss metrics, none) and
  collecting each target once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import islice
from typing import NamedTuple
from pathlib import Path

import torch

from .buffer import ActivationBuffer
from .evaluation import loss_recovered, reconstruction_metrics
from .loading import CONFIG_NAME, WEIGHTS_NAME, load_dictionary, read_config
from .submodules import submodule_path

logger = logging.getLogger(__name__)

# Weight files that mark a folder as a dictionary when searching a tree: ours, SAELens',
# sparsify's. A foreign single file (an OpenAI ``.pt``) must be named explicitly.
MARKERS = (WEIGHTS_NAME, "sae_weights.safetensors", "sae.safetensors")
SKIP_DIRS = {"checkpoints", ".git", "__pycache__"}

# The published pythia-70m-deduped sets (saprmarks/feature-circuits'
# dictionary_loading_utils.py): a folder per component, a subfolder per set.
PUBLISHED_MODEL = "EleutherAI/pythia-70m-deduped"
COMPONENT_RE = re.compile(r"^(embed|(attn|mlp|resid)_out_layer(\d+))$")
PUBLISHED_SUBMODULES = {"attn": "gpt_neox.layers.{}.attention", "mlp": "gpt_neox.layers.{}.mlp",
                        "resid": "gpt_neox.layers.{}"}


@dataclass(frozen=True)
class Target:
    """Where a dictionary's activations come from."""
    model: str | None       # hub id or local folder
    submodule: str | None   # dotted path in the model
    io: str = "out"
    ctx_len: int = 128
    source: str = "command line"  # what told us model and submodule


def find_dictionaries(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every dictionary at or under ``paths``, in sorted order, each once.

    A folder with an ``ae.pt`` (or a SAELens/sparsify weights file) is a dictionary; a
    folder without one is searched (``checkpoints/`` folders skipped); a file is taken as
    it is. Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for a path
    under which no dictionary was found.
    """
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no dictionary folder or file at {path}")
        if path.is_file():
            found[path] = None
            continue
        before = len(found)
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            if any(m in files for m in MARKERS):
                found[Path(root)] = None
        if len(found) == before:
            raise ValueError(f"no dictionary found under {path}: expected a folder holding "
                             f"{WEIGHTS_NAME} (or a SAELens/sparsify weights file)")
    return list(found)


def published_component(path: str | os.PathLike) -> str | None:
    """The published-layout component (``mlp_out_layer1``, ``embed``, ...) that names the
    folder ``path`` or one of its two parents, else ``None``."""
    parts = Path(path).resolve().parts
    for part in reversed(parts[-3:]):
        if COMPONENT_RE.match(part):
            return part
    return None


def published_submodule(component: str) -> str:
    """The Pythia (GPTNeoX) submodule of a published component: ``embed`` ->
    ``gpt_neox.embed_in``; ``{attn,mlp,resid}_out_layerN`` -> the output of
    ``gpt_neox.layers.N.attention`` / ``.mlp`` / the layer itself."""
    match = COMPONENT_RE.match(component)
    if match is None:
        raise ValueError(f"{component!r} is not a published component name")
    if match.group(1) == "embed":
        return "gpt_neox.embed_in"
    return PUBLISHED_SUBMODULES[match.group(2)].format(int(match.group(3)))


def folder_config(path: Path) -> dict:
    """``config.json`` (ours) or ``cfg.json`` (SAELens, sparsify) of a dictionary location."""
    folder = path if path.is_dir() else path.parent
    config = read_config(folder)
    if not config and (folder / "cfg.json").is_file():
        try:
            config = json.loads((folder / "cfg.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{folder / 'cfg.json'} is not valid JSON: {e}") from e
    return config


def _first(section: dict, *keys):
    return next((section[k] for k in keys if section.get(k) is not None), None)


def read_target(path: str | os.PathLike, config: dict | None = None, **overrides) -> Target:
    """Where the dictionary at ``path`` reads its activations, from (in order of precedence)
    ``overrides`` (``model``, ``submodule``, ``io``, ``ctx_len``; ``None`` = not given),
    ``config.json`` and the published folder layout."""
    path = Path(path)
    config = folder_config(path) if config is None else config
    nested = "trainer" in config
    trainer = config.get("trainer", config)
    buffer = config.get("buffer", {} if nested else config)
    metadata = config.get("metadata", {})  # SAELens v6
    model = _first(trainer, "lm_name", "model_name", "lm") or metadata.get("model_name")
    submodule = _first(trainer, "submodule_name", "submodule") or buffer.get("submodule_name")
    source = f"{CONFIG_NAME} ({'nested' if nested else 'flat'})" if config else "command line"
    component = published_component(path)
    if component is not None and submodule is None:
        submodule = published_submodule(component)
        model = model or PUBLISHED_MODEL
        source = f"published layout ({component})"
    target = Target(model=model, submodule=submodule, io=buffer.get("io") or "out",
                    ctx_len=int(_first(buffer, "ctx_len", "context_size") or 128), source=source)
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(target, **given) if given else target


class HeldOut(NamedTuple):
    """What every dictionary reading one target is measured on: activation batches (tensors,
    or ``(x_in, x_out)`` pairs; a list, or a cache's re-iterable rows), the texts of the
    loss metrics, and where they came from."""

    batches: Iterable
    loss_texts: list[str]
    widths: tuple[int, int]   # (d_in, d_out) of the activations
    source: str               # "gpt_neox.layers.1.mlp (out)", for messages


def held_out_from(buffer: ActivationBuffer, batches: list, loss_texts: list[str]) -> HeldOut:
    widths = buffer.d_submodule
    return HeldOut(batches, loss_texts, widths if isinstance(widths, tuple) else (widths, widths),
                   f"{buffer.submodule_name} ({buffer.io})")


@torch.no_grad()
def collect(model, target: Target, texts: Iterable[str], n_tokens: int = 8192,
            n_loss_texts: int = 64, batch_size: int = 32, rows_per_batch: int = 1024,
            loss: bool = True, seed: int = 0, device: str = "cpu") -> HeldOut:
    """``n_tokens`` shuffled real-token activations of ``target`` from an
    :class:`ActivationBuffer` of ``ceil(n_tokens / ctx_len)`` contexts (seeded with ``seed``,
    ``batch_size`` texts per forward pass), and, unless ``loss`` is false, the next
    ``n_loss_texts`` texts of the same stream for the loss metrics."""
    torch.manual_seed(seed)
    n_ctxs = max(1, math.ceil(n_tokens / target.ctx_len))
    buffer = ActivationBuffer(texts, model, target.submodule, io=target.io, n_ctxs=n_ctxs,
                              ctx_len=target.ctx_len, refresh_batch_size=batch_size,
                              out_batch_size=min(rows_per_batch, n_tokens), device=device,
                              progress=False)
    batches = list(_take(buffer, n_tokens))
    n = sum((b[0] if isinstance(b, tuple) else b).shape[0] for b in batches)
    if n < n_tokens:
        logger.warning("%s: the text ran out after %d of %d tokens", target.submodule, n,
                       n_tokens)
    loss_texts = buffer.text_batch(n_loss_texts) if loss else []
    if loss and not loss_texts:
        raise ValueError("the text ran out before the loss-recovered texts: pass more data, "
                         "fewer --n-tokens, or --no-loss")
    return held_out_from(buffer, batches, loss_texts)


def fill_from_cache(target: Target, manifest: dict) -> Target:
    """``target`` with the model and submodule it does not know taken from an activation
    cache's manifest (the submodule only when the cache holds one)."""
    changes = {}
    if target.model is None and manifest.get("model"):
        changes["model"] = manifest["model"]
    if target.submodule is None and len(manifest["submodules"]) == 1:
        changes["submodule"] = manifest["submodules"][0]
    if not changes:
        return target
    return replace(target, **changes, source=f"{target.source}; {' and '.join(changes)} "
                   "from the cache")


def from_cache(cache, target: Target, keys: list[str], texts: Iterable[str] | None = None,
               n_tokens: int | None = 8192, n_loss_texts: int = 64,
               rows_per_batch: int = 4096) -> HeldOut:
    """The first ``n_tokens`` rows (all when ``None``) of the cache's tensors ``keys``
    (:func:`~.cache.contexts.fitting_keys`), in text order and read from disk on each
    pass, and the first ``n_loss_texts`` of ``texts`` for the loss metrics (none when
    ``texts`` is ``None``)."""
    from .cache.contexts import CacheRows

    rows = CacheRows(cache, keys, n_tokens, rows_per_batch)
    if n_tokens is not None and len(rows) < n_tokens:
        logger.warning("the cache %s holds %d rows, fewer than the %d asked for: measuring "
                       "on all of them", rows.cache.folder, len(rows), n_tokens)
    loss_texts = [] if texts is None else list(islice(texts, n_loss_texts))
    if texts is not None and not loss_texts:
        raise ValueError("no text for the loss-recovered metric: pass --data, or --no-loss "
                         "to measure the cache's activations only")
    widths = {h["key"]: h["width"] for h in rows.cache.hooks}
    return HeldOut(rows, loss_texts, (widths[keys[0]], widths[keys[-1]]),
                   f"{target.submodule} ({target.io}) in the cache {rows.cache.folder}")


def check_widths(dictionary, held: HeldOut, where: str) -> None:
    """Raise a ``ValueError`` naming both widths when the dictionary does not fit the
    held-out activations."""
    d_in, d_out = held.widths
    want_in = getattr(dictionary, "activation_dim", d_in)
    want_out = getattr(dictionary, "output_dim", want_in)
    if (want_in, want_out) != (d_in, d_out):
        got = f"{d_in}" if d_in == d_out else f"{d_in} in, {d_out} out"
        want = f"{want_in}" if want_in == want_out else f"{want_in} in, {want_out} out"
        raise ValueError(f"width mismatch: {where} expects activations of width {want}, but "
                         f"{held.source} has width {got}; pick the submodule the dictionary "
                         "was trained on (--submodule)")


def _take(batches: Iterator, n_rows: int) -> Iterator:
    """The first ``n_rows`` rows of a stream of batches (tensors or tuples of tensors); no
    batch is drawn once they are served (a buffer would read more text for it)."""
    left = n_rows
    while left > 0:
        batch = next(batches, None)
        if batch is None:
            return
        rows = batch[0].shape[0] if isinstance(batch, tuple) else batch.shape[0]
        if rows > left:
            batch = tuple(b[:left] for b in batch) if isinstance(batch, tuple) else batch[:left]
        left -= min(rows, left)
        yield batch


@torch.no_grad()
def score(dictionary, model, submodule: str, io: str, ctx_len: int, held: HeldOut,
          batch_size: int = 32, where: str = "dictionary") -> dict:
    """Metrics of one dictionary on ``held``: :func:`reconstruction_metrics` over its
    batches (``feature_frequencies`` included) and, when it has loss texts,
    :func:`loss_recovered` on them: the CE figures (with ``n_loss_tokens``) and the KL ones
    (``kl_div``, ``kl_zero``, ``kl_score``, ``n_kl_tokens``)."""
    check_widths(dictionary, held, where)
    metrics = reconstruction_metrics(dictionary, held.batches)
    if not held.loss_texts:
        return metrics
    result = loss_recovered(held.loss_texts, model, submodule, dictionary, io=io,
                            ctx_len=ctx_len, batch_size=batch_size)
    result["n_loss_tokens"] = result.pop("n_tokens")
    return {**metrics, **result}


def assess(paths: list[Path], open_model: Callable[[str], object],
           open_texts: Callable[[], Iterable[str]], overrides: dict | None = None,
           device: str = "cpu", dict_class: str | None = None, widths: dict | None = None,
           batch_size: int = 32, cache=None, loss: bool = True,
           **collect_kwargs) -> Iterator[tuple[Path, Target, dict, dict]]:
    """Measure every dictionary in ``paths`` (from :func:`find_dictionaries`); yields
    ``(path, target, metrics, info)`` per dictionary, grouped by model (first-seen order),
    where ``info`` holds the class name and widths.

    Targets are read first, so a dictionary with no known model or submodule fails before
    any model loads; each distinct model is then loaded once with ``open_model(name)`` and
    reused. The held-out activations of each distinct target (submodule, io, ctx_len) are
    collected once, from a fresh ``open_texts()`` stream, and every dictionary reading that
    target is measured on them.

    With ``cache`` (a cache folder or an open :class:`~.cache.Cache`), the activation
    metrics read the first ``n_tokens`` rows of the cache in order (:func:`from_cache`),
    and a dictionary whose submodule, io or width the cache does not hold is refused
    (before its model is opened, unless only the model can resolve its short submodule
    name). The cache names the model and submodule of a dictionary that does not. The
    model is opened only for the loss metrics (on the first ``n_loss_texts`` of
    ``open_texts()``); with ``loss=False``, never.
    """
    if cache is not None:
        from .cache.contexts import fitting_keys, is_short_name, open_cache, resolve_name

        cache = open_cache(cache)
    targets = {p: read_target(p, **(overrides or {})) for p in paths}
    if cache is not None:
        targets = {p: fill_from_cache(t, cache.manifest) for p, t in targets.items()}
    for path, target in targets.items():
        missing = [k for k in ("model", "submodule") if getattr(target, k) is None]
        if missing:
            raise ValueError(f"{path}: cannot tell which {' and '.join(missing)} this "
                             f"dictionary was trained on (no {CONFIG_NAME} says so): pass "
                             + " and ".join(f"--{k}" for k in missing))
    options = {k: v for k, v in {**(widths or {}), "dict_class": dict_class}.items()
               if v is not None}  # widths to check, load options, a forced class
    by_model: dict[str, list[Path]] = {}
    for path, target in targets.items():
        by_model.setdefault(target.model, []).append(path)
    for name, group in by_model.items():
        model = open_model(name) if cache is None else None  # with a cache: when needed
        held: dict[tuple, HeldOut] = {}
        for path in group:
            dictionary, _ = load_dictionary(path, device=device, **options)
            spec = targets[path].submodule
            if cache is None:  # "1.mlp", "embed" -> the dotted path in this model
                submodule = submodule_path(model, spec)
            else:
                submodule = resolve_name(spec, cache.manifest)
                if loss and is_short_name(submodule):  # only the model can tell
                    model = open_model(name) if model is None else model
                    submodule = resolve_name(spec, cache.manifest, model)
            target = replace(targets[path], submodule=submodule)
            key = (target.submodule, target.io, target.ctx_len)
            if cache is not None:
                keys = fitting_keys(cache, submodule, target.io, dictionary, str(path))
                if loss and model is None:
                    model = open_model(name)
                if key not in held:
                    held[key] = from_cache(cache, target, keys, open_texts() if loss else None,
                                           collect_kwargs.get("n_tokens", 8192),
                                           collect_kwargs.get("n_loss_texts", 64))
            elif key not in held:
                held[key] = collect(model, target, open_texts(), batch_size=batch_size,
                                    loss=loss, device=device, **collect_kwargs)
            metrics = score(dictionary, model, target.submodule, target.io, target.ctx_len,
                            held[key], batch_size=batch_size, where=str(path))
            info = {"dict_class": type(dictionary).__name__,
                    "activation_dim": getattr(dictionary, "activation_dim", None),
                    "dict_size": getattr(dictionary, "dict_size", None)}
            del dictionary
            yield path, target, metrics, info
        del model
