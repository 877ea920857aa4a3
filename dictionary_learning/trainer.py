"""One dictionary's optimisation state: its :class:`TrainerConfig`, and the :class:`Trainer`
that owns its Adam optimizer, schedules (learning-rate warm-up and decay, sparsity warm-up),
gradient clipping, activation normalisation and dead-feature resampling.

The loop over a stream of activations, which drives one Trainer per dictionary, is in
:mod:`dictionary_learning.training`.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .base import PENALTIES, Dictionary, LossContext, LossOutput, feature_rows
from .distributed import LOCAL, Batch, current_batch, reduce_gradients
from . import architectures  # noqa: F401 - registers every dictionary class
from .registry import get_dictionary_class

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerConfig:
    """One dictionary to train. Unknown keyword arguments are an error."""

    activation_dim: int
    """Width of the activations fed to the encoder."""
    dict_size: int
    """Number of features (m)."""
    lr: float | None = None
    """Peak Adam learning rate. ``None``: the dictionary class's ``default_lr`` (1e-3;
    ReLU's 1.5e-3, :data:`~dictionary_learning.architectures.autoencoder.RELU_LR`; the TopK
    family's 2e-3, :data:`~dictionary_learning.architectures.topk.TOPK_LR`)."""
    sparsity_penalty: float = 1e-3
    """Coefficient of the architecture's sparsity term (L1, entropy, L0, ...); unused by
    architectures whose sparsity is structural (TopK)."""
    penalty: str = "l1"
    """Sparsity term of architectures that offer a choice: ``"l1"`` or ``"entropy"``."""
    dict_class: str = "AutoEncoder"
    """Registered dictionary class."""
    output_dim: int | None = None
    """Width of the reconstruction target when it differs (``MLPStretcher``)."""
    dict_kwargs: dict = field(default_factory=dict)
    """Further constructor arguments of the class (``k``, ``group_sizes``, ...)."""
    warmup_steps: int | None = None
    """Linear learning-rate warm-up, from the start and again after each resampling.
    ``None``: a tenth of the run, at most 1000 steps (1000 when the length is unknown)."""
    decay_start: int | None = None
    """Step from which the learning rate decays linearly to 0 at the last step (needs a
    known number of steps). ``None``: the dictionary class's ``lr_decay_fraction`` of a run
    of known length (ReLU's and the TopK family's last fifth), else no decay; the run's length in
    steps: no decay."""
    sparsity_warmup_steps: int | None = None
    """Linear warm-up of the sparsity penalty from 0 over this many steps."""
    grad_clip_norm: float | None = None
    """Clip the gradient's global norm to this value."""
    normalize_activations: bool = False
    """Train on activations scaled to an average norm of sqrt(activation_dim); the scale is
    folded back into the saved weights, so saved dictionaries take raw activations."""
    resample_steps: int | None = None
    """Every this many steps, features that did not fire in the window are resampled
    (except in a run's last window, where they would end untrained)."""
    dead_feature_tokens: int | None = None
    """A feature that has not fired for this many tokens is dead (for AuxK-style losses).
    ``None`` (with ``dead_feature_steps`` unset too): 10M tokens, or
    :data:`DEAD_WINDOW_FRACTION` of the run's steps when that is shorter, so a short run
    gets AuxK too."""
    dead_feature_steps: int | None = None
    """A feature that has not fired for this many steps is dead too (resolved from the
    run's length when neither dead-feature window is given)."""
    submodule: str | None = None
    """Which submodule's activations to train on, when the stream serves several."""
    autocast_dtype: str | None = None
    """Run the dictionary's forward and loss under autocast to this dtype (``"bfloat16"``);
    parameters and optimizer state stay in full precision."""
    seed: int | None = 0
    """Seed for the dictionary's initialisation."""

    def __post_init__(self):
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {sorted(PENALTIES)}, got {self.penalty!r}")
        get_dictionary_class(self.dict_class)  # raises on an unknown name
        for name in ("activation_dim", "dict_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "decay_start", "sparsity_warmup_steps", "grad_clip_norm",
                     "resample_steps", "dead_feature_tokens", "dead_feature_steps"):
            value = getattr(self, name)
            if value is not None and value < (0 if name in ("warmup_steps", "decay_start")
                                              else 1e-12):
                raise ValueError(f"{name} must be positive (or None), got {value}")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got "
                             f"{self.autocast_dtype!r}")
        if (self.lr is not None and self.lr <= 0) or self.sparsity_penalty < 0:
            raise ValueError(f"need lr > 0 and sparsity_penalty >= 0, got lr={self.lr}, "
                             f"sparsity_penalty={self.sparsity_penalty}")

    def build(self) -> Dictionary:
        cls = get_dictionary_class(self.dict_class)
        if self.seed is not None:
            torch.manual_seed(self.seed)
        extra = dict(self.dict_kwargs)
        if self.output_dim is not None:
            extra["output_dim"] = self.output_dim
        try:
            return cls(self.activation_dim, self.dict_size, **extra)
        except TypeError as e:
            raise ValueError(f"{self.dict_class} does not take {sorted(extra)}: {e}") from e


