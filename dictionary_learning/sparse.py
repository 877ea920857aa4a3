"""Sparse training kernels for the TopK family (TopK, BatchTopK, Matryoshka).

In training, a TopK-style dictionary keeps only a few latents per token, so everything
after the encoder's dense product can touch just those latents:

    pre   = x_c @ W_enc.T + b_enc                     dense [B, m], computed without autograd
    code  = selection(pre)                            which (token, latent) pairs are active
    vals  = relu(gather_preacts(x_c, W_enc, b_enc, pre, code))       [N]  (custom backward)
    x_hat = sparse_decode(code, vals, W_dec)                          [B, d]

``gather_preacts``'s backward touches only the ``N`` selected entries: the input gradient
is an ``embedding_bag`` over the selected encoder rows, the encoder weight gradient an
``embedding_bag`` over the selected tokens, grouped by latent (``B*k*d`` work instead of
a dense ``[m, B] @ [B, d]`` product), the bias gradient an ``index_add``. The decode is
``embedding_bag`` with per-sample weights, whose own backward already touches only the
selected decoder rows (the weight gradient accumulates ``N`` rows; the value gradient is
a gathered dot product), so it needs no custom Function.

Weights are passed in the accessor layout of ``base.py`` (rows are features,
``[m, d]``); views of stored parameters in another layout are fine.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
import torch.nn.functional as F

from .distributed import LOCAL, Batch


class SparseCode:
    """The active entries of a ``[B, m]`` activation matrix: ``rows[n], cols[n]`` for
    ``n < N``, rows non-decreasing (row-major order). Values are kept separately, so one
    code serves the forward values and their gradients."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]):
        assert rows.shape == cols.shape and rows.ndim == 1, (rows.shape, cols.shape)
        self.rows, self.cols, self.shape = rows, cols, (int(shape[0]), int(shape[1]))

    def __len__(self) -> int:
        return self.rows.numel()

    @cached_property
    def row_offsets(self) -> torch.Tensor:
        """``[B]``: where each row's entries start (``embedding_bag`` offsets)."""
        return _offsets(self.rows, self.shape[0])

    @cached_property
    def col_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(perm [N], offsets [m])``: entries grouped by column, and where each starts."""
        perm = torch.sort(self.cols, stable=True).indices
        return perm, _offsets(self.cols[perm], self.shape[1])

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """The ``[B, m]`` matrix holding ``values [N]`` at the active entries, zeros elsewhere."""
        dense = values.new_zeros(self.shape)
        dense[self.rows, self.cols] = values
        return dense

    def restrict(self, start: int, stop: int) -> tuple["SparseCode", torch.Tensor]:
        """The entries with ``start <= col < stop``, as a code of the ``[B, stop - start]``
        column block (columns renumbered from 0), and the mask that picked them."""
        mask = (self.cols >= start) & (self.cols < stop)
        return SparseCode(self.rows[mask], self.cols[mask] - start,
                          (self.shape[0], stop - start)), mask


def _offsets(sorted_ids: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]``: where each id's run starts in the non-decreasing ``sorted_ids`` (the number
    of entries below it). A search, not ``bincount``, which waits for the device on CUDA
    to learn its output size."""
    return torch.searchsorted(sorted_ids, torch.arange(n, device=sorted_ids.device,
                                                       dtype=sorted_ids.dtype))


# ---------------------------------------------------------------------------------------
# Selections. Each takes the dense pre-activations (before ReLU: top-k commutes with it,
# and a selected non-positive entry becomes a zero activation with zero gradient).


@torch.no_grad()
def topk_code(pre: torch.Tensor, k: int) -> SparseCode:
    """Each token's ``k`` largest pre-activations."""
    B, m = pre.shape
    cols = pre.topk(k, dim=-1, sorted=False).indices.reshape(-1)
    rows = torch.arange(B, device=pre.device).repeat_interleave(k)
    return SparseCode(rows, cols, (B, m))


