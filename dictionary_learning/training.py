"""The one training loop: several dictionaries trained from one stream of activations.

Each dictionary is described by a :class:`TrainerConfig`. The loop asks each dictionary
for its named loss terms (``Dictionary.loss_terms``), sums them with the sparsity term
weighted by ``sparsity_penalty``, takes an Adam step and lets the dictionary keep its
constraints. Everything else (learning-rate warm-up and decay, sparsity warm-up, gradient
clipping, activation normalisation, dead-feature resampling, checkpoints, logging) lives
here, once, for every architecture.

Loss of the classic ``AutoEncoder`` (per batch of B tokens):
    mse     = mean_t ||x_t - x_hat_t||^2
    penalty = mean_t ||f_t||_1               (``penalty="l1"``)
            or mean_t H(f_t / sum f_t)        (``penalty="entropy"``)
    loss    = mse + sparsity_penalty * penalty
Other architectures name their own terms (TopK: ``mse`` + ``auxk``; JumpReLU: ``mse`` +
``l0_deviation``; Gated: ``mse`` + ``l1`` + ``aux``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .base import PENALTIES, Dictionary, LossContext, LossOutput, feature_rows
from . import architectures  # noqa: F401 - registers every dictionary class
from .registry import get_dictionary_class
from .saving import CheckpointWriter, checkpoint_steps, read_trainer_state

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerConfig:
    """One dictionary to train. Unknown keyword arguments are an error."""

    activation_dim: int
    """Width of the activations fed to the encoder."""
    dict_size: int
    """Number of features (m)."""
    lr: float = 1e-3
    """Peak Adam learning rate."""
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
    warmup_steps: int = 1000
    """Linear learning-rate warm-up, from the start and again after each resampling."""
    decay_start: int | None = None
    """Step from which the learning rate decays linearly to 0 at the last step (needs a
    known number of steps)."""
    sparsity_warmup_steps: int | None = None
    """Linear warm-up of the sparsity penalty from 0 over this many steps."""
    grad_clip_norm: float | None = None
    """Clip the gradient's global norm to this value."""
    normalize_activations: bool = False
    """Train on activations scaled to an average norm of sqrt(activation_dim); the scale is
    folded back into the saved weights, so saved dictionaries take raw activations."""
    resample_steps: int | None = None
    """Every this many steps, features that did not fire in the window are resampled."""
    dead_feature_tokens: int = 10_000_000
    """A feature that has not fired for this many tokens is dead (for AuxK-style losses)."""
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
                     "resample_steps", "dead_feature_tokens"):
            value = getattr(self, name)
            if value is not None and value < (0 if name in ("warmup_steps", "decay_start")
                                              else 1e-12):
                raise ValueError(f"{name} must be positive (or None), got {value}")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got "
                             f"{self.autocast_dtype!r}")
        if self.lr <= 0 or self.sparsity_penalty < 0:
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


class StepResult(NamedTuple):
    """What one step leaves behind: the total loss, the loss terms and features, and the
    (scaled) target the reconstruction was compared with."""

    loss: torch.Tensor
    out: LossOutput
    target: torch.Tensor
    lr: float