DEFAULT_WARMUP_STEPS = 1000
DEFAULT_DEAD_FEATURE_TOKENS = 10_000_000
RUN_FRACTION = 0.1
"""The automatic warm-up of a run of known length: this fraction of its steps (at most
:data:`DEFAULT_WARMUP_STEPS`)."""
DEAD_WINDOW_FRACTION = 1 / 75
"""The automatic dead-feature window of a run of known length: this fraction of its steps
(at least 1), unless 10M tokens come first. Chosen by measurement, together with the TopK
family's AuxK weight (:data:`~dictionary_learning.architectures.topk.AUXK_ALPHA`): on the
demo LM at issue 19's budget (1500 steps of 1024 rows, 256 -> 4096, k 32), a window of 20
steps (1/75) kept more features alive than 5, 40 or 150 (a tenth of the run): TopK 0.735
against 0.686, 0.672 and 0.546 alive (AuxK weight 1), at the same FVE."""
RESOLVED_FIELDS = ("lr", "warmup_steps", "decay_start", "dead_feature_tokens",
                   "dead_feature_steps")
"""The fields :func:`resolve_schedules` fills from the run and the class, as a
checkpoint records them."""
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def resolve_schedules(config: TrainerConfig, total_steps: int | None) -> TrainerConfig:
    """``config`` with every field left to the run (``None``) made concrete, from the run's
    length when it is known; explicit values are kept as given (and warned about, once,
    when they do not fit the run: a warm-up the run never leaves, a window it never
    reaches). Resolving a resolved config changes nothing.

    - ``lr``: the dictionary class's ``default_lr``;
    - ``warmup_steps``: ``RUN_FRACTION`` of the run, at most 1000 (1000 when unknown);
    - ``decay_start``: the start of the class's ``lr_decay_fraction`` of a run of known
      length (none when the class has none);
    - ``dead_feature_tokens`` / ``dead_feature_steps`` (both unset): 10M tokens, and
      ``DEAD_WINDOW_FRACTION`` of the run's steps, whichever comes first;
    - a batch-top-k dictionary's ``threshold_start_step`` / ``threshold_beta`` not in
      ``dict_kwargs``: :func:`~dictionary_learning.architectures.batch_topk.threshold_schedule`.
    """
    changes, n = {}, total_steps
    cls = get_dictionary_class(config.dict_class)
    if config.lr is None:
        changes["lr"] = cls.default_lr
    if config.decay_start is None and n is not None and cls.lr_decay_fraction is not None:
        changes["decay_start"] = round((1 - cls.lr_decay_fraction) * n)
    if config.warmup_steps is None:
        changes["warmup_steps"] = (DEFAULT_WARMUP_STEPS if n is None else
                                   min(DEFAULT_WARMUP_STEPS, max(1, round(RUN_FRACTION * n))))
    if config.dead_feature_tokens is None:
        changes["dead_feature_tokens"] = DEFAULT_DEAD_FEATURE_TOKENS
        if config.dead_feature_steps is None and n is not None:
            changes["dead_feature_steps"] = max(1, round(DEAD_WINDOW_FRACTION * n))
    params = inspect.signature(cls).parameters
    if n is not None and "threshold_start_step" in params:
        from .architectures.batch_topk import threshold_schedule

        schedule = {k: v for k, v in threshold_schedule(n).items()
                    if k not in config.dict_kwargs}
        if schedule:
            changes["dict_kwargs"] = {**config.dict_kwargs, **schedule}
    resolved = dataclasses.replace(config, **changes) if changes else config
    if n is not None:
        _check_fits(resolved, n)
    return resolved


