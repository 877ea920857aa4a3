"""An MLP "stretcher": a dictionary from one activation to another of another width."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import Dictionary, check_keys, check_width
from ..registry import register


@register
class MLPStretcher(Dictionary):
    """Maps one activation to another of a possibly different width (e.g. an MLP's input to
    its output): ``f = relu(encoder(x_in - in_bias))``, ``y_hat = decoder(f) + out_bias``.

    Stored: ``in_bias [d_in]``, ``encoder.weight [m, d_in]``, ``encoder.bias [m]``,
    ``decoder.weight [d_out, m]``, ``out_bias [d_out]``.
    """

    _feature_axis = {"encoder.weight": 0, "encoder.bias": 0, "decoder.weight": 1}
    _roles = {"W_dec": "decoder.weight", "W_enc": "encoder.weight", "b_enc": "encoder.bias"}

    def __init__(self, activation_dim: int, dict_size: int, output_dim: int | None = None):
        super().__init__()
        self.activation_dim, self.dict_size = activation_dim, dict_size
        self.output_dim = activation_dim if output_dim is None else output_dim
        self.in_bias = nn.Parameter(torch.zeros(activation_dim))
        self.out_bias = nn.Parameter(torch.zeros(self.output_dim))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, self.output_dim, bias=False)
        with torch.no_grad():
            self.encoder.bias.zero_()
            self.set_decoder_norm_to_unit_norm()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_width(x, self.activation_dim, "MLPStretcher.encode")
        w = self.encoder.weight  # as AutoEncoder.encode: no input gradient needed
        return torch.relu(F.linear(x, w, self.encoder.bias - w @ self.in_bias))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        check_width(f, self.dict_size, "MLPStretcher.decode")
        return self.decoder(f) + self.out_bias

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        self.in_bias.mul_(scale)
        self.encoder.bias.mul_(scale)
        self.out_bias.mul_(scale)

    def config(self) -> dict:
        return {**super().config(), "output_dim": self.output_dim}

    @classmethod
    def from_state_dict(cls, state_dict: dict, **kwargs) -> "MLPStretcher":
        check_keys(cls, state_dict,
                    {"in_bias", "out_bias", "encoder.weight", "encoder.bias", "decoder.weight"})
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        output_dim = state_dict["decoder.weight"].shape[0]
        st = cls(activation_dim, dict_size, output_dim)
        st.load_state_dict(state_dict)
        return st
