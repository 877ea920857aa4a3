"""The TopK autoencoder (Gao et al. 2024; saprmarks/dictionary_learning's ``AutoEncoderTopK``)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..base import Dictionary, LossContext, LossOutput, check_keys, check_width, reconstruction_loss
from ..geometry import geometric_median
from ..registry import register
from ..distributed import LOCAL, Batch
from ..sparse import auxk_loss, encode_sparse, sparse_decode, topk_code

TOPK_KEYS = {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"}

AUXK_ALPHA = 1.0
"""The TopK family's default AuxK weight. OpenAI's paper and upstream use 1/32; it was
chosen here by measurement, with the trainer's dead-feature window
(:data:`~dictionary_learning.trainer.DEAD_WINDOW_FRACTION`, 20 steps at this budget): on
the demo LM at issue 19's budget (1500 steps of 1024 rows, 256 -> 4096, k 32; the same
rows and held-out evaluation for each), seeds 0 / 1, features alive and FVE:

- TopK, weight 1/32, window 150 (the earlier defaults): 0.555 / 0.538, FVE 0.9892 / 0.9889
- TopK, weight 1, window 20: 0.735 / 0.727, FVE 0.9901 / 0.9896
- BatchTopK, the earlier defaults: 0.756 / 0.761, FVE 0.9917 / 0.9921
- BatchTopK, weight 1, window 20: 0.852 / 0.859, FVE 0.9915 / 0.9920

At half the budget (750 steps, window 10), seed 0: TopK 0.544 -> 0.629 alive (FVE 0.9843
-> 0.9853), BatchTopK 0.757 -> 0.844 (FVE 0.9855 -> 0.9872). Either change alone did not
help (1500 steps, seed 0): weight 1 with the 150-step window left 0.546 (TopK) and 0.754
(BatchTopK) alive; the 20-step window with weight 1/32, 0.515 (TopK). Larger weights with
the 20-step window did no better: 2 and 4 left TopK 0.717 and 0.719, BatchTopK 0.823 and
0.828 alive, at the same FVE.

