"""The identity baseline: reconstructs perfectly, for calibrating metrics."""

from __future__ import annotations

import torch

from ..base import Dictionary, check_width
from ..registry import register


@register
class IdentityDict(Dictionary):
    """A baseline that reconstructs perfectly: features are the activations themselves."""

    decoder_norm = None

    def __init__(self, activation_dim: int, dict_size: int | None = None):
        super().__init__()
        if dict_size is not None and dict_size != activation_dim:
            raise ValueError(f"IdentityDict needs dict_size == activation_dim, got {dict_size} "
                             f"!= {activation_dim}")
        self.activation_dim = self.output_dim = self.dict_size = activation_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_width(x, self.activation_dim, "IdentityDict.encode")
        return x

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        check_width(f, self.dict_size, "IdentityDict.decode")
        return f

    def scale_biases(self, scale: float) -> None:
        pass  # no biases: the identity takes any scale

    @classmethod
    def from_state_dict(cls, state_dict: dict, activation_dim: int | None = None, **kwargs):
        if activation_dim is None:
            raise ValueError("IdentityDict has no weights: pass activation_dim")
        return cls(activation_dim)