def _check_fits(config: TrainerConfig, n: int) -> None:
    """Warn (once per message) about explicit schedules a run of ``n`` steps never ends."""
    what = config.dict_class
    for name, value, effect in (
            ("warmup_steps", config.warmup_steps,
             "the learning rate never reaches its peak"),
            ("sparsity_warmup_steps", config.sparsity_warmup_steps,
             "the sparsity penalty never reaches its value"),
            ("resample_steps", config.resample_steps, "no feature is ever resampled"),
            ("threshold_start_step", config.dict_kwargs.get("threshold_start_step"),
             "the inference threshold is never estimated by the running average")):
        if value is not None and value >= n:
            _warn_once(f"{what}: {name}={value} is not shorter than the run ({n} steps): "
                       f"{effect}; give a smaller value (or leave it unset to scale with "
                       "the run)")


def nonfinite_checks(x: torch.Tensor, target: torch.Tensor, loss: torch.Tensor,
                     parameters) -> torch.Tensor:
    """Sums that are finite only when the batch, the loss and every gradient are: NaN and
    inf survive a sum (and a sum of huge values overflows to inf)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.stack([x.sum().float(), target.sum().float(), loss.detach().float(),
                        *(g.sum().float() for g in grads)])


def nonfinite_what(checks: torch.Tensor) -> str | None:
    """``None`` when every check is finite, else which part is not (``"input"``,
    ``"loss"``, ``"gradients"``): one reduction and one host sync decide it."""
    if bool(torch.isfinite(checks.sum())):
        return None
    finite = torch.isfinite(checks).tolist()
    return "input" if not all(finite[:2]) else "loss" if not finite[2] else "gradients"


def nonfinite_part(x: torch.Tensor, target: torch.Tensor, loss: torch.Tensor,
                   parameters) -> str | None:
    """``None`` when the batch, the loss and every gradient are finite, else which one is
    not (``"input"``, ``"loss"``, ``"gradients"``)."""
    return nonfinite_what(nonfinite_checks(x, target, loss, parameters))


class NonFiniteError(ValueError):
    """Training met values that are not finite and stopped (or would have written them)."""


class StepResult(NamedTuple):
    """What one step leaves behind: the total loss, the loss terms and features, and the
    (scaled) target the reconstruction was compared with. ``skipped`` names what was not
    finite when the step was not applied (``"input"``, ``"loss"`` or ``"gradients"``)."""

    loss: torch.Tensor
    out: LossOutput | None
    target: torch.Tensor
    lr: float
    skipped: str | None = None
    batch: Batch = LOCAL


class Trainer:
    """The optimisation state of one dictionary: optimizer, schedules, dead-feature counts."""

    def __init__(self, config: TrainerConfig, device: str | torch.device = "cpu",
                 total_steps: int | None = None, batch: Batch | None = None):
        self.config, self.device = config, torch.device(device)
        # Reductions over the global batch: the identity in one process; under
        # torch.distributed, the ranks' (see dictionary_learning.distributed).
        self.batch = current_batch() if batch is None else batch
        self.total_steps = total_steps
        if config.decay_start is not None and total_steps is None:
            raise ValueError("decay_start needs a known number of steps: pass steps")
        # The config as trained: schedules left unset are resolved from the run's length.
        self.requested_config = config
        self.config = config = resolve_schedules(config, total_steps)
        self.dictionary = config.build().to(device)
        self.optimizer = torch.optim.Adam(self.dictionary.param_groups(), lr=config.lr)
        m = self.dictionary.dict_size
        self.steps_since_active = torch.zeros(m, dtype=torch.long, device=device)
        self.tokens_since_active = torch.zeros(m, dtype=torch.long, device=device)
        self.warm_start = 0        # step at which the current warm-up began
        self.n_resampled = 0
        self.activation_scale = 1.0  # activations are multiplied by this before training
        # The data's mean norm when the source knows it (a cache's statistics); otherwise
        # normalisation measures the first batch.
        self.data_mean_norm: float | None = None
        self.started = False       # start() ran (on the first finite batch)
        self.n_skipped = 0         # steps not applied because something was not finite
        self.consecutive_skips = 0
        # Resampling's draws come from the trainer's own generator, saved with its state.
        self.generator = torch.Generator(device=self.device).manual_seed(
            0 if config.seed is None else config.seed)
        self.autocast_dtype = (None if config.autocast_dtype is None
                               else getattr(torch, config.autocast_dtype))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.dictionary.parameters(), torch.empty(0)).dtype

    @torch.no_grad()
    def start(self, x: torch.Tensor, target: torch.Tensor) -> bool:
        """Before the first step: with ``normalize_activations``, the factor that gives the
        activations an average norm of sqrt(d) (measured on the first batch, a random
        sample of a shuffled buffer, unless ``data_mean_norm`` says it for all); then
        the dictionary's data-dependent initialisation. Returns False, changing nothing,
        for a batch that is not finite (or whose squares overflow): the next one is used."""
        # Squares that overflow (|x| > ~1e19 in float32) would poison the initialisation.
        batch = self.batch
        if not batch.all_true(bool(torch.isfinite(x.float().pow(2).sum()
                                                  + target.float().pow(2).sum()))):
            return False
        if self.config.normalize_activations:
            mean_norm = self.data_mean_norm or float(
                batch.mean(x.norm(dim=-1).mean(), x.shape[0]))
            if not math.isfinite(mean_norm):
                return False
            if mean_norm <= 0:
                raise ValueError("the first batch of activations is all zeros: cannot "
                                 "normalise")
            self.activation_scale = x.shape[-1] ** 0.5 / mean_norm
        same = target is x
        x = batch.gather(x)
        target = x if same else batch.gather(target)
        self.dictionary.init_from_data(x * self.activation_scale, target * self.activation_scale)
        self.started = True
        return True

    def dead_features(self) -> torch.Tensor:
        """Bool ``[m]``: features that have not fired within the dead-feature window(s)."""
        cfg = self.config
        dead = self.tokens_since_active >= cfg.dead_feature_tokens
        if cfg.dead_feature_steps is not None:
            dead |= self.steps_since_active >= cfg.dead_feature_steps
        return dead

    def lr_at(self, step: int) -> float:
        cfg = self.config
        factor = 1.0 if cfg.warmup_steps == 0 else min(
            1.0, (step - self.warm_start + 1) / cfg.warmup_steps)
        if cfg.decay_start is not None and step >= cfg.decay_start:
            span = max(1, self.total_steps - cfg.decay_start)
            factor *= max(0.0, 1.0 - (step - cfg.decay_start) / span)
        return cfg.lr * factor

    def sparsity_coefficient(self, step: int) -> float:
        warm = self.config.sparsity_warmup_steps
        factor = 1.0 if not warm else min(1.0, (step + 1) / warm)
        return self.config.sparsity_penalty * factor

    def step(self, step: int, x: torch.Tensor, target: torch.Tensor) -> StepResult:
        """One Adam step on a batch. Cheap to return; :meth:`summary` turns the result into
        logged numbers when the loop wants them (not every step).

        A step whose input, loss or gradients are not finite is not applied (the
        dictionary, optimizer and counters stay as they were) and comes back with
        ``skipped`` set; one reduction and one host sync per step decide it."""
        cfg, ae = self.config, self.dictionary
        lr = self.lr_at(step)
        if not self.started and not self.start(x, target):
            return self._skip("input", x, target, lr)
        if self.activation_scale != 1.0:
            x, target = x * self.activation_scale, target * self.activation_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        ctx = LossContext(penalty=cfg.penalty, dead=self.dead_features(), batch=self.batch)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            out = ae.loss_terms(x, target, ctx)
        loss = sum(value * (self.sparsity_coefficient(step) if name == out.sparsity else 1.0)
                   for name, value in out.terms.items())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(ae.parameters())
        checks = nonfinite_checks(x, target, loss, params)
        n_rows, checks = reduce_gradients(params, x.shape[0], checks, self.batch)
        what = nonfinite_what(checks)
        if what is not None:
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(what, x, target, lr, loss.detach(), out)
        self.consecutive_skips = 0
        ae.constrain_gradients()
        if cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(ae.parameters(), cfg.grad_clip_norm)
        self.optimizer.step()
        ae.apply_constraints(out)

        with torch.no_grad():
            # Features of every trainable architecture are non-negative: a feature fired
            # on the batch iff its maximum is positive (cheaper than a mask).
            fired = self.batch.max((out.features.amax(dim=0) > 0).to(torch.uint8)).bool()
            self.steps_since_active += 1
            self.steps_since_active[fired] = 0
            self.tokens_since_active += n_rows
            self.tokens_since_active[fired] = 0
            if cfg.resample_steps and (step + 1) % cfg.resample_steps == 0 and (
                    self.total_steps is None
                    or step + 1 + cfg.resample_steps <= self.total_steps):
                # (not in the run's last window: a feature resampled then would end the
                # run untrained)
                self.resample_dead(step, x, target)
        return StepResult(loss.detach(), out, target, lr, batch=self.batch)

    def _skip(self, what: str, x, target, lr, loss=None, out=None) -> StepResult:
        self.n_skipped += 1
        self.consecutive_skips += 1
        nan = torch.tensor(float("nan"))
        return StepResult(nan if loss is None else loss, out, target, lr, skipped=what)

    @staticmethod
    @torch.no_grad()
    def summary(result: StepResult) -> dict[str, float]:
        """Logged numbers of a step: every loss term, the total, L0, the fraction of
        variance explained on the (global) batch, and the learning rate."""
        if result.skipped is not None:
            return {"skipped": result.skipped, "lr": result.lr}
        terms, f, target = result.out.terms, result.out.features, result.target
        batch, n = result.batch, f.shape[0]
        if batch.world_size == 1:
            variance = (target - target.mean(dim=0)).pow(2).sum(dim=-1).mean()
            count = torch.count_nonzero(f != 0)
        else:  # one reduction: the terms (means), the nonzero count, the target's sums
            t = target.double()
            local = torch.cat([torch.stack([v.detach().double() * n for v in terms.values()]),
                               torch.stack([result.loss.double() * n,
                                            torch.count_nonzero(f != 0).double(),
                                            t.pow(2).sum(), t.new_tensor(n)]), t.sum(0)])
            total = batch.sum(local)
            k = len(terms)
            n = float(total[k + 3])
            terms = {name: total[i] / n for i, name in enumerate(terms)}
            result = result._replace(loss=total[k] / n)
            count = total[k + 1]
            variance = total[k + 2] / n - (total[k + 4:] / n).pow(2).sum()
        logged = {name: float(v) for name, v in terms.items()}
        logged["loss"] = float(result.loss)
        logged["l0"] = float(count) / n
        logged["frac_variance_explained"] = float(1 - terms["mse"] / variance)
        logged["lr"] = result.lr
        return logged

    def state(self) -> dict:
        """Everything a later run needs to continue exactly where this one is: the
        training-time dictionary (before folding the activation scale), the optimizer, the
        dead-feature counters and the schedule's bookkeeping."""
        return {
            "dictionary": self.dictionary.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "steps_since_active": self.steps_since_active,
            "tokens_since_active": self.tokens_since_active,
            "warm_start": self.warm_start,
            "activation_scale": self.activation_scale,
            "n_resampled": self.n_resampled,
            "started": self.started,
            "n_skipped": self.n_skipped,
            "consecutive_skips": self.consecutive_skips,
            "generator": self.generator.get_state(),
            "dictionary_counters": {name: getattr(self.dictionary, name)
                                    for name in self.dictionary._training_counters},
            "schedule": {name: getattr(self.config, name) for name in RESOLVED_FIELDS},
        }

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state` of an earlier run of the same config."""
        groups = len(state.get("optimizer", {}).get("param_groups", self.optimizer.param_groups))
        if groups != len(self.optimizer.param_groups):
            # e.g. a JumpReLU run from before its thresholds had their own learning rate
            raise ValueError(
                f"the checkpoint's optimizer has {groups} parameter group(s) where this "
                f"{self.config.dict_class} trains {len(self.optimizer.param_groups)}: it was "
                "written by an older version and cannot be resumed exactly; its dictionaries "
                "still load (load_dictionary); start a new run")
        self._check_schedule(state.get("schedule"))
        try:
            self.dictionary.load_state_dict(state["dictionary"])
            self.optimizer.load_state_dict(state["optimizer"])
        except KeyError as e:
            raise ValueError(f"trainer state lacks {e}: it was written by an older version "
                             "that cannot be resumed; start a new run") from None
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"the checkpoint does not fit this trainer ({e}); resume with "
                             "the arguments of the run that wrote it") from e
        self.steps_since_active = state["steps_since_active"].to(self.device)
        self.tokens_since_active = state["tokens_since_active"].to(self.device)
        self.warm_start = int(state["warm_start"])
        self.activation_scale = float(state["activation_scale"])
        self.n_resampled = int(state["n_resampled"])
        self.started = bool(state.get("started", True))
        self.n_skipped = int(state.get("n_skipped", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        if "generator" in state:
            self.generator.set_state(state["generator"])
        for name, value in state.get("dictionary_counters", {}).items():
            setattr(self.dictionary, name, value)

    def _check_schedule(self, saved: dict | None) -> None:
        """A checkpoint continues at the peak learning rate it was trained with. A run that
        leaves ``lr`` unset takes the checkpoint's (the class's default may have changed
        since it was written); an explicit ``lr`` that differs is refused. Likewise a run
        that leaves ``decay_start`` unset keeps the checkpoint's choice between decaying
        and not. (When both decay, the start follows the run's length, which a resumed
        run may extend.)"""
        if saved is None:  # written before checkpoints recorded their schedule
            _warn_once(f"{self.config.dict_class}: the checkpoint does not record its "
                       f"schedule; it continues with lr={self.config.lr}, decay_start="
                       f"{self.config.decay_start}")
            return
        if saved["lr"] != self.config.lr:
            if self.requested_config.lr is not None:
                raise ValueError(
                    f"the checkpoint was trained at lr={saved['lr']}, not the lr="
                    f"{self.config.lr} given: resume with lr={saved['lr']}, or leave lr "
                    "unset to continue at the checkpoint's rate")
            _warn_once(f"{self.config.dict_class}: the checkpoint was trained at lr="
                       f"{saved['lr']} (this version's default is {self.config.lr}); it "
                       "continues at the checkpoint's rate")
            self.config = dataclasses.replace(self.config, lr=saved["lr"])
        saved_decay = saved.get("decay_start")
        if (self.requested_config.decay_start is None
                and (saved_decay is None) != (self.config.decay_start is None)):
            _warn_once(f"{self.config.dict_class}: the checkpoint was trained with "
                       f"decay_start={saved_decay} (this version's default gives "
                       f"{self.config.decay_start}); it continues with the checkpoint's")
            self.config = dataclasses.replace(self.config, decay_start=saved_decay)

    def raw_dictionary(self) -> Dictionary:
        """The dictionary as it applies to raw activations: with ``normalize_activations``
        the scale is folded into a copy's biases; otherwise the dictionary itself."""
        if self.activation_scale == 1.0:
            return self.dictionary
        raw = copy.deepcopy(self.dictionary)
        raw.scale_biases(1.0 / self.activation_scale)
        return raw

    @torch.no_grad()
    def resample_dead(self, step: int, x: torch.Tensor, target: torch.Tensor) -> int:
        """Re-initialise features that have not fired in the last ``resample_steps`` steps.

        As in Anthropic's "Towards Monosemanticity": inputs are drawn with probability
        proportional to their squared reconstruction loss; a dead feature's decoder row
        becomes the drawn target direction, its encoder row the drawn input direction
        scaled to 0.2 x the mean norm of living encoder rows, its encoder bias 0. Adam's
        moments for those features are reset and the learning rate warms up again.
        """
        ae = self.dictionary
        dead = self.steps_since_active >= self.config.resample_steps
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        # The draw is over the global batch, the same on every rank (same generator).
        same = target is x
        x = self.batch.gather(x)
        target = x if same else self.batch.gather(target)
        losses = (target - ae(x)).pow(2).sum(dim=-1)
        if float(losses.sum()) <= 0:
            return 0
        idx = torch.multinomial(losses.pow(2), n_dead, replacement=n_dead > len(losses),
                                generator=self.generator)
        x_dir = x[idx] / x[idx].norm(dim=-1, keepdim=True).clamp_min(1e-8)
        t_dir = target[idx] / target[idx].norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive_norm = ae.W_enc[~dead].norm(dim=-1).mean() if (~dead).any() else 1.0
        ae.W_enc[dead] = x_dir.to(ae.W_enc.dtype) * alive_norm * 0.2
        ae.W_dec[dead] = t_dir.to(ae.W_dec.dtype)
        if ae.b_enc is not None:
            ae.b_enc[dead] = 0.0
        for param, axis in ae.feature_parameters().values():
            for moment in self.optimizer.state.get(param, {}).values():
                if isinstance(moment, torch.Tensor) and moment.shape == param.shape:
                    feature_rows(moment, axis)[dead] = 0.0
        self.steps_since_active[dead] = 0
        self.tokens_since_active[dead] = 0
        self.warm_start = step + 1
        self.n_resampled += n_dead
        logger.info("step %d: resampled %d dead features of %s", step, n_dead,
                    self.config.dict_class)
        return n_dead
