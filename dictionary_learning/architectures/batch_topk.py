"""The BatchTopK autoencoder (Bussmann et al. 2024; upstream's ``BatchTopKSAE``)."""

from __future__ import annotations

import torch

from ..registry import register
from ..distributed import LOCAL, Batch
from ..sparse import global_batch_topk_code
from .topk import AutoEncoderTopK


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
    if threshold < 0:
        threshold.copy_(current)
    else:
        threshold.mul_(beta).add_((1 - beta) * current)


def count_step_and_update_threshold(sae, features: torch.Tensor, batch: Batch = LOCAL
                                     ) -> None:
    """After a training step of a batch-top-k dictionary: count the step and, once more than
    ``sae.threshold_start_step`` steps have passed, fold the batch into the threshold."""
    sae._steps_seen += 1
    if sae._steps_seen > sae.threshold_start_step:
        update_threshold(sae.threshold, features, sae.threshold_beta, batch)


@register
class BatchTopKSAE(AutoEncoderTopK):
    """Keeps the ``k * B`` largest latents of a whole training batch of ``B`` tokens, so
    tokens use ``k`` latents on average; at inference, a latent is active when it exceeds
    a threshold estimated in training.

    ``post = relu(encoder(x - b_dec))``; training: ``f`` = the top ``k * B`` entries of
    ``post`` over the batch; inference (``encode``): ``f = post * (post > threshold)``.
    ``threshold = -1`` means not estimated yet: ``encode`` then falls back to each
    token's top ``k`` (upstream would return all of ``post``).
    ``x_hat = decoder(f) + b_dec``. Stored: the keys of :class:`AutoEncoderTopK`.

    The threshold is updated after each optimizer step (``apply_constraints``) from the
    step's training features, once more than ``threshold_start_step`` steps have passed:
    a running average with weight ``threshold_beta`` (default 0.999, as upstream) of the
    smallest positive selected activation in the batch. The step count is not in ``ae.pt``
    (a dictionary loaded from it waits ``threshold_start_step`` steps again before
    updating); a resumed training run restores it from the trainer state.
    Loss: as :class:`AutoEncoderTopK` (``mse`` + ``auxk``).
    """

    _training_counters = ("_steps_seen",)

    def __init__(self, activation_dim: int, dict_size: int, k: int, auxk_alpha: float = 1 / 32,
                 k_aux: int | None = None, threshold_beta: float = 0.999,
                 threshold_start_step: int = 1000):
        super().__init__(activation_dim, dict_size, k, auxk_alpha=auxk_alpha, k_aux=k_aux)
        if not 0 <= threshold_beta < 1:
            raise ValueError(f"threshold_beta must be in [0, 1), got {threshold_beta}")
        self.threshold_beta = float(threshold_beta)
        self.threshold_start_step = int(threshold_start_step)
        self._steps_seen = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return threshold_encode(self.pre_activations(x), self.threshold, int(self.k))

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
