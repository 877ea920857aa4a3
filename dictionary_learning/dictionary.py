"""Dictionaries: sparse autoencoders that map activations to features and back.

Every dictionary has the same face:

- ``encode(x)``   ``[..., d_in]  -> [..., m]``   feature activations ``f``
- ``decode(f)``   ``[..., m]     -> [..., d_out]`` reconstruction ``x_hat``
- ``forward(x, output_features=False)`` returns ``x_hat`` (and ``f`` when asked)
- ``loss_terms(x, target, penalty)`` the named loss terms the training loop weighs
- ``from_pretrained(path, device=...)`` loads an ``ae.pt`` file or the folder holding it

Stored parameters keep the published layouts (see ``shared/FORMATS.md``), so files
people already downloaded load unchanged. Shared code (constraints, resampling) never
reads stored parameters directly: it goes through one accessor layout,

- ``W_dec``  ``[m, d_out]``  row ``i`` is feature ``i``'s decoder direction
- ``W_enc``  ``[m, d_in]``   row ``i`` is feature ``i``'s encoder direction
- ``b_enc``  ``[m]``

which are views sharing storage with the parameters (and ``.grad`` of those views is
read with :func:`feature_rows`), so in-place edits through them edit the dictionary.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch
import torch.nn as nn

from .registry import register

# ---------------------------------------------------------------------------------------
# Loss terms, defined once. All are means over tokens of a per-token quantity.


def reconstruction_loss(x_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the squared L2 error of each token: ``mean_t ||x_t - x_hat_t||^2``."""
    return (target - x_hat).pow(2).sum(dim=-1).mean()


def l1_loss(f: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the L1 norm of each token's feature vector."""
    return f.abs().sum(dim=-1).mean()


def entropy_loss(f: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean over tokens of the entropy of ``p = f / sum(f)`` (features are non-negative).

    A token with no active feature contributes 0.
    """
    p = f / (f.sum(dim=-1, keepdim=True) + eps)
    return -(p * torch.log(p + eps)).sum(dim=-1).mean()


PENALTIES = {"l1": l1_loss, "entropy": entropy_loss}


def check_width(x: torch.Tensor, width: int, what: str) -> None:
    """Raise a ``ValueError`` naming the offending shape when ``x``'s last axis is not ``width``."""
    if x.ndim == 0 or x.shape[-1] != width:
        raise ValueError(
            f"{what} expects a tensor whose last dimension is {width}, got shape {tuple(x.shape)}"
        )


def feature_rows(t: torch.Tensor, feature_axis: int) -> torch.Tensor:
    """View ``t`` with the feature axis first (``[m, ...]``); the view shares storage."""
    return t if feature_axis == 0 else t.transpose(0, feature_axis)


# ---------------------------------------------------------------------------------------


class Dictionary(nn.Module):
    """Base class. Subclasses set ``activation_dim`` (input width), ``dict_size`` (m) and
    ``output_dim`` (reconstruction width; equal to ``activation_dim`` except for stretchers),
    and implement ``encode``/``decode``.

    ``decoder_norm`` is the constraint kept on decoder rows after every step:
    ``"unit"`` (renormalised, gradient parallel to each row projected out) or ``None``.
    """

    activation_dim: int
    dict_size: int
    output_dim: int
    decoder_norm: ClassVar[str | None] = "unit"
    # Where each stored parameter keeps its feature axis; filled by subclasses.
    _feature_axis: ClassVar[dict[str, int]] = {}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, output_features: bool = False):
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f) if output_features else x_hat

    def loss_terms(
        self, x: torch.Tensor, target: torch.Tensor | None = None, penalty: str = "l1"
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Named loss terms for a batch, and the features (for dead-feature statistics).

        ``target`` is what the reconstruction should match (``x`` itself unless the
        dictionary maps one activation to another). ``penalty`` names the sparsity term.
        """
        target = x if target is None else target
        x_hat, f = self(x, output_features=True)
        return {"mse": reconstruction_loss(x_hat, target), penalty: PENALTIES[penalty](f)}, f

    # -- accessor layout ------------------------------------------------------------------
    def _rows(self, name: str) -> torch.Tensor:
        return feature_rows(self.get_parameter(name), self._feature_axis[name])

    @property
    def W_dec(self) -> torch.Tensor:
        return self._rows(self._decoder_param)

    @property
    def W_enc(self) -> torch.Tensor:
        return self._rows(self._encoder_param)

    @property
    def b_enc(self) -> torch.Tensor:
        return self.get_parameter(self._encoder_bias_param)

    def feature_parameters(self) -> dict[str, tuple[nn.Parameter, int]]:
        """Every parameter indexed by feature, with the axis that indexes it."""
        return {n: (self.get_parameter(n), ax) for n, ax in self._feature_axis.items()}

    # -- constraints -------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale so every decoder row has unit norm, leaving outputs unchanged:
        feature ``i`` is multiplied by its norm, so its encoder row and bias scale with it."""
        norms = self.W_dec.norm(dim=-1)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[:, None])
        self.b_enc.mul_(norms)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out of each decoder row's gradient its component along that row."""
        param = self.get_parameter(self._decoder_param)
        if param.grad is None:
            return
        w = self.W_dec
        g = feature_rows(param.grad, self._feature_axis[self._decoder_param])
        g.sub_((g * w).sum(dim=-1, keepdim=True) * w)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        w = self.W_dec
        w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    # -- persistence ---------------------------------------------------------------------
    def config(self) -> dict:
        """Constructor arguments; with the class name this rebuilds an empty dictionary."""
        return {"activation_dim": self.activation_dim, "dict_size": self.dict_size}

    @classmethod
    def from_state_dict(cls, state_dict: dict, **kwargs) -> "Dictionary":
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "Dictionary":
        """Load from an ``ae.pt`` file (a state_dict) or the folder that holds it."""
        from .loading import read_state_dict

        state_dict = read_state_dict(path)
        dictionary = cls.from_state_dict(state_dict)
        return dictionary.to(device=device, dtype=dtype)


