"""The data-dependent part of the ReLU family's initialisation: one encoder scale.

A ReLU dictionary starts with random unit decoder rows, encoder rows equal to them and zero
biases. Its features are then positively homogeneous in the encoder's scale ``s``
(``f(s W_enc) = s f(W_enc)``), so the first batch's reconstruction is ``b + s g`` with
``g = f(W_enc) @ W_dec``, and the ``s`` minimising its squared error is one inner product:
``s* = <t - b, g> / <g, g>``. With unit rows ``s*`` is about ``2 d / m`` (half the features
fire, each adding ``w w^T``: ``g ~ (m / 2d) x``); 0.11 for 256 -> 4096 on the demo LM,
next to upstream's fixed 0.1, and it follows the width and the data where a constant does
not. Unscaled (``s = 1``) the first reconstruction is ``~m / 2d`` times too large: on the
demo LM FVE -30 at step 15, and the run spends its first hundreds of steps recovering
(issue 19).
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def fit_encoder_scale(dictionary, x: torch.Tensor, target: torch.Tensor) -> float:
    """Multiply every encoder row of ``dictionary`` by the least-squares scale of its first
    reconstruction of ``target`` from ``x`` (see the module docstring); returns the scale
    (1.0, nothing changed, when the batch gives none: no feature fires, or a scale that is
    not positive and finite). The decoder stays as it is (unit rows)."""
    zero = dictionary.decode(x.new_zeros(1, dictionary.dict_size))[0]  # the decoder bias
    g = dictionary.decode(dictionary.encode(x)) - zero
    t = target - zero
    denominator = float(g.double().pow(2).sum())
    scale = float((t.double() * g.double()).sum()) / denominator if denominator > 0 else 0.0
    if not (math.isfinite(scale) and scale > 0):
        return 1.0
    dictionary.W_enc.mul_(scale)
    return scale
