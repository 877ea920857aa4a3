"""The data-dependent part of the ReLU family's initialisation, and what was measured.

Gated and JumpReLU dictionaries start with random unit decoder rows, encoder rows equal to
them and zero biases. Their features are then positively homogeneous in the encoder's
scale ``s`` (``f(s W_enc) = s f(W_enc)``), so the first batch's reconstruction is
``b + s g`` with ``g = f(W_enc) @ W_dec``, and the ``s`` minimising its squared error is one
inner product: ``s* = <t - b, g> / <g, g>`` (:func:`fit_encoder_scale`). With unit rows
``s*`` is about ``2 d / m`` (half the features fire, each adding ``w w^T``:
``g ~ (m / 2d) x``); unscaled (``s = 1``) the first reconstruction is ``~m / 2d`` times too
large (on the demo LM FVE -30 at step 15, and the run spends its first hundreds of steps
recovering; issue 19).

The plain ``AutoEncoder`` uses upstream's initialisation instead (weights of norm 0.1,
encoder bias uniform in ``±1/sqrt(d)``), because it measured better. On the demo LM at
issue 19's budget (1500 steps of 1024 rows, 256 -> 4096, the same rows and evaluator for
each; ``scripts/quality.py``; at the learning rate of the time, 1e-3 without decay, before
:data:`~dictionary_learning.architectures.autoencoder.RELU_LR`), FVE at L0 about 30 / 17:
the fitted scale with zero biases 0.9604 / 0.9017, upstream's initialisation 0.964 / 0.917
(interpolated along its own frontier: 0.9880 at L0 59.3, 0.9597 at 24.5, 0.8933 at 12.9),
and the fitted scale with upstream's random encoder bias in between (0.9607 at L0 26.2,
0.8958 at 13.8). The random
biases spread the features' first firing rates; the 0.1 decoder norm of the first step
makes that step turn the decoder directions about ten times as far as a later one (Adam
moves every entry by about the learning rate, and the unit-norm constraint then restores
the norm).
"""

from __future__ import annotations

import math

import torch

UPSTREAM_INIT_NORM = 0.1
"""The norm of the plain ``AutoEncoder``'s encoder and decoder rows at its first step."""


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
