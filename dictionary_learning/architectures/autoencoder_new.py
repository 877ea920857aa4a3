"""The ReLU autoencoder of Anthropic's April 2024 update (upstream's ``AutoEncoderNew``)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..base import Dictionary, LossContext, LossOutput, check_keys, check_width, reconstruction_loss
from ..registry import register


@register
class AutoEncoderNew(Dictionary):
    """A ReLU autoencoder with biased encoder and decoder and no pre-bias, whose decoder
    norms are free and enter the sparsity penalty instead.

    ``f = relu(encoder(x))``, ``x_hat = decoder(f)``.
    Stored: ``encoder.weight [m, d]``, ``encoder.bias [m]``, ``decoder.weight [d, m]``
    (column ``i`` is feature ``i``, not normalised), ``decoder.bias [d]``.

    Loss terms: ``mse`` and ``l1 = mean_t sum_i f_i ||W_dec[i]||`` (the L1 of the
    features weighted by their decoder norms; gradients reach the norms too).
    ``sparsity="l1"`` (the ``penalty`` choice of the loop does not apply). Initialisation
    as upstream: decoder columns of norm 0.1, encoder their transpose, biases zero.
    """

    decoder_norm = None
    _feature_axis = {"encoder.weight": 0, "encoder.bias": 0, "decoder.weight": 1}
    _roles = {"W_dec": "decoder.weight", "W_enc": "encoder.weight", "b_enc": "encoder.bias"}

    def __init__(self, activation_dim: int, dict_size: int):
        super().__init__()
        self.activation_dim = self.output_dim = activation_dim
        self.dict_size = dict_size
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=True)
        self.init_tied_rows(norm=0.1)
        with torch.no_grad():
            self.decoder.bias.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_width(x, self.activation_dim, "AutoEncoderNew.encode")
        return torch.relu(self.encoder(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        check_width(f, self.dict_size, "AutoEncoderNew.decode")
        return self.decoder(f)

    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None,
                   ctx: LossContext = LossContext()) -> LossOutput:
        target = x if target is None else target
        x_hat, f = self(x, output_features=True)
        weighted_l1 = (f * self.W_dec.norm(dim=-1)).sum(dim=-1).mean()
        return LossOutput({"mse": reconstruction_loss(x_hat, target), "l1": weighted_l1}, f,
                          sparsity="l1")

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        self.encoder.bias.mul_(scale)
        self.decoder.bias.mul_(scale)

    @classmethod
    def from_state_dict(cls, state_dict: dict, **kwargs) -> "AutoEncoderNew":
        check_keys(cls, state_dict,
                   {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"})
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        ae = cls(activation_dim, dict_size)
        ae.load_state_dict(state_dict)
        return ae
