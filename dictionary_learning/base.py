"""The ``Dictionary`` interface every architecture implements, and the loss terms, once.

Every dictionary has the same face:

- ``encode(x)``   ``[..., d_in]  -> [..., m]``    feature activations ``f`` (inference)
- ``decode(f)``   ``[..., m]     -> [..., d_out]`` reconstruction ``x_hat``
- ``forward(x, output_features=False)`` returns ``x_hat`` (and ``f`` when asked)
- ``loss_terms(x, target, ctx)`` the named loss terms of a training batch (:class:`LossOutput`)
- ``constrain_gradients()`` / ``apply_constraints(out)`` what it keeps true around each step
- ``init_from_data(x, target)`` data-dependent initialisation from the first batch
- ``scale_biases(s)`` rescale for activations multiplied by ``s``
- ``from_state_dict`` / ``from_pretrained(path, device=...)``

Stored parameters keep each published layout (``shared/FORMATS.md``), so files people
already downloaded load unchanged. Shared code (constraints, resampling, sparse kernels)
never reads stored parameters directly: it goes through one accessor layout,

- ``W_dec``  ``[m, d_out]``  row ``i`` is feature ``i``'s decoder direction
- ``W_enc``  ``[m, d_in]``   row ``i`` is feature ``i``'s encoder direction
- ``b_enc``  ``[m]``         the encoder bias (``None`` where an architecture has none)

which are views sharing storage with the parameters (``feature_rows`` gives the same view
of a gradient or an optimizer moment), so in-place edits through them edit the dictionary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn

from .distributed import LOCAL, Batch

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


@dataclass(frozen=True)
class LossContext:
    """What the training loop tells a dictionary about the current step."""

    penalty: str = "l1"
    """Sparsity term for architectures that offer a choice (``AutoEncoder``: l1 | entropy)."""
    dead: torch.Tensor | None = None
    """Bool ``[m]``: features that have not fired for a long time (used by AuxK losses)."""
    batch: Batch = LOCAL
    """Reductions over the global batch when it is split over ranks (the identity in one
    process): a loss term that depends on the whole batch computes it through these."""


class LossOutput(NamedTuple):
    """Named loss terms of a batch. The loop's loss is the sum of ``terms``, except the one
    named ``sparsity``, which is first multiplied by the configured (and warmed-up)
    sparsity penalty. ``features`` are the batch's training-time feature activations."""

    terms: dict[str, torch.Tensor]
    features: torch.Tensor
    sparsity: str | None
    batch: Batch = LOCAL
    """The batch's reductions (:attr:`LossContext.batch`), for constraints kept after the
    step from whole-batch statistics (a BatchTopK threshold)."""


def check_width(x: torch.Tensor, width: int, what: str) -> None:
    """Raise a ``ValueError`` naming the offending shape when ``x``'s last axis is not ``width``."""
    if x.ndim == 0 or x.shape[-1] != width:
        raise ValueError(
            f"{what} expects a tensor whose last dimension is {width}, got shape {tuple(x.shape)}"
        )


def check_keys(cls: type, state_dict: dict, expected: set[str]) -> None:
    """Raise a ``ValueError`` listing missing and unexpected keys of a state_dict."""
    missing, unexpected = expected - state_dict.keys(), state_dict.keys() - expected
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not fit {cls.__name__}: missing keys {sorted(missing)}, "
            f"unexpected keys {sorted(unexpected)}"
        )


def feature_rows(t: torch.Tensor, feature_axis: int) -> torch.Tensor:
    """View ``t`` with the feature axis first (``[m, ...]``); the view shares storage."""
    return t if feature_axis == 0 else t.transpose(0, feature_axis)