Tried with these defaults and no better (same budget, seed 0, k 32): learning rate 4e-4
(upstream's ``2e-4 / sqrt(m / 2^14)`` at this width) left TopK 0.715 alive at FVE 0.9855
and BatchTopK 0.827 at 0.9865; zeroing a latent's Adam moments when it is declared dead,
0.469 and 0.590 alive (FVE unchanged). So it is not stale second moments that keep dead
latents from reviving. Training TopK with a k that falls linearly from 4k to k over the
first 30% of the run left more alive (0.839) at the same FVE (0.9906) but lowered CE loss
recovered from 0.9879 to 0.9771, so it was not adopted either.
"""


TOPK_LR = 2e-3
"""The TopK family's default peak learning rate (``TrainerConfig.lr=None``), chosen by
measurement together with :data:`TOPK_LR_DECAY_FRACTION`. On the demo LM at issue 19's
budget (1500 steps of 1024 rows, 256 -> 4096, k 32, AuxK's defaults; the same rows and
held-out evaluation for each), FVE and features alive on the run's last 262,144 training
rows (held-out: on 8,160 tokens), seed 0 (seed 1):

- TopK, 1e-3, no decay (the earlier default): 0.9900, 0.967 alive (0.9893, 0.963)
- TopK, 1e-3, decaying over the last fifth: 0.9900, 0.982
- TopK, 2e-3, decaying: 0.9915, 0.992, held-out 0.818 (0.9915, 0.994, held-out 0.824)
- TopK, 4e-3, decaying: 0.9924, but 0.898 alive (held-out 0.678)
- BatchTopK, 1e-3, no decay: 0.9915, 0.997 (0.9918, 0.997)
- BatchTopK, 1e-3, decaying: 0.9916, 0.9995
- BatchTopK, 2e-3, decaying: 0.9937, 0.9995, held-out 0.858 (0.9939, 0.9998, 0.860)
- BatchTopK, 4e-3, decaying: 0.9950, 0.989 (held-out 0.825)
- Matryoshka, 1e-3, no decay: 0.9928, 0.992; 2e-3, decaying: 0.9943, 0.999

CE loss recovered, 2e-3 decaying against 1e-3 without decay, moved by -0.003 to +0.009
(0.9847 to 0.9940 across the five runs).
Without AuxK's gradient leak (:data:`~dictionary_learning.sparse.AUXK_NEGATIVE_SLOPE`),
2e-3 alone kept only 0.616 of TopK's features alive; upstream's width-scaled rate
(``2e-4 / sqrt(m / 2^14)``, 4e-4 here) lowered FVE to 0.9855 (TopK) and 0.9865
(BatchTopK)."""

TOPK_LR_DECAY_FRACTION = 0.2
"""The TopK family's learning rate decays linearly to 0 over this last fraction of a run
of known length (``TrainerConfig.decay_start=None``); see :data:`TOPK_LR`."""


def check_k(k, dict_size: int) -> int:
    """``k`` as an int, or a ``ValueError`` unless ``0 < k <= dict_size``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= dict_size:
        raise ValueError(f"k must be an integer in [1, dict_size={dict_size}], got {k!r}")
    return int(k)


@register
class AutoEncoderTopK(Dictionary):
    """Keeps each token's ``k`` largest latents (ReLU before top-k).

    ``post = relu(encoder(x - b_dec))``, ``f`` = the ``k`` largest entries of ``post`` per
    token, ``x_hat = decoder(f) + b_dec``.
    Stored: ``encoder.weight [m, d]``, ``encoder.bias [m]``, ``decoder.weight [d, m]``
    (column ``i`` is feature ``i``, unit norm), ``b_dec [d]``, buffers ``k`` (scalar int)
    and ``threshold`` (scalar, kept for the published layout; never estimated or used).

    Training loss: ``mse`` plus ``auxk = auxk_alpha * AuxK`` (weight :data:`AUXK_ALPHA`,
    measured; see ``sparse.auxk_loss``:
    the residual reconstructed from the top ``k_aux`` dead latents, ``k_aux = d // 2`` by
    default, normalised by the residual's variance; a dead latent's negative pre-activation
    passes :data:`~dictionary_learning.sparse.AUXK_NEGATIVE_SLOPE` of the gradient, so a
    dead latent whose pre-activations are all negative still learns). No sparsity penalty
    (``sparsity=None``).
    ``b_dec`` starts at the geometric median of the first batch. The training forward is
    sparse (``sparse.py``): only the encoder's forward product is dense.
    """

    _feature_axis = {"encoder.weight": 0, "encoder.bias": 0, "decoder.weight": 1}
    _roles = {"W_dec": "decoder.weight", "W_enc": "encoder.weight", "b_enc": "encoder.bias"}
    default_lr = TOPK_LR
    lr_decay_fraction = TOPK_LR_DECAY_FRACTION

    def __init__(self, activation_dim: int, dict_size: int, k: int,
                 auxk_alpha: float = AUXK_ALPHA, k_aux: int | None = None):
        super().__init__()
        self.activation_dim = self.output_dim = activation_dim
        self.dict_size = dict_size
        self.auxk_alpha = float(auxk_alpha)
        self.k_aux = activation_dim // 2 if k_aux is None else int(k_aux)
        self.register_buffer("k", torch.tensor(check_k(k, dict_size), dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        self.init_tied_rows()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(encoder(x - b_dec))``, before any top-k."""
        check_width(x, self.activation_dim, f"{type(self).__name__}.encode")
        return torch.relu(self.encoder(x - self.b_dec))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        post = self.pre_activations(x)
        top = post.topk(int(self.k), dim=-1, sorted=False)
        return torch.zeros_like(post).scatter_(-1, top.indices, top.values)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        check_width(f, self.dict_size, f"{type(self).__name__}.decode")
        return self.decoder(f) + self.b_dec

    def select(self, pre: torch.Tensor, batch: Batch = LOCAL):
        """Training-time selection of active latents from ``pre [B, m]`` (per token: the
        rest of the batch, on this rank or others, does not matter)."""
        return topk_code(pre, int(self.k))

    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None,
                   ctx: LossContext = LossContext()) -> LossOutput:
        check_width(x, self.activation_dim, f"{type(self).__name__}.loss_terms")
        if x.ndim != 2:
            raise ValueError(f"loss_terms expects a batch [B, d], got shape {tuple(x.shape)}")
        target = x if target is None else target
        x_c = x - self.b_dec
        pre, code, vals = encode_sparse(x_c, self.W_enc, self.b_enc,
                                        lambda p: self.select(p, ctx.batch))
        x_hat = sparse_decode(code, vals, self.W_dec) + self.b_dec
        aux = auxk_loss(target - x_hat, x_c, self.W_enc, self.b_enc, self.W_dec, pre, ctx.dead,
                        self.k_aux, ctx.batch)
        terms = {"mse": reconstruction_loss(x_hat, target), "auxk": self.auxk_alpha * aux}
        return LossOutput(terms, code.to_dense(vals.detach()), sparsity=None, batch=ctx.batch)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """``b_dec`` := the geometric median of the first batch."""
        self.b_dec.copy_(geometric_median(x))

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Multiply every bias (and an estimated threshold) by ``scale``; ``k`` is unchanged."""
        self.encoder.bias.mul_(scale)
        self.b_dec.mul_(scale)
        if self.threshold >= 0:
            self.threshold.mul_(scale)

    def config(self) -> dict:
        return {**super().config(), "k": int(self.k), "auxk_alpha": self.auxk_alpha,
                "k_aux": self.k_aux}

    @classmethod
    def from_state_dict(cls, state_dict: dict, k: int | None = None, **kwargs):
        """Widths and ``k`` come from the tensors; a given ``k`` must agree with the file."""
        check_keys(cls, state_dict, TOPK_KEYS)
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        stored_k = int(state_dict["k"])
        if k is not None and k != stored_k:
            raise ValueError(f"k={k} was given but the state_dict has k={stored_k}")
        ae = cls(activation_dim, dict_size, stored_k)
        ae.load_state_dict(state_dict)
        return ae
