"""A dictionary that normalises each token before encoding (OpenAI's v5 TopK SAEs; SAELens
folders with ``normalize_activations`` = ``layer_norm`` or ``constant_norm_rescale``).

Inference only: it exists so that downloaded dictionaries of that kind compute here exactly
what they computed in their own library. It is not trained by the loop.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn

from ..base import Dictionary, LossContext, LossOutput, check_keys, check_width
from ..registry import register

NORMALIZATIONS = ("layer_norm", "constant_norm_rescale")
LN_EPS = 1e-5  # OpenAI's LN and SAELens's layer_norm both use 1e-5
KEYS = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "k", "normalization_id"}


@register
class TokenNormalizedSAE(Dictionary):
    """Normalise each token, encode, decode, and undo the normalisation.

    Per token, ``(mu, s) = normalization_stats(x)`` and ``x' = normalize(x, mu, s)``:

    - ``layer_norm``: ``mu = mean(x)``, ``s = std(x)`` (unbiased), ``x' = (x - mu) / (s + 1e-5)``
    - ``constant_norm_rescale``: ``mu = 0``, ``s = ||x|| / sqrt(d)``, ``x' = x / s``

    then ``pre = (x' - b_dec) @ W_enc + b_enc``, ``f = relu(pre) * (pre > threshold)`` and,
    when ``k > 0``, only each token's ``k`` largest entries of ``f`` are kept.
    ``decode(f) = f @ W_dec + b_dec`` is the reconstruction *in the normalised space*;
    ``forward(x)`` returns ``decode(encode(x)) * s + mu``, the reconstruction of ``x``.
    Code that edits features and decodes them must undo the normalisation:
    ``reconstruct(f, x) = denormalize(decode(f), *normalization_stats(x))``.

    Stored: ``W_enc [d, m]``, ``b_enc [m]``, ``W_dec [m, d]``, ``b_dec [d]``, ``threshold [m]``
    (0 gives a plain ReLU), buffers ``k`` (0: no top-k) and ``normalization_id`` (index into
    ``NORMALIZATIONS``).
    """

    inference_only: ClassVar[bool] = True
    decoder_norm = None
    _feature_axis = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "threshold": 0}
    _roles = {"W_dec": "W_dec", "W_enc": "W_enc", "b_enc": "b_enc"}

    def __init__(self, activation_dim: int, dict_size: int, k: int = 0,
                 normalization: str = "layer_norm"):
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got "
                             f"{normalization!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= dict_size:
            raise ValueError(f"k must be an integer in [0, dict_size={dict_size}] (0: no "
                             f"top-k), got {k!r}")
        self.activation_dim = self.output_dim = activation_dim
        self.dict_size = dict_size
        self.W_enc = nn.Parameter(torch.empty(activation_dim, dict_size))
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.W_dec = nn.Parameter(torch.empty(dict_size, activation_dim))
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        self.threshold = nn.Parameter(torch.zeros(dict_size))
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))
        self.register_buffer("normalization_id",
                             torch.tensor(NORMALIZATIONS.index(normalization)))
        self.init_tied_rows()

    @property
    def normalization(self) -> str:
        return NORMALIZATIONS[int(self.normalization_id)]

    # -- the per-token normalisation, explicit ----------------------------------------------
    def normalization_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu [..., 1], s [..., 1])`` of each token (see the class docstring)."""
        check_width(x, self.activation_dim, f"{type(self).__name__}.normalization_stats")
        if self.normalization == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            return mu, (x - mu).std(dim=-1, keepdim=True)
        return torch.zeros_like(x[..., :1]), x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1])

    def normalize(self, x: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        eps = LN_EPS if self.normalization == "layer_norm" else 0.0
        return (x - mu) / (s + eps)

    @staticmethod
    def denormalize(y: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Back from the normalised space: ``y * s + mu``."""
        return y * s + mu

    # -- the dictionary ---------------------------------------------------------------------
    def encode_normalized(self, x_n: torch.Tensor) -> torch.Tensor:
        """Features of tokens already normalised: ``[..., d] -> [..., m]``."""
        # self.W_enc is the accessor view [m, d] of the stored [d, m] parameter (base.py).
        pre = nn.functional.linear(x_n - self.b_dec, self.W_enc, self.b_enc)
        f = torch.relu(pre) * (pre > self.threshold)
        k = int(self.k)
        if k == 0:
            return f
        top = f.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(f).scatter_(-1, top.indices, top.values)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_normalized(self.normalize(x, *self.normalization_stats(x)))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """The reconstruction in the normalised space (``forward`` undoes the normalisation)."""
        check_width(f, self.dict_size, f"{type(self).__name__}.decode")
        return f @ self.W_dec + self.b_dec

    def reconstruct(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x`` from (possibly edited) features ``f``, in ``x``'s space."""
        return self.denormalize(self.decode(f), *self.normalization_stats(x))

    def forward(self, x: torch.Tensor, output_features: bool = False):
        mu, s = self.normalization_stats(x)
        f = self.encode_normalized(self.normalize(x, mu, s))
        x_hat = self.denormalize(self.decode(f), mu, s)
        return (x_hat, f) if output_features else x_hat

    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None,
                   ctx: LossContext = LossContext()) -> LossOutput:
        raise TypeError(f"{type(self).__name__} is inference-only (it loads OpenAI and SAELens "
                        "dictionaries with per-token normalisation); train another class")

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Take activations multiplied by ``scale`` with features and outputs scaled by it:
        the normalised input does not change, so the encoder (and thresholds) are multiplied
        by ``scale`` and the decoder rows divided by it."""
        self.W_enc.mul_(scale)
        self.b_enc.mul_(scale)
        self.threshold.mul_(scale)
        self.W_dec.div_(scale)

    def config(self) -> dict:
        return {**super().config(), "k": int(self.k), "normalization": self.normalization}

    @classmethod
    def from_state_dict(cls, state_dict: dict, **kwargs) -> "TokenNormalizedSAE":
        check_keys(cls, state_dict, KEYS)
        activation_dim, dict_size = state_dict["W_enc"].shape
        norm_id = int(state_dict["normalization_id"])
        if not 0 <= norm_id < len(NORMALIZATIONS):
            raise ValueError(f"normalization_id must be in [0, {len(NORMALIZATIONS)}), got "
                             f"{norm_id}")
        ae = cls(activation_dim, dict_size, k=int(state_dict["k"]),
                 normalization=NORMALIZATIONS[norm_id])
        ae.load_state_dict(state_dict)
        return ae
