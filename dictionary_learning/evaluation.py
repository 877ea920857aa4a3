"""How good is a dictionary: reconstruction statistics, loss recovered, feature frequencies.

- :func:`reconstruction_metrics` streams over batches of activations and reports exact
  token-level means (accumulated in float64, so any batching gives the same numbers).
- :func:`loss_recovered` runs the language model three times on the same text (clean, with
  the submodule's activation replaced by the dictionary's reconstruction, and with it
  zero-ablated) and compares next-token cross-entropies on real tokens, and the KL
  divergences of the patched next-token distributions from the clean one.
- :func:`evaluate` combines both, taking its defaults from an ``ActivationBuffer``.
- :func:`feature_frequency_histogram` plots how often each feature fires.

Returned dicts are flat: scalar metrics as Python floats (``n_tokens`` and friends as ints)
plus one tensor, ``"feature_frequencies"`` ``[m]``; pop it before logging the rest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import torch

from .files import atomic_write
from .submodules import IO_MODES, hidden_states, resolve_submodule, with_hidden_states
from .tokens import tokenize_batch

logger = logging.getLogger(__name__)

# When zero-ablation raises the loss by less than this fraction of the clean loss, the
# submodule barely matters (typical of random-weight models) and "fraction recovered" is a
# ratio of two tiny numbers: it is still reported, with a warning.
MIN_LOSS_GAP = 0.01


def _batches(activations) -> Iterable:
    if isinstance(activations, torch.Tensor):
        return [activations]
    if isinstance(activations, (str, bytes)) or not isinstance(activations, Iterable):
        raise TypeError("activations must be a [N, d] tensor or an iterable of batches "
                        f"(tensors or (x_in, x_out) pairs), got {type(activations).__name__}")
    return activations


def _split(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input to encode, target to reconstruct)`` of one batch."""
    if isinstance(batch, torch.Tensor):
        return batch, batch
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
    raise TypeError(f"a batch must be a [B, d] tensor or an (x_in, x_out) pair, got "
                    f"{type(batch).__name__}{size}")


def _to_dictionary(dictionary, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the dictionary's device and in its dtype (parameter-free ones keep ``x``)."""
    p = next(dictionary.parameters(), None)
    return x if p is None else x.to(device=p.device, dtype=p.dtype)


@torch.no_grad()
def reconstruction_metrics(dictionary, activations, max_batches: int | None = None) -> dict:
    """Token-level reconstruction statistics of ``dictionary`` over ``activations``.

    ``activations``: a ``[N, d]`` tensor, or an iterable of batches (``[B, d]`` tensors, or
    ``(x_in, x_out)`` pairs for a dictionary mapping one activation to another; a single
    pair must be wrapped in a list). At most ``max_batches`` batches are read.

    Returns (means over tokens ``t``, ``x`` the target, ``x̂`` the reconstruction, ``f`` the
    features): ``mse`` = mean ||x - x̂||², ``l1`` = mean ||f||₁, ``l0`` = mean #{f != 0},
    ``frac_variance_explained`` = 1 - Σ||x - x̂||² / Σ||x - mean(x)||², ``cossim`` = mean
    cos(x̂, x) (0 for a zero vector), ``l2_ratio`` = mean ||x̂|| / ||x||, ``frac_alive`` =
    fraction of features non-zero on at least one token, ``n_tokens``, and the tensor
    ``feature_frequencies`` ``[m]`` (fraction of tokens on which each feature fired).
    """
    n = 0
    sums = dict.fromkeys(("sse", "l1", "l0", "cossim", "l2_ratio", "sq_dev"), 0.0)
    fired = shift = sum_dev = None
    for batch in islice(_batches(activations), max_batches):
        x_in, x = _split(batch)
        if x_in.shape[0] == 0:  # an empty batch adds nothing (and has no first row)
            continue
        x_hat, f = dictionary(_to_dictionary(dictionary, x_in), output_features=True)
        if x_hat.shape != x.shape:
            raise ValueError(f"reconstruction has shape {tuple(x_hat.shape)} but the target has "
                             f"{tuple(x.shape)}: for a stretcher pass (x_in, x_out) batches")
        x, x_hat = x.to(device=x_hat.device, dtype=torch.float64), x_hat.double()
        if shift is None:  # variance about a first guess of the mean avoids cancellation
            shift, sum_dev = x.mean(dim=0), torch.zeros_like(x[0])
            fired = torch.zeros(f.shape[-1], dtype=torch.long, device=f.device)
        active = f != 0
        x_norm, x_hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)
        sums["sse"] += (x - x_hat).pow(2).sum().item()
        sums["l1"] += f.abs().sum(dim=-1).double().sum().item()
        sums["l0"] += active.sum().item()
        sums["cossim"] += torch.nn.functional.cosine_similarity(x_hat, x, dim=-1).sum().item()
        sums["l2_ratio"] += (x_hat_norm / x_norm).sum().item()
        sums["sq_dev"] += (x - shift).pow(2).sum().item()
        sum_dev += (x - shift).sum(dim=0)
        fired += active.sum(dim=0)
        n += x.shape[0]
    if n == 0:
        raise ValueError("activations held no tokens: nothing to evaluate")
    # Σ||x - mean||² = Σ||x - c||² - N ||mean - c||², with mean - c = Σ(x - c) / N.
    total_var = sums["sq_dev"] - sum_dev.pow(2).sum().item() / n
    return {
        "mse": sums["sse"] / n,
        "l1": sums["l1"] / n,
        "l0": sums["l0"] / n,
        "frac_variance_explained": 1.0 - sums["sse"] / total_var if total_var > 0 else math.nan,
        "cossim": sums["cossim"] / n,
        "l2_ratio": sums["l2_ratio"] / n,
        "frac_alive": (fired > 0).double().mean().item(),
        "n_tokens": n,
        "feature_frequencies": (fired.double() / n).float().cpu(),
    }


