"""The Matryoshka BatchTopK autoencoder (Bussmann et al. 2025; upstream's
``MatryoshkaBatchTopKSAE``): nested prefixes of the dictionary each reconstruct on their own."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..base import Dictionary, LossContext, LossOutput, check_keys, check_width, reconstruction_loss
from ..geometry import geometric_median
from ..registry import register
from ..sparse import auxk_loss, encode_sparse, global_batch_topk_code, sparse_decode
from .batch_topk import (add_early_threshold, count_step_and_update_threshold,
                         inference_state_dict, inference_threshold, scale_early_threshold,
                         threshold_encode)
from .topk import AUXK_ALPHA, TOPK_LR, TOPK_LR_DECAY_FRACTION, check_k


@register
class MatryoshkaBatchTopKSAE(Dictionary):
    """BatchTopK with latents in consecutive groups, trained so that every prefix of
    groups (the first group, the first two, ..., all) reconstructs the input by itself.

    ``post = relu((x - b_dec) @ W_enc + b_enc)``; training keeps the top ``k * B``
    entries of the batch; inference ``f = post * (post > threshold)`` (``threshold = -1``,
    not yet estimated: the early estimate of a short run, else each token's top ``k``, as
    :class:`BatchTopKSAE`); ``x_hat = f @ W_dec + b_dec``.
    Stored (published layout): ``W_enc [d, m]``, ``b_enc [m]``, ``W_dec [m, d]`` (unit
    rows), ``b_dec [d]``, buffers ``k``, ``threshold``, ``group_sizes [n_groups]``.
    Note: attribute access ``self.W_enc`` is the accessor layout ``[m, d]`` of ``base.py``;
    the stored parameter (``state_dict()["W_enc"]``) is ``[d, m]``.

    Loss: the SUM over the ``n`` nested prefixes of each prefix's reconstruction error
    ``mean_t ||x_t - (b_dec + sum_{i < end_j} f_i W_dec[i])||^2``, reported as ``mse`` (the
    full dictionary, the last prefix) plus ``prefix_mse`` (the other ``n - 1``), plus
    ``auxk`` on the full reconstruction's residual as in :class:`AutoEncoderTopK`.
    Upstream weights prefixes by ``1/n`` (the mean); with Adam that only rescales the
    reconstruction relative to ``auxk``. The threshold is estimated as in
    :class:`BatchTopKSAE` (``threshold_beta``, ``threshold_start_step``).
    """

    _feature_axis = {"W_enc": 1, "b_enc": 0, "W_dec": 0}
    _roles = {"W_dec": "W_dec", "W_enc": "W_enc", "b_enc": "b_enc"}
    _training_counters = ("_steps_seen", "early_threshold")
    default_lr = TOPK_LR
    lr_decay_fraction = TOPK_LR_DECAY_FRACTION

    def __init__(self, activation_dim: int, dict_size: int, k: int, group_sizes: list[int],
                 auxk_alpha: float = AUXK_ALPHA, k_aux: int | None = None,
                 threshold_beta: float = 0.999, threshold_start_step: int = 1000):
        super().__init__()
        group_sizes = [int(g) for g in group_sizes]
        if not group_sizes or min(group_sizes) < 1 or sum(group_sizes) != dict_size:
            raise ValueError(f"group_sizes must be positive and sum to dict_size={dict_size}, "
                             f"got {group_sizes}")
        if not 0 <= threshold_beta < 1:
            raise ValueError(f"threshold_beta must be in [0, 1), got {threshold_beta}")
        self.activation_dim = self.output_dim = activation_dim
        self.dict_size = dict_size
        self.auxk_alpha = float(auxk_alpha)
        self.k_aux = activation_dim // 2 if k_aux is None else int(k_aux)
        self.threshold_beta = float(threshold_beta)
        self.threshold_start_step = int(threshold_start_step)
        self._steps_seen = 0
        self.register_buffer("k", torch.tensor(check_k(k, dict_size), dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("group_sizes", torch.tensor(group_sizes))
        add_early_threshold(self)
        self.W_enc = nn.Parameter(torch.empty(activation_dim, dict_size))
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.W_dec = nn.Parameter(torch.empty(dict_size, activation_dim))
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        self.init_tied_rows()

    @property
    def group_ends(self) -> list[int]:
        """Where each prefix ends: the cumulative group sizes."""
        return torch.cumsum(self.group_sizes, 0).tolist()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        check_width(x, self.activation_dim, "MatryoshkaBatchTopKSAE.encode")
        return torch.relu(nn.functional.linear(x - self.b_dec, self.W_enc, self.b_enc))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return threshold_encode(self.pre_activations(x), inference_threshold(self), int(self.k))

    def inference_state_dict(self) -> tuple[dict, dict]:
        """As :meth:`BatchTopKSAE.inference_state_dict`."""
        return inference_state_dict(self)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        check_width(f, self.dict_size, "MatryoshkaBatchTopKSAE.decode")
        return f @ self.W_dec + self.b_dec

    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None,
                   ctx: LossContext = LossContext()) -> LossOutput:
        check_width(x, self.activation_dim, "MatryoshkaBatchTopKSAE.loss_terms")
        if x.ndim != 2:
            raise ValueError(f"loss_terms expects a batch [B, d], got shape {tuple(x.shape)}")
        target = x if target is None else target
        x_c = x - self.b_dec
        pre, code, vals = encode_sparse(
            x_c, self.W_enc, self.b_enc,
            lambda p: global_batch_topk_code(p, int(self.k), ctx.batch))
        x_hat, prefix_losses, start = self.b_dec.expand_as(target), [], 0
        for end in self.group_ends:
            group, mask = code.restrict(start, end)
            x_hat = x_hat + sparse_decode(group, vals[mask], self.W_dec[start:end])
            prefix_losses.append(reconstruction_loss(x_hat, target))
            start = end
        aux = auxk_loss(target - x_hat, x_c, self.W_enc, self.b_enc, self.W_dec, pre, ctx.dead,
                        self.k_aux, ctx.batch)
        terms = {"mse": prefix_losses[-1], "prefix_mse": sum(prefix_losses[:-1], x.new_zeros(())),
                 "auxk": self.auxk_alpha * aux}
        return LossOutput(terms, code.to_dense(vals.detach()), sparsity=None, batch=ctx.batch)

    @torch.no_grad()
    def apply_constraints(self, out=None) -> None:
        """Renormalise decoder rows; then update the threshold from ``out.features``."""
        super().apply_constraints(out)
        if out is not None:
            count_step_and_update_threshold(self, out.features, out.batch)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """``b_dec`` := the geometric median of the first batch."""
        self.b_dec.copy_(geometric_median(x))

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        self.b_enc.mul_(scale)
        self.b_dec.mul_(scale)
        if self.threshold >= 0:
            self.threshold.mul_(scale)
        scale_early_threshold(self, scale)

    def config(self) -> dict:
        return {**super().config(), "k": int(self.k), "group_sizes": self.group_sizes.tolist(),
                "auxk_alpha": self.auxk_alpha, "k_aux": self.k_aux,
                "threshold_beta": self.threshold_beta,
                "threshold_start_step": self.threshold_start_step}

    @classmethod
    def from_state_dict(cls, state_dict: dict, k: int | None = None, **kwargs):
        """Widths, ``k`` and ``group_sizes`` come from the tensors."""
        check_keys(cls, state_dict,
                   {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"})
        activation_dim, dict_size = state_dict["W_enc"].shape
        stored_k = int(state_dict["k"])
        if k is not None and k != stored_k:
            raise ValueError(f"k={k} was given but the state_dict has k={stored_k}")
        ae = cls(activation_dim, dict_size, stored_k, state_dict["group_sizes"].tolist())
        ae.load_state_dict(state_dict)
        return ae
