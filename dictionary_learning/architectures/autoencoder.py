"""The published ReLU autoencoder (saprmarks/dictionary_learning's ``AutoEncoder``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import Dictionary, check_keys, check_width
from ..registry import register
from .init import UPSTREAM_INIT_NORM


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
