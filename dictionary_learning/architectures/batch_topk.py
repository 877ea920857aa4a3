"""The BatchTopK autoencoder (Bussmann et al. 2024; upstream's ``BatchTopKSAE``)."""

from __future__ import annotations

import torch

from ..registry import register
from ..distributed import LOCAL, Batch
from ..sparse import global_batch_topk_code
from .topk import AUXK_ALPHA, AutoEncoderTopK


# Horizon of the estimate kept before ``threshold_start_step`` (about the last 10 batches):
# it is what a dictionary saved before the running average started encodes with.
EARLY_THRESHOLD_BETA = 0.9


def threshold_schedule(total_steps: int) -> dict:
    """When a batch-top-k dictionary of a run of ``total_steps`` starts estimating its
    inference threshold, and how fast the running average forgets: upstream's 1000 steps
    and 0.999 for long runs; in a short run, a quarter of it and a horizon of a tenth of
    the rest, so the threshold reflects the trained dictionary rather than its first steps
    (0.999 over 375 steps keeps 69% of the first estimate)."""
    start = min(1000, total_steps // 4)
    beta = min(0.999, max(0.0, 1 - 10 / max(1, total_steps - start)))
    return {"threshold_start_step": start, "threshold_beta": beta}


def threshold_encode(post: torch.Tensor, threshold: torch.Tensor, k: int) -> torch.Tensor:
    """Inference encoding of the batch-top-k family: ``post * (post > threshold)`` once the
    threshold is estimated (``>= 0``); before that, each token's ``k`` largest of ``post``."""
    if threshold >= 0:
        return post * (post > threshold)
    top = post.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(post).scatter_(-1, top.indices, top.values)


@torch.no_grad()
def update_threshold(threshold: torch.Tensor, features: torch.Tensor, beta: float,
                     batch: Batch = LOCAL) -> None:
    """Running average (in place) of the batch's smallest positive selected activation:
    the first estimate is taken as is, then ``threshold <- beta * threshold + (1 - beta) *
    min``; a batch with no positive activation contributes 0 (as upstream)."""
    active = batch.min(features.masked_fill(features <= 0, float("inf")).amin())
    current = torch.where(torch.isinf(active), torch.zeros_like(active), active).float()
    current = current.to(threshold.device)  # a restored counter may sit on another device
    if threshold < 0:
        threshold.copy_(current)
    else:
        threshold.mul_(beta).add_((1 - beta) * current)


def count_step_and_update_threshold(sae, features: torch.Tensor, batch: Batch = LOCAL
                                     ) -> None:
    """After a training step of a batch-top-k dictionary: count the step and, once more than
    ``sae.threshold_start_step`` steps have passed, fold the batch into the threshold;
    before that, into the short-horizon estimate ``sae.early_threshold``
    (``EARLY_THRESHOLD_BETA``), which a run that stops early is encoded and saved with."""
    sae._steps_seen += 1
    if sae._steps_seen > sae.threshold_start_step:
        update_threshold(sae.threshold, features, sae.threshold_beta, batch)
    else:
        update_threshold(sae.early_threshold, features, EARLY_THRESHOLD_BETA, batch)


def add_early_threshold(sae) -> None:
    """Register ``early_threshold`` (-1: no step yet) as a buffer outside the state_dict,
    so ``ae.pt`` keeps the published keys; the trainer state saves it as a counter."""
    sae.register_buffer("early_threshold", torch.tensor(-1.0), persistent=False)


def inference_threshold(sae) -> torch.Tensor:
    """The threshold ``encode`` uses: the running average once estimated, else the early
    estimate of the steps trained so far (-1 when there is none: per-token top-k)."""
    return torch.where(sae.threshold >= 0, sae.threshold,
                       sae.early_threshold.to(sae.threshold.device))


@torch.no_grad()
def scale_early_threshold(sae, scale: float) -> None:
    if sae.early_threshold >= 0:
        sae.early_threshold.mul_(scale)


def inference_state_dict(sae) -> tuple[dict, dict]:
    """``(state_dict, note)`` to save: the state_dict with ``threshold`` set to the one
    ``encode`` uses (a dictionary trained fewer than ``threshold_start_step`` steps is saved
    with its early estimate, so every loader, upstream's too, encodes it as here), and a
    note for ``config.json`` saying which inference rule the file holds and where its
    threshold came from. Training resumes from the trainer state, whose ``threshold`` stays
    the running average's (-1 until it starts)."""
    state_dict = sae.state_dict()
    steps, start = sae._steps_seen, sae.threshold_start_step
    if float(sae.threshold) >= 0:
        note = {"rule": "threshold", "threshold": float(sae.threshold),
                "estimated_from": f"running average (beta {sae.threshold_beta}) of each "
                                  f"batch's smallest selected activation after step {start}"}
    elif float(sae.early_threshold) >= 0:
        state_dict["threshold"] = sae.early_threshold.detach().clone().to(
            state_dict["threshold"])
        note = {"rule": "threshold", "threshold": float(sae.early_threshold),
                "estimated_from": f"the {steps} steps trained, before threshold_start_step="
                                  f"{start}: running average (beta {EARLY_THRESHOLD_BETA}) of "
                                  "each batch's smallest selected activation"}
    else:
        note = {"rule": "per-token top-k", "k": int(sae.k),
                "reason": "no training step estimated a threshold (threshold = -1 in the "
                          "file): this package encodes each token's top k; upstream's "
                          "loader would keep every positive pre-activation"}
    return state_dict, note


@register
class BatchTopKSAE(AutoEncoderTopK):
    """Keeps the ``k * B`` largest latents of a whole training batch of ``B`` tokens, so
    tokens use ``k`` latents on average; at inference, a latent is active when it exceeds
    a threshold estimated in training.

    ``post = relu(encoder(x - b_dec))``; training: ``f`` = the top ``k * B`` entries of
    ``post`` over the batch; inference (``encode``): ``f = post * (post > threshold)``.
    ``threshold = -1`` means not estimated yet: ``encode`` then uses the estimate of the
    steps trained before ``threshold_start_step`` (``early_threshold``, a running average
    over about the last 10 batches), or with no step at all each token's top ``k``
    (upstream would return all of ``post``). A folder is saved with the threshold
    ``encode`` uses (:func:`inference_state_dict`) and ``config.json`` says which.
    ``x_hat = decoder(f) + b_dec``. Stored: the keys of :class:`AutoEncoderTopK`.

    The threshold is updated after each optimizer step (``apply_constraints``) from the
    step's training features, once more than ``threshold_start_step`` steps have passed:
    a running average with weight ``threshold_beta`` (default 0.999, as upstream) of the
    smallest positive selected activation in the batch. The step count is not in ``ae.pt``
    (a dictionary loaded from it waits ``threshold_start_step`` steps again before
    updating); a resumed training run restores it from the trainer state.
    Loss: as :class:`AutoEncoderTopK` (``mse`` + ``auxk``).
    """

    _training_counters = ("_steps_seen", "early_threshold")

    def __init__(self, activation_dim: int, dict_size: int, k: int,
                 auxk_alpha: float = AUXK_ALPHA, k_aux: int | None = None,
                 threshold_beta: float = 0.999, threshold_start_step: int = 1000):
        super().__init__(activation_dim, dict_size, k, auxk_alpha=auxk_alpha, k_aux=k_aux)
        if not 0 <= threshold_beta < 1:
            raise ValueError(f"threshold_beta must be in [0, 1), got {threshold_beta}")
        self.threshold_beta = float(threshold_beta)
        self.threshold_start_step = int(threshold_start_step)
        self._steps_seen = 0
        add_early_threshold(self)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return threshold_encode(self.pre_activations(x), inference_threshold(self), int(self.k))

    def inference_state_dict(self) -> tuple[dict, dict]:
        return inference_state_dict(self)

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        super().scale_biases(scale)
        scale_early_threshold(self, scale)

    def select(self, pre: torch.Tensor, batch: Batch = LOCAL):
        return global_batch_topk_code(pre, int(self.k), batch)

    @torch.no_grad()
    def apply_constraints(self, out=None) -> None:
        """Renormalise decoder rows; then update the threshold from ``out.features``."""
        super().apply_constraints(out)
        if out is not None:
            count_step_and_update_threshold(self, out.features, out.batch)

    def config(self) -> dict:
        return {**super().config(), "threshold_beta": self.threshold_beta,
                "threshold_start_step": self.threshold_start_step}
