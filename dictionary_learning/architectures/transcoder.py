"""A (skip) transcoder: sparse features of a submodule's input that reconstruct its output
(EleutherAI sparsify's ``transcode`` / ``skip_connection`` coders).

Inference only: it exists so that downloaded transcoders compute here what they computed in
sparsify. It is not trained by the loop.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from ..base import Dictionary, LossContext, LossOutput, check_keys, check_width
from ..registry import register

KEYS = {"encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip", "k"}


@register
class Transcoder(Dictionary):
    """``f = relu(encoder(x))``, then (``k > 0``) each token's ``k`` largest entries;
    ``decode(f) = f @ W_dec + b_dec``; ``forward(x) = decode(encode(x)) + x @ W_skip.T``
    (the skip connection, zero when the file has none). Code that edits features uses
    ``reconstruct(f, x) = decode(f) + x @ W_skip.T``.

    Stored: ``encoder.weight [m, d_in]``, ``encoder.bias [m]``, ``W_dec [m, d_out]``,
    ``b_dec [d_out]``, ``W_skip [d_out, d_in]``, buffer ``k`` (0: no top-k).
    """

    inference_only: ClassVar[bool] = True
    decoder_norm = None
    _feature_axis = {"encoder.weight": 0, "encoder.bias": 0, "W_dec": 0}
    _roles = {"W_dec": "W_dec", "W_enc": "encoder.weight", "b_enc": "encoder.bias"}

    def __init__(self, activation_dim: int, dict_size: int, k: int = 0,
                 output_dim: int | None = None):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= dict_size:
            raise ValueError(f"k must be an integer in [0, dict_size={dict_size}] (0: no "
                             f"top-k), got {k!r}")
        self.activation_dim, self.dict_size = activation_dim, dict_size
        self.output_dim = activation_dim if output_dim is None else output_dim
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.W_dec = nn.Parameter(torch.empty(dict_size, self.output_dim))
        self.b_dec = nn.Parameter(torch.zeros(self.output_dim))
        self.W_skip = nn.Parameter(torch.zeros(self.output_dim, activation_dim))
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))
        self.init_tied_rows()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_width(x, self.activation_dim, f"{type(self).__name__}.encode")
        f = torch.relu(self.encoder(x))
        k = int(self.k)
        if k == 0:
            return f
        top = f.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(f).scatter_(-1, top.indices, top.values)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """``f @ W_dec + b_dec``, without the skip connection (see ``reconstruct``)."""
        check_width(f, self.dict_size, f"{type(self).__name__}.decode")
        return f @ self.W_dec + self.b_dec

    def reconstruct(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The output predicted from (possibly edited) features ``f`` of input ``x``."""
        return self.decode(f) + x @ self.W_skip.T

    def forward(self, x: torch.Tensor, output_features: bool = False):
        f = self.encode(x)
        y_hat = self.reconstruct(f, x)
        return (y_hat, f) if output_features else y_hat

    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None,
                   ctx: LossContext = LossContext()) -> LossOutput:
        raise TypeError(f"{type(self).__name__} is inference-only (it loads sparsify "
                        "transcoders); train MLPStretcher for input -> output dictionaries")

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Multiply both biases by ``scale`` (features and outputs then scale with x)."""
        self.encoder.bias.mul_(scale)
        self.b_dec.mul_(scale)

    def config(self) -> dict:
        return {**super().config(), "k": int(self.k), "output_dim": self.output_dim}

    @classmethod
    def from_state_dict(cls, state_dict: dict, **kwargs) -> "Transcoder":
        check_keys(cls, state_dict, KEYS)
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        ae = cls(activation_dim, dict_size, k=int(state_dict["k"]),
                 output_dim=state_dict["W_dec"].shape[1])
        ae.load_state_dict(state_dict)
        return ae
