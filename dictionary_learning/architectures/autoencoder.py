"""The published ReLU autoencoder (saprmarks/dictionary_learning's ``AutoEncoder``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import Dictionary, check_keys, check_width
from ..registry import register
from .init import UPSTREAM_INIT_NORM

RELU_LR = 1.5e-3
"""The ReLU autoencoder's default peak learning rate (``TrainerConfig.lr=None``), chosen by
measurement together with :data:`RELU_LR_DECAY_FRACTION`. On the demo LM at issue 19's
budget (1500 steps of 1024 rows, 256 -> 4096; the same rows and held-out evaluation for
each; seed 0; ``scripts/quality.py``), L0, FVE and features alive on the run's last
262,144 training rows, by L1 penalty:

- 1e-3, no decay (the earlier default; upstream's ``StandardTrainer`` trains the same
  algorithm at 1e-3 and lay within -0.0005 to +0.0003 FVE of it): 0.1: 132.1, 0.9942,
  0.996; 0.3: 59.2, 0.9877, 0.973; 0.6: 37.3, 0.9786, 0.908; 1.2: 24.1, 0.9577, 0.788;
  2.4: 13.0, 0.8947, 0.700
- 1.5e-3, decaying over the last fifth: 0.05: 209.2, 0.9967, 0.997; 0.1: 119.3, 0.9946,
  0.987; 0.3: 55.8, 0.9887, 0.949; 0.6: 35.0, 0.9802, 0.857; 1.2: 22.6, 0.9593, 0.713;
  2.4: 11.1, 0.8944, 0.584
- 2e-3, decaying over the last fifth: 0.05: 172.8, 0.9966, 0.990; 0.1: 106.7, 0.9944,
  0.979; 0.3: 51.4, 0.9884, 0.907; 0.6: 32.5, 0.9803, 0.792; 1.2: 20.9, 0.9600, 0.619;
  2.4: 9.7, 0.8950, 0.492

At matched L0 (interpolated in log L0) 1.5e-3 lies above upstream's line by 0.0009 to
0.0147 FVE everywhere from L0 12 to 209, and 2e-3 by 0.0015 to 0.026; 2e-3 lies 0.0003 to
0.012 above 1.5e-3. The same L1 penalty gives a sparser dictionary, and fewer features
stay alive at a given L0: 90% alive is crossed near L0 44 at 1.5e-3, 50 at 2e-3, 36 at
1e-3 (upstream: 35). 1.5e-3 keeps 90% from L0 44 up while staying above upstream's line,
so it is the default. In a harness on an earlier collection of the same activations (at
L1 0.3, L0 / FVE / alive on the training window): 2e-3 with decay 51.1 / 0.9883 / 0.924
(seed 1: 50.9 / 0.9890 / 0.931); without decay 46.8 / 0.9860 / 0.902; 1.5e-3 without decay
52.4 / 0.9869 / 0.946; at 2e-3 neither ghost grads (45.3 / 0.9860 / 0.889) nor a 300-step
sparsity warm-up (48.1 / 0.9857 / 0.915) did better than the decay. Measured with the L1
penalty only; the entropy penalty (``TrainerConfig.penalty="entropy"``) gets the same
default unmeasured."""

RELU_LR_DECAY_FRACTION = 0.2
"""The ReLU autoencoder's learning rate decays linearly to 0 over this last fraction of a
run of known length (``TrainerConfig.decay_start=None``); see :data:`RELU_LR`."""


@register
class AutoEncoder(Dictionary):
    """The published ReLU autoencoder, one hidden layer, untied weights.

    ``f = relu(encoder(x - bias))``, ``x_hat = decoder(f) + bias``.
    Stored: ``bias [d]``, ``encoder.weight [m, d]``, ``encoder.bias [m]``,
    ``decoder.weight [d, m]`` (column ``i`` is feature ``i``).

    Initialisation, upstream's (measured, :mod:`.init`): random unit decoder columns,
    encoder rows equal to them, encoder bias ``nn.Linear``'s uniform draw in
    ``±1/sqrt(d)``, pre-encoder bias zero; before the first step (:meth:`init_from_data`)
    both weights are scaled to norm 0.1. The unit-norm constraint restores the decoder's
    norm after that step, so the first step turns its directions about ten times as far as
    a later one.
    """

    default_lr = RELU_LR
    lr_decay_fraction = RELU_LR_DECAY_FRACTION
    _feature_axis = {"encoder.weight": 0, "encoder.bias": 0, "decoder.weight": 1}
    _roles = {"W_dec": "decoder.weight", "W_enc": "encoder.weight", "b_enc": "encoder.bias"}

    def __init__(self, activation_dim: int, dict_size: int):
        super().__init__()
        self.activation_dim = self.output_dim = activation_dim
        self.dict_size = dict_size
        self.bias = nn.Parameter(torch.zeros(activation_dim))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        self.init_tied_rows(zero_encoder_bias=False)  # keeps nn.Linear's uniform bias draw

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_width(x, self.activation_dim, f"{type(self).__name__}.encode")
        # encoder(x - bias) written as W x + (b_enc - W bias): the same numbers, but training
        # needs no gradient with respect to the input (a sixth B x d x m product).
        w = self.encoder.weight
        return torch.relu(F.linear(x, w, self.encoder.bias - w @ self.bias))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        check_width(f, self.dict_size, f"{type(self).__name__}.decode")
        return self.decoder(f) + self.bias

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Before the first step: encoder and decoder rows scaled to norm 0.1 (upstream's
        initialisation; the data only decide when, not how)."""
        self.W_dec.mul_(UPSTREAM_INIT_NORM / self.W_dec.norm(dim=-1, keepdim=True))
        self.W_enc.mul_(UPSTREAM_INIT_NORM / self.W_enc.norm(dim=-1, keepdim=True))

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Multiply every bias by ``scale`` (for activations rescaled by the same factor)."""
        self.bias.mul_(scale)
        self.encoder.bias.mul_(scale)

    @classmethod
    def from_state_dict(cls, state_dict: dict, **kwargs) -> "AutoEncoder":
        check_keys(cls, state_dict, {"bias", "encoder.weight", "encoder.bias", "decoder.weight"})
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        ae = cls(activation_dim, dict_size)
        ae.load_state_dict(state_dict)
        return ae
