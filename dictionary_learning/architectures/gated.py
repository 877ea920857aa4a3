"""The gated autoencoder (Rajamanoharan et al. 2024; upstream's ``GatedAutoEncoder``), and
its per-token normalised variant (SAELens gated SAEs with ``layer_norm`` or
``constant_norm_rescale``)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from ..base import (Dictionary, LossContext, LossOutput, check_keys, check_width, l1_loss,
                    reconstruction_loss)
from ..registry import register
from .init import fit_encoder_scale
from .token_normalized import NORMALIZATIONS, TokenNormalizedSAE


@register
class GatedAutoEncoder(Dictionary):
    """Separate paths decide whether a latent is on (gate) and how strongly (magnitude),
    sharing one encoder matrix.

    ``z = encoder(x - decoder_bias)``, ``f = [z + gate_bias > 0] * relu(exp(r_mag) * z +
    mag_bias)``, ``x_hat = decoder(f) + decoder_bias``.
    Stored: ``decoder_bias [d]``, ``encoder.weight [m, d]``, ``r_mag [m]``, ``gate_bias [m]``,
    ``mag_bias [m]``, ``decoder.weight [d, m]`` (column ``i`` is feature ``i``, unit norm).

    Loss terms (paper and upstream): ``mse``; ``l1`` of ``relu(z + gate_bias)`` (the
    sparsity term); ``aux``, the error of reconstructing from ``relu(z + gate_bias)``
    through the decoder and ``decoder_bias`` detached, which trains the gate path to
    reconstruct. ``sparsity="l1"``. The encoder starts as the decoder's transpose
    (upstream keeps ``nn.Linear``'s default initialisation), scaled before the first step
    to the least-squares fit of the first batch (:mod:`.init`).
    """

    _feature_axis = {"encoder.weight": 0, "r_mag": 0, "gate_bias": 0, "mag_bias": 0,
                     "decoder.weight": 1}
    _roles = {"W_dec": "decoder.weight", "W_enc": "encoder.weight", "b_enc": "gate_bias"}

    def __init__(self, activation_dim: int, dict_size: int):
        super().__init__()
        self.activation_dim = self.output_dim = activation_dim
        self.dict_size = dict_size
        self.decoder_bias = nn.Parameter(torch.zeros(activation_dim))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=False)
        self.r_mag = nn.Parameter(torch.zeros(dict_size))
        self.gate_bias = nn.Parameter(torch.zeros(dict_size))
        self.mag_bias = nn.Parameter(torch.zeros(dict_size))
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        self.init_tied_rows()

    def _paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, pi_gate)``: the features and the gate pre-activations."""
        check_width(x, self.activation_dim, "GatedAutoEncoder.encode")
        z = self.encoder(x - self.decoder_bias)
        pi_gate = z + self.gate_bias
        magnitude = torch.relu(self.r_mag.exp() * z + self.mag_bias)
        return (pi_gate > 0).to(magnitude.dtype) * magnitude, pi_gate

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._paths(x)[0]

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        check_width(f, self.dict_size, "GatedAutoEncoder.decode")
        return self.decoder(f) + self.decoder_bias

    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None,
                   ctx: LossContext = LossContext()) -> LossOutput:
        target = x if target is None else target
        f, pi_gate = self._paths(x)
        gate = torch.relu(pi_gate)
        x_hat_gate = gate @ self.decoder.weight.detach().T + self.decoder_bias.detach()
        terms = {"mse": reconstruction_loss(self.decode(f), target), "l1": l1_loss(gate),
                 "aux": reconstruction_loss(x_hat_gate, target)}
        return LossOutput(terms, f, sparsity="l1")

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Scale the tied encoder rows to the least-squares fit of the first batch
        (:func:`~dictionary_learning.architectures.init.fit_encoder_scale`)."""
        fit_encoder_scale(self, x, target)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit decoder columns with unchanged outputs: ``z`` and both biases of a feature
        scale with its decoder norm."""
        norms = self.W_dec.norm(dim=-1)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        super().normalize_decoder()  # decoder, encoder rows and gate_bias (the b_enc role)
        self.mag_bias.mul_(norms)

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Multiply the three biases by ``scale`` (``r_mag`` is a ratio and stays)."""
        self.decoder_bias.mul_(scale)
        self.gate_bias.mul_(scale)
        self.mag_bias.mul_(scale)

    @classmethod
    def from_state_dict(cls, state_dict: dict, **kwargs) -> "GatedAutoEncoder":
        check_keys(cls, state_dict, {"decoder_bias", "encoder.weight", "r_mag", "gate_bias",
                                     "mag_bias", "decoder.weight"})
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        ae = cls(activation_dim, dict_size)
        ae.load_state_dict(state_dict)
        return ae


@register
class TokenNormalizedGatedSAE(GatedAutoEncoder):
    """A gated autoencoder on per-token normalised inputs (SAELens gated SAEs with
    ``normalize_activations`` = ``layer_norm`` or ``constant_norm_rescale``).

    ``(mu, s)`` and ``x' = normalize(x, mu, s)`` as in :class:`TokenNormalizedSAE`;
    ``f = GatedAutoEncoder.encode(x')``; ``decode(f)`` is the reconstruction in the
    normalised space, ``forward(x) = decode(encode(x)) * s + mu`` and
    ``reconstruct(f, x)`` undoes the normalisation for edited features.
    Stored: :class:`GatedAutoEncoder`'s keys plus the buffer ``normalization_id`` (index into
    ``NORMALIZATIONS``). Inference only. The default normalisation matters only for an
    empty dictionary (a file names its own): ``constant_norm_rescale``, under which
    :meth:`scale_biases` is exact; with ``layer_norm`` its ``1e-5`` makes it hold to ~1e-5.
    """

    inference_only: ClassVar[bool] = True
    decoder_norm = None

    def __init__(self, activation_dim: int, dict_size: int,
                 normalization: str = "constant_norm_rescale"):
        super().__init__(activation_dim, dict_size)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got "
                             f"{normalization!r}")
        self.register_buffer("normalization_id",
                             torch.tensor(NORMALIZATIONS.index(normalization)))

    # the per-token statistics and their inverse are TokenNormalizedSAE's, unchanged
    normalization = TokenNormalizedSAE.normalization
    normalization_stats = TokenNormalizedSAE.normalization_stats
    normalize = TokenNormalizedSAE.normalize
    denormalize = staticmethod(TokenNormalizedSAE.denormalize)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return super().encode(self.normalize(x, *self.normalization_stats(x)))

    def reconstruct(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x`` from (possibly edited) features ``f``, in ``x``'s space."""
        return self.denormalize(self.decode(f), *self.normalization_stats(x))

    def forward(self, x: torch.Tensor, output_features: bool = False):
        mu, s = self.normalization_stats(x)
        f = super().encode(self.normalize(x, mu, s))
        x_hat = self.denormalize(self.decode(f), mu, s)
        return (x_hat, f) if output_features else x_hat

    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None,
                   ctx: LossContext = LossContext()) -> LossOutput:
        raise TypeError(f"{type(self).__name__} is inference-only (it loads SAELens gated "
                        "SAEs with per-token normalisation); train GatedAutoEncoder")

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Take activations multiplied by ``scale`` with features and outputs scaled by it:
        the normalised input does not change, so the encoder and the gate and magnitude
        biases are multiplied by ``scale`` and the decoder divided by it."""
        self.encoder.weight.mul_(scale)
        self.gate_bias.mul_(scale)
        self.mag_bias.mul_(scale)
        self.decoder.weight.div_(scale)

    def config(self) -> dict:
        return {**super().config(), "normalization": self.normalization}

    @classmethod
    def from_state_dict(cls, state_dict: dict, **kwargs) -> "TokenNormalizedGatedSAE":
        check_keys(cls, state_dict, {"decoder_bias", "encoder.weight", "r_mag", "gate_bias",
                                     "mag_bias", "decoder.weight", "normalization_id"})
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        norm_id = int(state_dict["normalization_id"])
        if not 0 <= norm_id < len(NORMALIZATIONS):
            raise ValueError(f"normalization_id must be in [0, {len(NORMALIZATIONS)}), got "
                             f"{norm_id}")
        ae = cls(activation_dim, dict_size, normalization=NORMALIZATIONS[norm_id])
        ae.load_state_dict(state_dict)
        return ae