class Dictionary(nn.Module):
    """Base class. Subclasses set ``activation_dim`` (input width), ``dict_size`` (m) and
    ``output_dim`` (reconstruction width; equal to ``activation_dim`` except for
    stretchers), implement ``encode``/``decode``/``from_state_dict``, and declare where their
    stored parameters keep the feature axis (``_feature_axis``) and which ones play the
    roles of the accessor layout (``_roles``: ``W_dec``, ``W_enc``, ``b_enc``).

    ``decoder_norm = "unit"`` keeps decoder rows at unit norm (gradient parallel to each
    row projected out before the step, rows renormalised after); ``None`` leaves them.
    """

    activation_dim: int
    dict_size: int
    output_dim: int
    decoder_norm: ClassVar[str | None] = "unit"
    default_lr: ClassVar[float] = 1e-3
    """The peak learning rate of a run whose config gives none (``TrainerConfig.lr=None``)."""
    lr_decay_fraction: ClassVar[float | None] = None
    """The learning rate decays linearly to 0 over this last fraction of a run whose
    config gives no ``decay_start`` and whose length is known; ``None``: no decay."""
    _feature_axis: ClassVar[dict[str, int]] = {}
    _roles: ClassVar[dict[str, str]] = {}
    _training_counters: ClassVar[tuple[str, ...]] = ()
    """Plain attributes that training changes and later steps read (not in the state_dict,
    so ``ae.pt`` keeps the published keys); the trainer state saves and restores them."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, output_features: bool = False):
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f) if output_features else x_hat

    def loss_terms(self, x: torch.Tensor, target: torch.Tensor | None = None,
                   ctx: LossContext = LossContext()) -> LossOutput:
        """Reconstruction error plus the L1 (or entropy) of the features: the classic SAE.
        Architectures with other objectives override this."""
        target = x if target is None else target
        x_hat, f = self(x, output_features=True)
        # Classic features are ReLU outputs: their L1 norm is their sum (no abs pass).
        penalty = f.sum(dim=-1).mean() if ctx.penalty == "l1" else PENALTIES[ctx.penalty](f)
        terms = {"mse": reconstruction_loss(x_hat, target), ctx.penalty: penalty}
        return LossOutput(terms, f, sparsity=ctx.penalty)

    # -- accessor layout ------------------------------------------------------------------
    def _stored(self, name: str) -> nn.Parameter:
        """The stored parameter ``name`` (dotted for submodules). Unlike ``get_parameter``
        this works where a published name (``W_enc``, ``W_dec``, ``b_enc``) is also an
        accessor property below, which shadows plain attribute access."""
        path, _, leaf = name.rpartition(".")
        module = self.get_submodule(path) if path else self
        try:
            return module._parameters[leaf]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no parameter {name!r}") from None

    def _role(self, role: str) -> torch.Tensor | None:
        name = self._roles.get(role)
        if name is None:
            return None
        return feature_rows(self._stored(name), self._feature_axis[name])

    @property
    def W_dec(self) -> torch.Tensor:
        return self._role("W_dec")

    @property
    def W_enc(self) -> torch.Tensor:
        return self._role("W_enc")

    @property
    def b_enc(self) -> torch.Tensor | None:
        return self._role("b_enc")

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups: one group of every parameter by default. A
        group may carry ``lr_scale``, a multiplier of the run's learning rate (schedule
        included) for its parameters."""
        return [{"params": list(self.parameters())}]

    def feature_parameters(self) -> dict[str, tuple[nn.Parameter, int]]:
        """Every parameter indexed by feature, with the axis that indexes it."""
        return {n: (self._stored(n), ax) for n, ax in self._feature_axis.items()}

    # -- constraints -------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale so every decoder row has unit norm, leaving outputs unchanged (for
        architectures whose features scale with their encoder row and bias): feature ``i``
        is multiplied by its decoder norm."""
        norms = self.W_dec.norm(dim=-1)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[:, None])
        if self.b_enc is not None:
            self.b_enc.mul_(norms)

    @torch.no_grad()
    def constrain_gradients(self) -> None:
        """Before the optimizer step: project out of each decoder row's gradient its
        component along that row (with ``decoder_norm == "unit"``). The rows need not be
        unit yet (the ``AutoEncoder``'s first step has rows of norm 0.1)."""
        if self.decoder_norm != "unit":
            return
        name = self._roles["W_dec"]
        param = self._stored(name)
        if param.grad is None:
            return
        w = self.W_dec
        g = feature_rows(param.grad, self._feature_axis[name])
        g.sub_((g * w).sum(dim=-1, keepdim=True)
               / w.pow(2).sum(dim=-1, keepdim=True).clamp_min(1e-30) * w)

    @torch.no_grad()
    def apply_constraints(self, out: LossOutput | None = None) -> None:
        """After the optimizer step: renormalise decoder rows (``decoder_norm == "unit"``).
        ``out`` is the step's :class:`LossOutput`, for architectures whose constraint
        depends on the batch (e.g. a running threshold estimate)."""
        if self.decoder_norm == "unit":
            self.set_decoder_norm_to_unit_norm()

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Called once with the first training batch, before the first step (e.g. to put a
        decoder bias at the data's geometric median). Does nothing by default."""

    @torch.no_grad()
    def init_tied_rows(self, norm: float = 1.0, zero_encoder_bias: bool = True) -> None:
        """The usual initialisation, through the accessor layout: random decoder rows of the
        given norm, encoder rows equal to them, encoder bias 0 (kept as it is with
        ``zero_encoder_bias=False``)."""
        w = torch.randn(self.dict_size, self.W_dec.shape[1])
        w *= norm / w.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(w)
        if self.W_enc.shape == w.shape:
            self.W_enc.copy_(w)
        if zero_encoder_bias and self.b_enc is not None:
            self.b_enc.zero_()

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        w = self.W_dec
        w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        """Make the dictionary take activations multiplied by ``scale``: every bias (and
        threshold) is multiplied by ``scale``; features and outputs then scale with it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement scale_biases")

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