class Trainer:
    """The optimisation state of one dictionary: optimizer, schedules, dead-feature counts."""

    def __init__(self, config: TrainerConfig, device: str | torch.device = "cpu",
                 total_steps: int | None = None):
        self.config, self.device = config, torch.device(device)
        self.total_steps = total_steps
        if config.decay_start is not None and total_steps is None:
            raise ValueError("decay_start needs a known number of steps: pass steps")
        self.dictionary = config.build().to(device)
        self.optimizer = torch.optim.Adam(self.dictionary.parameters(), lr=config.lr)
        m = self.dictionary.dict_size
        self.steps_since_active = torch.zeros(m, dtype=torch.long, device=device)
        self.tokens_since_active = torch.zeros(m, dtype=torch.long, device=device)
        self.warm_start = 0        # step at which the current warm-up began
        self.n_resampled = 0
        self.activation_scale = 1.0  # activations are multiplied by this before training
        self.autocast_dtype = (None if config.autocast_dtype is None
                               else getattr(torch, config.autocast_dtype))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.dictionary.parameters(), torch.empty(0)).dtype

    @torch.no_grad()
    def start(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Before the first step: with ``normalize_activations``, the factor that gives the
        first batch (a random sample of a shuffled buffer) an average norm of sqrt(d); then
        the dictionary's data-dependent initialisation."""
        if self.config.normalize_activations:
            mean_norm = float(x.norm(dim=-1).mean())
            if mean_norm <= 0:
                raise ValueError("the first batch of activations is all zeros: cannot "
                                 "normalise")
            self.activation_scale = x.shape[-1] ** 0.5 / mean_norm
        self.dictionary.init_from_data(x * self.activation_scale, target * self.activation_scale)

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
        logged numbers when the loop wants them (not every step)."""
        cfg, ae = self.config, self.dictionary
        if self.activation_scale != 1.0:
            x, target = x * self.activation_scale, target * self.activation_scale
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ctx = LossContext(penalty=cfg.penalty,
                          dead=self.tokens_since_active >= cfg.dead_feature_tokens)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            out = ae.loss_terms(x, target, ctx)
        loss = sum(value * (self.sparsity_coefficient(step) if name == out.sparsity else 1.0)
                   for name, value in out.terms.items())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ae.constrain_gradients()
        if cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(ae.parameters(), cfg.grad_clip_norm)
        self.optimizer.step()
        ae.apply_constraints(out)

        with torch.no_grad():
            # Features of every trainable architecture are non-negative: a feature fired
            # on the batch iff its maximum is positive (cheaper than a mask).
            fired = out.features.amax(dim=0) > 0
            self.steps_since_active += 1
            self.steps_since_active[fired] = 0
            self.tokens_since_active += x.shape[0]
            self.tokens_since_active[fired] = 0
            if cfg.resample_steps and (step + 1) % cfg.resample_steps == 0:
                self.resample_dead(step, x, target)
        return StepResult(loss.detach(), out, target, lr)

    @staticmethod
    @torch.no_grad()
    def summary(result: StepResult) -> dict[str, float]:
        """Logged numbers of a step: every loss term, the total, L0, the fraction of
        variance explained on the batch, and the learning rate."""
        terms, f, target = result.out.terms, result.out.features, result.target
        variance = (target - target.mean(dim=0)).pow(2).sum(dim=-1).mean()
        logged = {name: float(v) for name, v in terms.items()}
        logged["loss"] = float(result.loss)
        logged["l0"] = float(torch.count_nonzero(f != 0)) / f.shape[0]
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
        }

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state` of an earlier run of the same config."""
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
        losses = (target - ae(x)).pow(2).sum(dim=-1)
        if float(losses.sum()) <= 0:
            return 0
        idx = torch.multinomial(losses.pow(2), n_dead, replacement=n_dead > len(losses))
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


def select_batch(batch, submodule: str | None):
    """The part of a served batch one dictionary trains on: the whole batch, or, when the
    stream collects several submodules (a ``{name: batch}`` dict), the named one."""
    if not isinstance(batch, dict):
        return batch
    if submodule not in batch:
        raise ValueError(f"the activation stream serves {sorted(batch)}; set "
                         f"TrainerConfig.submodule to one of them (got {submodule!r})")
    return batch[submodule]


def split_batch(batch, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, target)`` from a batch: a tensor (target = x) or an ``(x_in, x_out)`` pair,
    on ``device`` in ``dtype``."""
    if isinstance(batch, (tuple, list)):
        x, target = batch
    else:
        x = target = batch
    x = x.to(device=device, dtype=dtype, non_blocking=True)
    return x, (x if target is batch else target.to(device=device, dtype=dtype,
                                                   non_blocking=True))


def prefetched(batches: Iterable, device: torch.device) -> Iterator:
    """Yield batches with the next one already on its way to a CUDA ``device`` (a
    non-blocking copy from pinned memory overlaps the current step); elsewhere as is."""
    it = iter(batches)
    if device.type != "cuda":
        yield from it
        return

    def to_device(b):
        if isinstance(b, dict):
            return {k: to_device(v) for k, v in b.items()}
        if isinstance(b, (tuple, list)):
            return type(b)(to_device(v) for v in b)
        return b.to(device, non_blocking=True)

    nxt = next(it, None)
    while nxt is not None:
        current = to_device(nxt)
        nxt = next(it, None)
        yield current


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train_dictionaries`: the loop finished its step, wrote a
    checkpoint (with a ``save_dir``) and stopped."""

    def __init__(self, step: int, folders: list[Path]):
        where = f"; checkpoint written in {', '.join(map(str, folders))}" if folders else ""
        super().__init__(f"interrupted after step {step}{where}")
        self.step, self.folders = step, folders


class _DeferredInterrupt:
    """Within the block the first Ctrl-C only sets ``requested`` (the loop checks it between
    steps, so no step is left half done); a second one interrupts at once. Only the main
    thread receives signals; elsewhere this does nothing."""

    def __enter__(self):
        self.requested, self._previous = False, None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("interrupted: stopping after this step with a checkpoint "
                       "(press Ctrl-C again to stop at once, without one)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def resume_step(save_dir: str | Path, n_trainers: int) -> int:
    """The latest step at which every trainer folder of ``save_dir`` has a checkpoint."""
    folders = _trainer_dirs(save_dir, n_trainers)
    common = set.intersection(*(set(checkpoint_steps(f)) for f in folders))
    if not common:
        raise ValueError(f"no checkpoint to resume from in {save_dir} (looked for "
                         "checkpoints/trainer_state_*.pt beside ae_*.pt"
                         + (" in every trainer_* folder" if n_trainers > 1 else "")
                         + "); run without resume, with save_steps set")
    return max(common)


def _trainer_dirs(save_dir: str | Path, n: int) -> list[Path]:
    return [Path(save_dir)] if n == 1 else [Path(save_dir) / f"trainer_{i}" for i in range(n)]


def train_dictionaries(activations: Iterable, configs: list[TrainerConfig],
                       steps: int | None = None, save_dir: str | Path | None = None,
                       save_steps: int | Iterable[int] | None = None,
                       log_steps: int | None = None, device: str | torch.device = "cpu",
                       run_info: dict | None = None, progress: bool = True,
                       resume: bool = False, wandb_project: str | None = None
                       ) -> list[Dictionary]:
    """Train one dictionary per config from one stream of activation batches.

    ``activations`` yields tensors ``[B, d]``, ``(x_in, x_out)`` pairs, or — from a buffer
    collecting several submodules in one forward pass — ``{name: batch}`` dicts, of which
    each config trains on ``config.submodule``. Every batch is read once and shared by all
    dictionaries. ``steps=None`` trains until the stream ends. With ``save_dir``, a single
    dictionary is saved in ``save_dir`` and several in ``save_dir/trainer_{i}``: ``ae.pt``,
    ``config.json`` and, at ``save_steps`` (an interval or a list of steps),
    ``checkpoints/ae_{step}.pt`` beside the trainer state needed to resume. ``run_info``
    (lm_name, submodule_name, ...) goes into the trainer section of ``config.json``; by
    default it is read from ``activations.config``. Returns the trained dictionaries (taking
    raw activations), in the order of ``configs``.

    ``resume=True`` continues from the latest checkpoint in ``save_dir`` (dictionary,
    optimizer, schedules, counters, step); the caller positions ``activations`` past the
    text already read (``texts_read`` in the trainer state; :func:`checkpoint_texts_read`).
    Ctrl-C finishes the current step, writes a checkpoint and raises
    :class:`TrainingInterrupted`.

    Every logged step goes to each folder's ``metrics.jsonl`` (plotted into
    ``training_curves.png`` at checkpoints and at the end) and, with ``wandb_project``, to
    one Weights & Biases run (``WANDB_MODE=offline`` works without network).
    """
    if not configs:
        raise ValueError("configs is empty: pass at least one TrainerConfig")
    if resume and save_dir is None:
        raise ValueError("resume needs the save_dir of the run to continue")
    device = torch.device(device)
    buffer_config = dict(getattr(activations, "config", {}) or {})
    if run_info is None:
        run_info = {k: buffer_config.get(k) for k in ("lm_name", "submodule_name")}
    trainers = [Trainer(cfg, device, total_steps=steps) for cfg in configs]
    step, n_tokens = 0, 0
    if resume:
        step = resume_step(save_dir, len(configs))
        for folder, t in zip(_trainer_dirs(save_dir, len(configs)), trainers):
            state = read_trainer_state(folder, step)
            t.load_state(state)
            n_tokens = int(state["activations_trained"])
        logger.info("resuming from step %d (%d activations trained)", step, n_tokens)
    writers = []
    if save_dir is not None:
        writers = [CheckpointWriter(d, t, buffer_config, {**run_info, **(
            {"submodule_name": t.config.submodule} if t.config.submodule else {})}, steps,
            resume_step=step if resume else None)
            for d, t in zip(_trainer_dirs(save_dir, len(configs)), trainers)]
    save_at = _save_schedule(save_steps)
    wandb = None
    if wandb_project is not None:
        from .dashboards import WandbLogger

        wandb = WandbLogger(wandb_project, run_name=Path(save_dir).name if save_dir else None,
                            config={"trainers": [dataclasses.asdict(c) for c in configs],
                                    "buffer": buffer_config})

    def checkpoint():
        for w in writers:
            w.checkpoint(step, n_tokens, texts_read=getattr(activations, "texts_seen", None))

    log_every = log_steps or max(1, (steps or 1000) // 100)
    bar = tqdm(total=steps, initial=step, desc="Training", unit="step", disable=not progress)
    first_step, start_tokens = step, n_tokens
    try:
        with _DeferredInterrupt() as interrupt:
            for batch in prefetched(activations, device):
                if steps is not None and step >= steps:
                    break
                results = []
                for t in trainers:
                    x, target = split_batch(select_batch(batch, t.config.submodule), device,
                                            t.dtype)
                    if step == 0:
                        t.start(x, target)
                    results.append(t.step(step, x, target))
                n_tokens += x.shape[0]
                step += 1
                bar.update(1)
                if step % log_every == 0 or step == first_step + 1:
                    _log(step, n_tokens - start_tokens, results, bar, writers, log_steps,
                         n_tokens, wandb)
                if save_at(step) or (interrupt.requested and writers):
                    checkpoint()
                if interrupt.requested:
                    raise TrainingInterrupted(step, [w.folder for w in writers])
    finally:
        bar.close()
        if wandb is not None:
            wandb.finish()
    if steps is not None and step < steps:
        logger.warning("activations ran out after %d of %d steps", step, steps)
    for w in writers:
        w.finish(step, n_tokens, buffer_config=dict(getattr(activations, "config", {}) or {}))
    return [t.raw_dictionary() for t in trainers]


def checkpoint_texts_read(save_dir: str | Path, n_trainers: int = 1) -> int | None:
    """How many texts the stream had consumed at the checkpoint :func:`train_dictionaries`
    would resume from (``None`` when the stream did not say)."""
    step = resume_step(save_dir, n_trainers)
    texts = int(read_trainer_state(_trainer_dirs(save_dir, n_trainers)[0], step)["texts_read"])
    return None if texts < 0 else texts


def _log(step, tokens_this_run, results, bar, writers, log_steps, n_tokens, wandb) -> None:
    logged = [Trainer.summary(r) for r in results]
    elapsed = bar.format_dict["elapsed"] or float("nan")
    bar.set_postfix(loss=f"{logged[0]['loss']:.4g}", mse=f"{logged[0]['mse']:.4g}",
                    l0=f"{logged[0]['l0']:.1f}", tok_s=f"{tokens_this_run / elapsed:.0f}")
    for i, entry in enumerate(logged):
        if log_steps:
            logger.info("step %d trainer %d: %s", step, i,
                        " ".join(f"{k}={v:.4g}" for k, v in entry.items()))
        if writers:
            writers[i].log(step, n_tokens, entry)
        if wandb is not None:
            wandb.log(step, {"activations": n_tokens, **entry}, trainer_index=i)


def _save_schedule(save_steps):
    if save_steps is None:
        return lambda step: False
    if isinstance(save_steps, int):
        if save_steps < 1:
            raise ValueError(f"save_steps must be positive, got {save_steps}")
        return lambda step: step % save_steps == 0
    wanted = set(save_steps)
    return lambda step: step in wanted


def trainSAE(activations: Iterable, activation_dim: int | tuple[int, int], dictionary_size: int,
             lr: float, sparsity_penalty: float, entropy: bool = False,
             steps: int | None = None, warmup_steps: int = 1000,
             resample_steps: int | None = None, save_steps=None, save_dir=None,
             log_steps: int | None = None, device: str = "cpu", seed: int | None = 0,
             **kwargs) -> Dictionary:
    """Train one dictionary on a stream of activations and return it.

    The seed-era front of :func:`train_dictionaries`. Batches that are ``(x_in, x_out)``
    pairs (``io="in_to_out"``), or an ``activation_dim`` given as ``(d_in, d_out)``, train
    an :class:`MLPStretcher`; plain batches train an :class:`AutoEncoder`.
    """
    batches = iter(activations)
    try:
        first = next(batches)
    except StopIteration:
        raise ValueError("activations yielded no batch") from None
    if isinstance(first, dict):
        raise ValueError("trainSAE trains one dictionary on one submodule, but the stream "
                         f"serves {sorted(first)}: use train_dictionaries with "
                         "TrainerConfig(submodule=...) for each")
    pairs = isinstance(first, (tuple, list))
    d_in, d_out = (activation_dim if isinstance(activation_dim, (tuple, list))
                   else (activation_dim, activation_dim))
    x0 = first[0] if pairs else first
    if x0.shape[-1] != d_in:
        raise ValueError(f"activation_dim is {d_in} but the activations have width "
                         f"{x0.shape[-1]}")
    stretcher = pairs or d_in != d_out
    config = TrainerConfig(
        activation_dim=d_in, dict_size=dictionary_size, lr=lr, sparsity_penalty=sparsity_penalty,
        penalty="entropy" if entropy else "l1",
        dict_class="MLPStretcher" if stretcher else "AutoEncoder",
        output_dim=(first[1].shape[-1] if pairs else d_out) if stretcher else None,
        warmup_steps=warmup_steps, resample_steps=resample_steps, seed=seed)
    stream = _Rejoined(first, batches, activations)
    return train_dictionaries(stream, [config], steps=steps, save_dir=save_dir,
                              save_steps=save_steps, log_steps=log_steps, device=device,
                              **kwargs)[0]


class _Rejoined:
    """An iterator that puts a peeked first batch back, keeping the source's ``config``."""

    def __init__(self, first, rest: Iterator, source):
        self._it, self._source = chain([first], rest), source

    def __iter__(self):
        return self._it

    @property
    def config(self):
        return getattr(self._source, "config", None)

    @property
    def texts_seen(self):
        return getattr(self._source, "texts_seen", None)
