"""Small geometric helpers for data-dependent initialisation."""

from __future__ import annotations

import torch


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5,
                     eps: float = 1e-8) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to ``points [n, d]`` (Weiszfeld).

    Starts at the mean and repeats ``y <- sum_i w_i p_i / sum_i w_i`` with
    ``w_i = 1 / max(||p_i - y||, eps)`` until ``y`` moves less than ``tol`` (or
    ``max_iter`` steps). Computed in float32 at least; returned in ``points``' dtype.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median expects points of shape [n, d] with n > 0, got shape "
                         f"{tuple(points.shape)}")
    p = points.float() if points.dtype in (torch.float16, torch.bfloat16) else points
    guess = p.mean(dim=0)
    for _ in range(max_iter):
        weights = 1.0 / (p - guess).norm(dim=-1).clamp_min(eps)
        new = weights @ p / weights.sum()
        moved = float((new - guess).norm())
        guess = new
        if moved < tol:
            break
    return guess.to(points.dtype)