@torch.no_grad()
def batch_topk_code(pre: torch.Tensor, n: int) -> SparseCode:
    """The ``n`` largest pre-activations of the whole batch (BatchTopK: ``n = k * B``).

    Exact, but avoids a top-n over all ``B * m`` entries: take each row's ``c``
    largest as candidates, then the top ``n`` of the candidates. If no row has all of its
    ``c`` candidates selected, every unselected entry of every row is at most an
    unselected candidate, so the result is the exact top ``n``; otherwise ``c`` grows.
    """
    B, m = pre.shape
    n = min(n, B * m)
    c = min(m, 2 * math.ceil(n / B))
    while c < m:
        cand_vals, cand_cols = pre.topk(c, dim=-1, sorted=False)
        picked = cand_vals.reshape(-1).topk(n, sorted=False).indices
        per_row = torch.zeros(B, dtype=torch.long, device=pre.device).index_add_(
            0, picked // c, torch.ones_like(picked))
        if int(per_row.max()) < c:  # the one host sync of the selection
            flat = (picked // c) * m + cand_cols.reshape(-1)[picked]
            break
        c = min(m, 4 * c)
    else:
        flat = pre.reshape(-1).topk(n, sorted=False).indices
    flat = flat.sort().values
    return SparseCode(flat // m, flat % m, (B, m))


def global_batch_topk_code(pre: torch.Tensor, k: int, batch: Batch = LOCAL) -> SparseCode:
    """BatchTopK's selection when the batch is split over ranks: the ``k * B`` largest
    pre-activations of the global batch of ``B`` rows, each rank keeping its own. Each rank
    proposes its local top ``k * B`` (no more can be selected from it), the ranks share
    those values, and an entry is selected when it reaches the global ``k * B``-th largest.
    In one process this is :func:`batch_topk_code`."""
    if batch.world_size == 1:
        return batch_topk_code(pre, k * pre.shape[0])
    n = k * int(batch.sum(torch.tensor(pre.shape[0], device=pre.device)))
    local = batch_topk_code(pre, n)
    vals = pre[local.rows, local.cols]
    proposals = pre.new_full((n,), float("-inf"))
    proposals[:len(vals)] = vals
    cut = batch.gather(proposals).topk(n, sorted=False).values.min()
    keep = vals >= cut
    return SparseCode(local.rows[keep], local.cols[keep], pre.shape)


@torch.no_grad()
def dead_topk_code(pre: torch.Tensor, dead: torch.Tensor, k: int) -> SparseCode | None:
    """Each token's ``min(k, #dead)`` largest pre-activations among the ``dead`` latents
    (bool ``[m]``); ``None`` when none is dead."""
    dead_ids = dead.nonzero().squeeze(1)
    if dead_ids.numel() == 0:
        return None
    B, m = pre.shape
    k = min(k, dead_ids.numel())
    local = pre.index_select(1, dead_ids).topk(k, dim=-1, sorted=False).indices
    rows = torch.arange(B, device=pre.device).repeat_interleave(k)
    return SparseCode(rows, dead_ids[local.reshape(-1)], (B, m))


# ---------------------------------------------------------------------------------------
# Kernels.


class _GatherPreacts(torch.autograd.Function):
    """``pre[rows, cols]`` where ``pre = x @ W.T + b``, with a backward that touches only
    the selected entries."""

    @staticmethod
    def forward(ctx, x, W, b, pre, code):
        ctx.code = code
        ctx.save_for_backward(x, W)
        return pre[code.rows, code.cols]

    @staticmethod
    def backward(ctx, grad):
        x, W = ctx.saved_tensors
        code = ctx.code
        grad = grad.to(W.dtype)  # under autocast, pre (and so grad) may be lower precision
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # grad_x[t] = sum over t's entries of grad[n] * W[cols[n]]
            grad_x = F.embedding_bag(code.cols, W.contiguous(), code.row_offsets, mode="sum",
                                     per_sample_weights=grad)
        if ctx.needs_input_grad[1]:
            # grad_W[i] = sum over latent i's entries of grad[n] * x[rows[n]]
            perm, col_offsets = code.col_order
            grad_W = F.embedding_bag(code.rows[perm], x.contiguous(), col_offsets, mode="sum",
                                     per_sample_weights=grad[perm].to(x.dtype))
        if ctx.needs_input_grad[2]:
            grad_b = grad.new_zeros(code.shape[1]).index_add_(0, code.cols, grad)
        return grad_x, grad_W, grad_b, None, None


def gather_preacts(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                   pre: torch.Tensor, code: SparseCode) -> torch.Tensor:
    """The selected pre-activations ``[N]``, differentiable in ``x [B, d]``, ``W_enc [m, d]``
    and ``b_enc [m]``; ``pre`` must be ``x @ W_enc.T + b_enc`` (its gradient is not used)."""
    return _GatherPreacts.apply(x, W_enc, b_enc, pre.detach(), code)


def sparse_decode(code: SparseCode, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``[B, d]``: each token's sum of ``values[n] * W_dec[cols[n]]`` over its entries
    (no bias), differentiable in ``values`` and ``W_dec [m, d]``. Computed in ``W_dec``'s
    dtype (under autocast, ``values`` may arrive in a lower precision)."""
    # A strided weight (a transposed view of an nn.Linear decoder) sends embedding_bag and
    # its backward down a slow path: one contiguous copy is far cheaper.
    return F.embedding_bag(code.cols, W_dec.contiguous(), code.row_offsets, mode="sum",
                           per_sample_weights=values.to(W_dec.dtype))


def encode_sparse(x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                  select) -> tuple[torch.Tensor, SparseCode, torch.Tensor]:
    """The training-time encoder of the family: ``(pre [B, m], code, vals [N])`` with
    ``pre = x_c @ W_enc.T + b_enc`` (no autograd: the only dense product), ``code =
    select(pre)`` and ``vals = relu(pre[code])`` differentiable through the sparse backward."""
    with torch.no_grad():
        pre = torch.addmm(b_enc, x_c, W_enc.t())
    code = select(pre)
    return pre, code, torch.relu(gather_preacts(x_c, W_enc, b_enc, pre, code))


# ---------------------------------------------------------------------------------------
# The AuxK loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", A.2).


def relu_leaky_gradient(x: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """``relu(x)`` whose gradient is ``negative_slope`` where ``x < 0`` (1 where ``x > 0``)."""
    if negative_slope == 0:
        return torch.relu(x)
    return torch.relu(x) + negative_slope * (x - x.detach()) * (x < 0)


AUXK_NEGATIVE_SLOPE = 0.1
"""The gradient AuxK passes back through a dead latent's ReLU where its pre-activation is
negative (the forward value stays 0). With a plain ReLU (slope 0, as OpenAI's and
upstream's code) a dead latent whose pre-activations are all negative gets no gradient
from AuxK and stays dead for good: in a TopK k 32 dictionary trained at issue 19's budget
(demo LM, 1500 steps of 1024 rows, 256 -> 4096), 200 of the 476 latents that never fired
on the last 262k training rows had no positive pre-activation there at all. Chosen by
measurement at that budget, at the TopK family's earlier learning rate (1e-3, no decay;
now :data:`~dictionary_learning.architectures.topk.TOPK_LR`) (seed 0; features alive on
the last 262k training rows / on the held-out documents, FVE, CE loss recovered):

- slope 0 (textbook): 0.866 / 0.730, FVE 0.9902, CE 0.9879
- slope 0.01: 0.918 / 0.753, FVE 0.9900, CE 0.9856
- slope 0.1: 0.967 / 0.796, FVE 0.9900, CE 0.9866
- slope 1 (straight-through): 0.985 / 0.797, FVE 0.9862, CE 0.9742
- slope 1 for the first half of the run, then 0: 0.941 / 0.790, FVE 0.9899, CE 0.9851

In ``scripts/quality.py`` (each line's three dictionaries trained together), at k 32:
TopK 0.963 / 0.793 alive, FVE 0.9897; BatchTopK 0.997 / 0.836 (before: 0.990 / 0.846),
FVE 0.9915; Matryoshka 0.992 / 0.781 (before: 0.951 / 0.721), FVE 0.9928. Seed 1, trained
alone: TopK 0.963 / 0.788, FVE 0.9893 (before: 0.727 held-out, FVE 0.9896); BatchTopK
0.997 / 0.849, FVE 0.9918 (before: 0.859 held-out, FVE 0.9920).

Tried on the same rows and not adopted: a selection-only load-balancing bias (added to
the pre-activations for choosing the top k, sign updates towards equal firing rates,
annealed to 0 between 50% and 80% of the run) left 0.868 / 0.766 alive at FVE 0.9894;
``k_aux`` 512 and 2048 instead of ``d // 2`` left 0.881 and 0.886 alive at FVE 0.9901."""


def auxk_loss(residual: torch.Tensor, x_c: torch.Tensor, W_enc: torch.Tensor,
              b_enc: torch.Tensor, W_dec: torch.Tensor, pre: torch.Tensor,
              dead: torch.Tensor | None, k_aux: int, batch: Batch = LOCAL,
              negative_slope: float = AUXK_NEGATIVE_SLOPE) -> torch.Tensor:
    """Reconstruct the (detached) residual ``e = target - x_hat [B, d]`` from each token's
    top ``k_aux`` dead latents (by pre-activation), as OpenAI's and upstream's code do:

        e_hat = sum over the token's top-k_aux dead latents of relu(pre_i) * W_dec[i]  (no bias)
        auxk  = mean_t ||e_t - e_hat_t||^2 / mean_t ||e_t - mean_s e_s||^2

    except that the ReLU's gradient is ``negative_slope`` (not 0) where ``pre_i < 0``
    (:data:`AUXK_NEGATIVE_SLOPE`; 0 gives the textbook loss), so that a dead latent that
    never has a positive pre-activation still learns. 0 when no latent is dead (or the
    residual has no variance). Gradients reach the encoder and decoder rows of the dead
    latents only.
    """
    code = None if dead is None else dead_topk_code(pre, dead, k_aux)
    if code is None:
        return residual.new_zeros(())
    residual = residual.detach()
    vals = relu_leaky_gradient(gather_preacts(x_c, W_enc, b_enc, pre, code), negative_slope)
    l2 = (residual - sparse_decode(code, vals, W_dec)).pow(2).sum(dim=-1).mean()
    if batch.world_size == 1:
        denom = (residual - residual.mean(dim=0)).pow(2).sum(dim=-1).mean()
    else:  # the global batch's residual variance (a constant: the residual is detached)
        r = residual.double()
        sums = batch.sum(torch.cat([r.sum(0), r.pow(2).sum().view(1),
                                    r.new_tensor([r.shape[0]])]))
        n = sums[-1]
        denom = (sums[-2] / n - (sums[:-2] / n).pow(2).sum()).to(l2.dtype)
    return torch.where(denom > 0, l2 / denom.clamp_min(torch.finfo(l2.dtype).tiny),
                       torch.zeros_like(l2))