# ---------------------------------------------------------------------------------------
# Loss recovered


def _next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ``[n]`` of each prediction whose token and next token are both real."""
    # logits [B, T, V]; the prediction at t is scored against the token at t + 1.
    ids, mask = input_ids.to(logits.device), attention_mask.to(logits.device).bool()
    keep = mask[:, :-1] & mask[:, 1:]
    logp = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1)
    return -logp.gather(-1, ids[:, 1:][keep][:, None]).squeeze(-1)


def _run(model, submodule, inputs: dict, io: str, replace):
    """``(nll, logp)``: per-prediction next-token losses (:func:`_next_token_nll`) and the
    next-token log-probabilities ``[n_real, V]`` (float32) at every real token, with the
    submodule's activation passed through ``replace`` (``None``: the clean model)."""
    with model.trace(inputs):
        if replace is not None and io == "in":
            submodule.input = replace(hidden_states(submodule.input, "submodule input"))
        elif replace is not None and io == "out":
            out = submodule.output
            new = replace(hidden_states(out, "submodule output"))
            submodule.output = with_hidden_states(out, new)
        elif replace is not None:  # in_to_out: the output becomes a map of the input
            x_in = hidden_states(submodule.input, "submodule input")
            out = submodule.output
            new = replace(x_in, hidden_states(out, "submodule output"))
            submodule.output = with_hidden_states(out, new)
        logits = model.output.logits
        nll = _next_token_nll(logits, inputs["input_ids"], inputs["attention_mask"]).save()
        real = inputs["attention_mask"].to(logits.device).bool()
        logp = torch.log_softmax(logits[real].float(), dim=-1).save()
    return nll, logp


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` ``[n]`` of each row of two log-probability tensors ``[n, V]``."""
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def _replacements(dictionary):
    """``(reconstruct, zero)``: maps of the hooked activation(s) to the new one. With two
    arguments (``in_to_out``: input, output) the result is shaped and typed like the last."""
    def reconstruct(*xs):
        x_hat = dictionary(_to_dictionary(dictionary, xs[0]))
        return x_hat.to(device=xs[-1].device, dtype=xs[-1].dtype)

    def zero(*xs):
        return torch.zeros_like(xs[-1])

    return reconstruct, zero


@torch.inference_mode()
def loss_recovered(texts: Iterable[str], model, submodule, dictionary, io: str = "out",
                   ctx_len: int = 128, batch_size: int = 32,
                   min_gap: float = MIN_LOSS_GAP) -> dict:
    """How much of the language-modelling loss survives replacing an activation by its
    reconstruction.

    Next-token cross-entropy is averaged over every position of ``texts`` (truncated to
    ``ctx_len`` tokens) whose token and next token are both real, three ways: ``loss_clean``;
    ``loss_patched`` with the activation replaced by ``dictionary``'s reconstruction of it;
    ``loss_zero`` with it set to zeros. ``io`` picks the activation: ``"out"`` the
    submodule's output, ``"in"`` its input, ``"in_to_out"`` its output replaced by
    ``dictionary(input)``. Tuple outputs (attention modules) have their hidden states
    replaced, the rest kept.

    ``frac_recovered = (loss_zero - loss_patched) / (loss_zero - loss_clean)``: 1 for a
    perfect reconstruction, 0 for one no better than zeros. When ``|loss_zero -
    loss_clean|`` is below ``min_gap`` times ``loss_clean`` (random-weight models) the
    ratio is dominated by noise: a warning is logged and ``frac_recovered`` is still
    computed (``nan`` only when the gap is exactly zero); the raw losses are always
    returned.

    ``kl_div`` is the mean over every real token of ``KL(p_clean || p_patched)`` of the
    next-token distributions (in nats), ``kl_zero`` the same with zeros, and ``kl_score =
    1 - kl_div / kl_zero`` (``nan`` when ``kl_zero`` is 0), averaged over the
    ``n_kl_tokens`` real tokens (every prediction with a real next token, plus each
    text's last token). KL needs no next token, and is less noisy than the CE difference.
    The clean log-probabilities of a batch are kept while it is patched: about
    ``batch_size x ctx_len x vocab`` floats (0.8 GB for 32 x 128 tokens of a 50k
    vocabulary).
    """
    if io not in IO_MODES:
        raise ValueError(f"io must be one of {IO_MODES}, got {io!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not a single string")
    submodule, _ = resolve_submodule(model, submodule)
    reconstruct, zero = _replacements(dictionary)
    sums, n = {"clean": 0.0, "patched": 0.0, "zero": 0.0}, 0
    kl_sums, n_kl = {"patched": 0.0, "zero": 0.0}, 0
    texts = iter(texts)
    while batch := list(islice(texts, batch_size)):
        inputs = tokenize_batch(model.tokenizer, batch, ctx_len)
        clean_logp = None
        for name, replace in (("clean", None), ("patched", reconstruct), ("zero", zero)):
            nll, logp = _run(model, submodule, inputs, io, replace)
            sums[name] += nll.double().sum().item()
            if clean_logp is None:
                clean_logp = logp
            else:
                kl_sums[name] += kl_divergence(clean_logp, logp).double().sum().item()
            del logp
        n += nll.numel()
        n_kl += clean_logp.shape[0]
    if n == 0:
        raise ValueError("texts held no pair of consecutive real tokens: nothing to evaluate")
    losses = {f"loss_{k}": v / n for k, v in sums.items()}
    gap = losses["loss_zero"] - losses["loss_clean"]
    if abs(gap) < min_gap * abs(losses["loss_clean"]):
        logger.warning("zero-ablating the submodule changes the loss by only %.3g nats (%.2g%% "
                       "of the clean loss): frac_recovered=(zero-patched)/(zero-clean) is "
                       "unreliable. Is the model randomly initialised?", gap,
                       100 * abs(gap) / max(abs(losses["loss_clean"]), 1e-12))
    frac = (losses["loss_zero"] - losses["loss_patched"]) / gap if gap != 0 else math.nan
    kl = {"kl_div": kl_sums["patched"] / n_kl, "kl_zero": kl_sums["zero"] / n_kl}
    kl["kl_score"] = 1.0 - kl["kl_div"] / kl["kl_zero"] if kl["kl_zero"] != 0 else math.nan
    return {**losses, "frac_recovered": frac, **kl, "n_tokens": n, "n_kl_tokens": n_kl}


# ---------------------------------------------------------------------------------------


def evaluate(dictionary, activations, model=None, submodule=None, io: str | None = None,
             texts: Iterable[str] | None = None, n_batches: int | None = None,
             ctx_len: int | None = None, n_texts: int = 128, batch_size: int = 32,
             min_gap: float = MIN_LOSS_GAP) -> dict:
    """:func:`reconstruction_metrics` on ``n_batches`` of ``activations`` (all when
    ``None``), then, when a model and text are at hand, :func:`loss_recovered`.

    An ``ActivationBuffer``-like ``activations`` (attributes ``model``, ``submodule``,
    ``io``, ``ctx_len``, method ``text_batch(n)``) supplies the defaults of ``model``,
    ``submodule``, ``io``, ``ctx_len``, and ``texts`` (its next ``n_texts`` texts). Returns
    one flat dict: the reconstruction metrics (``n_tokens`` counts activations), plus
    ``loss_clean``, ``loss_patched``, ``loss_zero``, ``frac_recovered``, ``kl_div``,
    ``kl_zero``, ``kl_score``, ``n_loss_tokens`` and ``n_kl_tokens`` when the loss was
    evaluated.
    """
    model = model if model is not None else getattr(activations, "model", None)
    submodule = submodule if submodule is not None else getattr(activations, "submodule", None)
    io = io or getattr(activations, "io", None) or "out"
    ctx_len = ctx_len or getattr(activations, "ctx_len", None) or 128
    metrics = reconstruction_metrics(dictionary, activations, max_batches=n_batches)
    if texts is None and hasattr(activations, "text_batch"):
        texts = activations.text_batch(n_texts)
        if not texts:
            raise ValueError("the buffer's text stream is used up, so no text is left for the "
                             "loss metrics: pass texts=[...] or a longer stream")
    if model is None or submodule is None or texts is None:
        logger.info("no model, submodule or text given: loss recovered not evaluated")
        return metrics
    loss = loss_recovered(texts, model, submodule, dictionary, io=io, ctx_len=ctx_len,
                          batch_size=batch_size, min_gap=min_gap)
    loss["n_loss_tokens"] = loss.pop("n_tokens")
    return {**metrics, **loss}


def feature_frequency_histogram(frequencies, path, title: str | None = None,
                                bins: int = 50, n_tokens: int | None = None) -> Path:
    """Save a histogram of log10 feature frequency to ``path`` (PNG) and return the path.

    Dead features (frequency 0) have no logarithm: they are counted and the count (over
    ``n_tokens`` tokens, when given) is written on the plot, clear of the bars (see
    :func:`~dictionary_learning.frequency_plots.frequency_histogram_figure`). Uses
    matplotlib's Agg canvas directly, leaving pyplot's backend alone. The file is written
    atomically: a failed or killed write leaves the old one.
    """
    from .frequency_plots import frequency_histogram_figure

    fig = frequency_histogram_figure(frequencies, title, bins, n_tokens)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