def _check_keys(cls: type, state_dict: dict, expected: set[str]) -> None:
    missing, unexpected = expected - state_dict.keys(), state_dict.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not fit {cls.__name__}: missing keys {sorted(missing)}, "
            f"unexpected keys {sorted(unexpected)}"
        )


@register
class AutoEncoder(Dictionary):
    """The published ReLU autoencoder, one hidden layer, untied weights.

    ``f = relu(encoder(x - bias))``, ``x_hat = decoder(f) + bias``.
    Stored: ``bias [d]``, ``encoder.weight [m, d]``, ``encoder.bias [m]``,
    ``decoder.weight [d, m]`` (column ``i`` is feature ``i``).
    """

    _feature_axis = {"encoder.weight": 0, "encoder.bias": 0, "decoder.weight": 1}
    _decoder_param, _encoder_param, _encoder_bias_param = (
        "decoder.weight", "encoder.weight", "encoder.bias")

    def __init__(self, activation_dim: int, dict_size: int):
        super().__init__()
        self.activation_dim = self.output_dim = activation_dim
        self.dict_size = dict_size
        self.bias = nn.Parameter(torch.zeros(activation_dim))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        # Random unit-norm decoder directions; encoder starts as their transpose.
        with torch.no_grad():
            w = torch.randn(dict_size, activation_dim)
            w /= w.norm(dim=-1, keepdim=True)
            self.decoder.weight.copy_(w.T)
            self.encoder.weight.copy_(w)
            self.encoder.bias.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_width(x, self.activation_dim, f"{type(self).__name__}.encode")
        return torch.relu(self.encoder(x - self.bias))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        check_width(f, self.dict_size, f"{type(self).__name__}.decode")
        return self.decoder(f) + self.bias

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Multiply every bias by ``scale`` (for activations rescaled by the same factor)."""
        self.bias.mul_(scale)
        self.encoder.bias.mul_(scale)

    @classmethod
    def from_state_dict(cls, state_dict: dict, **kwargs) -> "AutoEncoder":
        _check_keys(cls, state_dict, {"bias", "encoder.weight", "encoder.bias", "decoder.weight"})
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        ae = cls(activation_dim, dict_size)
        ae.load_state_dict(state_dict)
        return ae


@register
class MLPStretcher(Dictionary):
    """Maps one activation to another of a possibly different width (e.g. an MLP's input to
    its output): ``f = relu(encoder(x_in - in_bias))``, ``y_hat = decoder(f) + out_bias``.

    Stored: ``in_bias [d_in]``, ``encoder.weight [m, d_in]``, ``encoder.bias [m]``,
    ``decoder.weight [d_out, m]``, ``out_bias [d_out]``.
    """

    _feature_axis = {"encoder.weight": 0, "encoder.bias": 0, "decoder.weight": 1}
    _decoder_param, _encoder_param, _encoder_bias_param = (
        "decoder.weight", "encoder.weight", "encoder.bias")

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
        return torch.relu(self.encoder(x - self.in_bias))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        check_width(f, self.dict_size, "MLPStretcher.decode")
        return self.decoder(f) + self.out_bias

    def config(self) -> dict:
        return {**super().config(), "output_dim": self.output_dim}

    @classmethod
    def from_state_dict(cls, state_dict: dict, **kwargs) -> "MLPStretcher":
        _check_keys(cls, state_dict,
                    {"in_bias", "out_bias", "encoder.weight", "encoder.bias", "decoder.weight"})
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        output_dim = state_dict["decoder.weight"].shape[0]
        st = cls(activation_dim, dict_size, output_dim)
        st.load_state_dict(state_dict)
        return st


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

    @classmethod
    def from_state_dict(cls, state_dict: dict, activation_dim: int | None = None, **kwargs):
        if activation_dim is None:
            raise ValueError("IdentityDict has no weights: pass activation_dim")
        return cls(activation_dim)
