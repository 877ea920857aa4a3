"""The one training loop: several dictionaries trained from one stream of activations.

Each dictionary is described by a :class:`TrainerConfig`. The loop asks each dictionary
for its named loss terms (``Dictionary.loss_terms``), sums them with the sparsity term
weighted by ``sparsity_penalty``, takes an Adam step and lets the dictionary keep its
constraints. Everything else lives once, for every architecture: per dictionary in
:mod:`dictionary_learning.trainer` (learning-rate warm-up and decay, sparsity warm-up,
gradient clipping, activation normalisation, dead-feature resampling), and here (the
stream shared by all dictionaries, checkpoints, resuming, Ctrl-C, logging).

Loss of the classic ``AutoEncoder`` (per batch of B tokens):
    mse     = mean_t ||x_t - x_hat_t||^2
    penalty = mean_t ||f_t||_1               (``penalty="l1"``)
            or mean_t H(f_t / sum f_t)        (``penalty="entropy"``)
    loss    = mse + sparsity_penalty * penalty
Other architectures name their own terms (TopK: ``mse`` + ``auxk``; JumpReLU: ``mse`` +
``l0_deviation``; Gated: ``mse`` + ``l1`` + ``aux``).
"""


from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .base import Dictionary
from .distributed import LOCAL, PeerLostError, current_batch
from .files import WriteError
from .compiling import compile_losses
from .prefetch import Prefetcher
from .saving import (CheckpointWriter, checkpoint_steps, prune_stream_states,
                     read_stream_state, read_trainer_state, save_stream_state,
                     stream_state_steps, stream_state_worlds)
from .trainer import NonFiniteError, StepResult, Trainer, TrainerConfig  # noqa: F401 - API
from .trainer import resolve_schedules

logger = logging.getLogger(__name__)


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


def default_prefetch(device: torch.device) -> int:
    """Batches read ahead when ``prefetch`` is not given (a resumable source): 2 on a CUDA
    device, where the model's forward and the copy overlap the step; 0 on the CPU, where
    the reading thread and the step share the same cores: measured on 2 cores, the demo's
    training ran 0.94x as fast with 2 read ahead (median of 3 alternating runs; 0.76x and
    0.84x at the throughput section's CPU sizes, d 64 and 128) although the loop waited
    less."""
    return 2 if torch.device(device).type == "cuda" else 0


class _Stream:
    """The loop's view of its activation source.

    With ``prefetch`` > 0 a producer thread reads up to that many batches ahead and moves
    them to the device (:mod:`dictionary_learning.prefetch`), so collecting the next batch
    (a buffer's refill) overlaps training; with 0 each batch is read when the loop asks.
    A source with ``state_dict()`` / ``load_state_dict()`` (an
    :class:`~dictionary_learning.buffer.ActivationBuffer`, a cache reader) is resumable:
    the stream's state is the source's plus every batch read ahead but not yet trained on,
    so a checkpoint never loses one. ``texts_read`` and ``wait_s`` are the consumer's: the
    source's ``texts_seen`` after the last batch handed out, and the time spent waiting
    for batches (blocked on the queue, or reading them without prefetch)."""

    def __init__(self, source: Iterable, device: torch.device, prefetch: int | None):
        self.source, self.device = source, device
        self._ahead: list = []  # restored batches read ahead by the run that saved the state
        self._prefetcher: Prefetcher | None = None
        self.texts_read = getattr(source, "texts_seen", None)
        self.wait_s = 0.0
        self.resumable = all(callable(getattr(source, name, None))
                             for name in ("state_dict", "load_state_dict"))
        if prefetch is not None and (int(prefetch) != prefetch or prefetch < 0):
            raise ValueError(f"prefetch must be a non-negative integer, got {prefetch!r}")
        self.prefetch = (default_prefetch(self.device) if self.resumable else 0) \
            if prefetch is None else int(prefetch)

    def batches(self, limit: int | None = None) -> Iterator:
        """The batches to train on, at most ``limit`` of them."""
        if self.prefetch > 0:
            self._prefetcher = Prefetcher(self.source, self.device, self.prefetch, limit,
                                          ahead=self._ahead)
            self._ahead = []
            while (got := self._prefetcher.get()) is not None:
                self.wait_s = self._prefetcher.wait_s
                batch, self.texts_read = got
                yield batch
            self.wait_s = self._prefetcher.wait_s
            return
        it, served = iter(self.source), 0
        while limit is None or served < limit:
            start = time.perf_counter()
            batch = self._ahead.pop(0) if self._ahead else next(it, None)
            self.wait_s += time.perf_counter() - start
            if batch is None:
                return
            served += 1
            self.texts_read = getattr(self.source, "texts_seen", None)
            yield batch

    def state_dict(self) -> dict:
        if self._prefetcher is not None:
            return self._prefetcher.state_dict()
        return {"source": self.source.state_dict(), "ahead": list(self._ahead)}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self._ahead = list(state["ahead"])

    def close(self, timeout: float | None = None) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close(timeout)


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


def resume_step(save_dir: str | Path, n_trainers: int, stream_state: bool = False,
                world: int = 1) -> int:
    """The latest step at which every trainer folder of ``save_dir`` has a checkpoint (and,
    with ``stream_state``, the activation stream's state was saved too, by each of
    ``world`` ranks)."""
    folders = trainer_dirs(save_dir, n_trainers)
    common = set.intersection(*(set(checkpoint_steps(f)) for f in folders))
    if stream_state:
        saved = set(stream_state_steps(save_dir, world))
        others = stream_state_worlds(save_dir) - {world}
        if common and not common & saved and others:
            n = max(others)
            raise ValueError(f"{save_dir} was checkpointed by {n} process"
                             f"{'es' if n > 1 else ''} and this run has {world}: each "
                             "process's position in the text is its own, so resume with "
                             f"{'torchrun --nproc-per-node ' + str(n) if n > 1 else 'one process'}")
        common &= saved
    if not common:
        raise ValueError(f"no checkpoint to resume from in {save_dir} (looked for "
                         "checkpoints/trainer_state_*.pt beside ae_*.pt"
                         + (" in every trainer_* folder" if n_trainers > 1 else "")
                         + "); run without resume, with save_steps set")
    return max(common)


def trainer_dirs(save_dir: str | Path, n: int) -> list[Path]:
    return [Path(save_dir)] if n == 1 else [Path(save_dir) / f"trainer_{i}" for i in range(n)]


def train_dictionaries(activations: Iterable, configs: list[TrainerConfig],
                       steps: int | None = None, save_dir: str | Path | None = None,
                       save_steps: int | Iterable[int] | None = None,
                       log_steps: int | None = None, device: str | torch.device = "cpu",
                       run_info: dict | None = None, progress: bool = True,
                       resume: bool = False, wandb_project: str | None = None,
                       on_nonfinite: str = "skip", max_skips: int = 10,
                       shard_dictionaries: bool = False, prefetch: int | None = None,
                       compile: bool | str = False, stats: dict | None = None
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

    A source with ``mean_norm(submodule)`` (a :class:`~dictionary_learning.cache.
    CachedActivations`) gives normalisation the whole data's mean norm instead of the first
    batch's.

    ``resume=True`` continues from the latest checkpoint in ``save_dir`` (dictionary,
    optimizer, schedules, counters, random generators, step). A source with
    ``state_dict``/``load_state_dict`` (an ``ActivationBuffer``) is saved with every
    checkpoint and restored, so a resumed run trains on exactly the batches the
    uninterrupted one would have: pass a buffer built the same way on the same text from
    its start. Other sources are positioned by the caller past the text already read
    (``texts_read`` in the trainer state; :func:`checkpoint_texts_read`).
    Ctrl-C finishes the current step, writes a checkpoint and raises
    :class:`TrainingInterrupted`.

    A step whose batch, loss or gradients are not finite is not applied. With
    ``on_nonfinite="skip"`` it is counted (progress bar, ``metrics.jsonl``, a warning, the
    ``skipped_steps`` of ``config.json``) and training goes on; more than ``max_skips``
    consecutive skipped steps of one dictionary, or any with ``on_nonfinite="stop"``, raise
    :class:`NonFiniteError` naming the step. Nothing non-finite is ever written: the last
    checkpoint stays the resume point.

    Under torch.distributed (``torchrun``) with several processes, each reads its own share
    of the activations. By default the run is data parallel: every process trains every
    dictionary, on its share of each global batch, and the step is the one a single
    process would take on the whole batch (:mod:`dictionary_learning.distributed`); only
    rank 0 writes. With ``shard_dictionaries`` the batches are gathered instead, and each
    process trains (and writes) its own dictionaries ``configs[rank::world]`` on the whole
    global batch; the list returned holds those, others are ``None``.

    ``prefetch`` batches are read ahead by a thread of their own (a buffer's refill, the
    copy to a CUDA device) while the current one trains; ``None`` (default) means
    :func:`default_prefetch` for a resumable source (whose checkpoints save the batches
    read ahead: 2 on a CUDA device, 0 on the CPU) and 0 for a plain iterable (the caller
    positions those by ``texts_read``, and a Ctrl-C stops at the batch being made).
    ``compile=True`` runs each dictionary's loss through ``torch.compile`` (a string names
    the backend, e.g. ``"aot_eager"``); where compiling fails (no
    compiler, an unsupported operation) it warns once and runs eagerly. A ``stats`` dict
    is filled with the run's timing: ``wall_s``, ``data_wait_s`` (time the loop waited for
    batches), their ratio ``data_wait_fraction``, ``steps``, ``prefetch`` and ``compiled``
    (the dictionaries whose compiled loss ran).

    Every logged step goes to each folder's ``metrics.jsonl`` (plotted into
    ``training_curves.png`` at checkpoints and at the end) and, with ``wandb_project``, to
    one Weights & Biases run (``WANDB_MODE=offline`` works without network).
    """
    if not configs:
        raise ValueError("configs is empty: pass at least one TrainerConfig")
    if resume and save_dir is None:
        raise ValueError("resume needs the save_dir of the run to continue")
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got "
                         f"{on_nonfinite!r}")
    if max_skips < 1:
        raise ValueError(f"max_skips must be at least 1, got {max_skips}")
    save_at = _save_schedule(save_steps)
    device = torch.device(device)
    stream = _Stream(activations, device, prefetch)
    buffer_config = dict(getattr(activations, "config", {}) or {})
    if run_info is None:
        run_info = {k: buffer_config.get(k) for k in ("lm_name", "submodule_name")}
    dp = current_batch()  # the ranks of a distributed run (the identity in one process)
    rank, world, main = dp.rank, dp.world_size, dp.rank == 0
    # Which dictionaries this process trains and writes, and over which batch they reduce.
    if shard_dictionaries and world > 1:
        if len(configs) < world:
            raise ValueError(f"shard_dictionaries spreads {len(configs)} dictionaries over "
                             f"{world} processes: give at least {world}, or train data "
                             "parallel")
        mine, step_batch, writes = list(range(rank, len(configs), world)), LOCAL, True
    else:
        mine, step_batch, writes = list(range(len(configs))), dp, main
    all_dirs = None if save_dir is None else trainer_dirs(save_dir, len(configs))
    trainers = [Trainer(configs[i], device, total_steps=steps, batch=step_batch) for i in mine]
    if callable(getattr(activations, "mean_norm", None)):  # a cache knows its statistics
        for t in trainers:
            t.data_mean_norm = activations.mean_norm(t.config.submodule)
    step, n_tokens = 0, 0
    if resume:
        step = resume_step(save_dir, len(configs), stream_state=stream.resumable, world=world)
        for folder, t in zip([all_dirs[i] for i in mine], trainers):
            state = read_trainer_state(folder, step)
            t.load_state(state)
            n_tokens = int(state["activations_trained"])
        if stream.resumable:
            stream.load_state_dict(read_stream_state(save_dir, step, rank, world))
        logger.info("resuming from step %d (%d activations trained)", step, n_tokens)
    writers = []  # data parallel: only rank 0 writes folders
    if save_dir is not None and writes:
        writers = [CheckpointWriter(all_dirs[i], t, buffer_config, {**run_info, **(
            {"submodule_name": t.config.submodule} if t.config.submodule else {})}, steps,
            resume_step=step if resume else None)
            for i, t in zip(mine, trainers)]
    wandb = None
    if wandb_project is not None and main:
        from .dashboards import WandbLogger

        wandb = WandbLogger(wandb_project, run_name=Path(save_dir).name if save_dir else None,
                            config={"trainers": [dataclasses.asdict(resolve_schedules(
                                c, steps)) for c in configs],
                                    "buffer": buffer_config})
    last_checkpoint = step if resume else None

    def checkpoint():
        nonlocal last_checkpoint
        # The stream's state first: a source that failed while read ahead raises here,
        # before anything of this checkpoint is written.
        stream_state = stream.state_dict() if stream.resumable else None
        try:
            for w in writers:
                w.write_weights(step)
            if stream.resumable:
                save_stream_state(save_dir, step, stream_state, rank, world)
            dp.all_true(True)  # every rank's stream state is on disk
            for w in writers:  # written last: they mark the checkpoint complete
                w.write_state(step, n_tokens, texts_read=stream.texts_read)
        except WriteError as e:
            raise WriteError(e.errno, f"{e.strerror}; {_resume_hint(last_checkpoint, save_dir)}"
                             ) from e
        if stream.resumable:
            prune_stream_states(save_dir, keep=step, rank=rank, world=world)
        last_checkpoint = step

    log_every = log_steps or max(1, (steps or 1000) // 100)
    bar = tqdm(total=steps, initial=step, desc="Training", unit="step",
               disable=not progress or not main)
    first_step, start_tokens = step, n_tokens
    uncompile = (compile_losses(trainers, None if compile is True else compile)
                 if compile else None)
    start_time = time.perf_counter()
    try:
        with _DeferredInterrupt() as interrupt:
            batches = stream.batches(None if steps is None else max(0, steps - step))
            while steps is None or step < steps:
                batch = next(batches, None)
                # Every rank stops when one has run out, and all stop at a Ctrl-C on any.
                n_rows, go_on, stop_asked = _agree(dp, batch, interrupt.requested)
                if not go_on:
                    break
                interrupt.requested = stop_asked
                if step_batch is not dp:  # dictionary parallel: every rank sees every row
                    batch = _gather_batch(dp, batch)
                results = []
                for i, t in enumerate(trainers):
                    x, target = split_batch(select_batch(batch, t.config.submodule), device,
                                            t.dtype)
                    result = t.step(step, x, target)
                    if result.skipped is not None:
                        _on_skip(step, i, t, result.skipped, on_nonfinite, max_skips,
                                 _resume_hint(last_checkpoint, save_dir))
                    results.append(result)
                n_tokens += n_rows if n_rows is not None else x.shape[0]
                step += 1
                bar.update(1)
                if step % log_every == 0 or step == first_step + 1:
                    _log(step, n_tokens - start_tokens, results, trainers, bar, writers,
                         log_steps, n_tokens, wandb)
                if save_at(step) or (interrupt.requested and save_dir is not None):
                    checkpoint()
                if interrupt.requested:
                    raise TrainingInterrupted(step, [w.folder for w in writers])
    except PeerLostError as e:
        raise PeerLostError(f"{e}; {_resume_hint(last_checkpoint, save_dir)}") from e
    finally:
        # After a Ctrl-C, do not wait long for a refill the producer may be in the middle of.
        interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
        stream.close(timeout=10.0 if interrupted else None)
        wall = time.perf_counter() - start_time
        if stats is not None:
            stats.update(steps=step - first_step, wall_s=wall, data_wait_s=stream.wait_s,
                         data_wait_fraction=stream.wait_s / wall if wall > 0 else 0.0,
                         prefetch=stream.prefetch,
                         compiled=[] if uncompile is None else uncompile.compiled())
        if uncompile is not None:
            uncompile()
        bar.close()
        if wandb is not None:
            wandb.finish()
    logger.info("%d steps in %.1f s, %.1f%% of it waiting for activations (prefetch %d)",
                step - first_step, wall, 100.0 * stream.wait_s / max(wall, 1e-12),
                stream.prefetch)
    if steps is not None and step < steps and main:
        logger.warning("activations ran out after %d of %d steps", step, steps)
    for i, t in enumerate(trainers):
        if t.n_skipped:
            logger.warning("trainer %d (%s): %d of %d steps skipped (not finite)", i,
                           t.config.dict_class, t.n_skipped, step)
    for w in writers:
        w.finish(step, n_tokens, buffer_config=dict(getattr(activations, "config", {}) or {}))
    trained = {i: t.raw_dictionary() for i, t in zip(mine, trainers)}
    return [trained.get(i) for i in range(len(configs))]


NONFINITE_POLICIES = ("skip", "stop")


def _agree(dp, batch, interrupted: bool) -> tuple[int | None, bool, bool]:
    """``(global rows, go on, stop after this step)``: in one process, from this process;
    under torch.distributed, one all-reduce makes every rank decide alike."""
    if dp.world_size == 1:
        return None, batch is not None, interrupted
    x = None if batch is None else _first_tensor(batch)
    local = torch.tensor([0.0 if x is None else 1.0, float(interrupted),
                          0.0 if x is None else float(x.shape[0])],
                         device=None if x is None else x.device)
    total = dp.sum(local)
    return int(total[2]), int(total[0]) == dp.world_size, bool(total[1] > 0)


def _gather_batch(dp, batch):
    """Every rank's rows of a served batch (tensor, pair or dict), in rank order."""
    if isinstance(batch, dict):
        return {k: _gather_batch(dp, v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_gather_batch(dp, v) for v in batch)
    return dp.gather(batch.to(getattr(dp, "device", batch.device)))


def _first_tensor(batch) -> torch.Tensor:
    while not isinstance(batch, torch.Tensor):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return batch


def _on_skip(step, i, trainer, what, policy, max_skips, hint) -> None:
    """Warn about a skipped step; raise when the policy or the run of skips says stop."""
    name = f"trainer {i} ({trainer.config.dict_class})"
    if policy == "stop":
        raise NonFiniteError(f"step {step}, {name}: the {what} was not finite; stopped "
                             f"(on_nonfinite='stop'); {hint}")
    if trainer.consecutive_skips > max_skips:
        raise NonFiniteError(f"step {step}, {name}: the {what} was not finite in "
                             f"{trainer.consecutive_skips} steps in a row (more than "
                             f"max_skips={max_skips}); check the activations; {hint}")
    logger.warning("step %d, %s: the %s is not finite; step skipped (%d so far)", step, name,
                   what, trainer.n_skipped)


def _resume_hint(last_checkpoint: int | None, save_dir) -> str:
    if save_dir is None:
        return "nothing was saved"
    if last_checkpoint is None:
        return f"no checkpoint was written in {save_dir} yet"
    return (f"--resume continues from the last complete checkpoint (step {last_checkpoint}) "
            f"in {save_dir}")


def checkpoint_texts_read(save_dir: str | Path, n_trainers: int = 1) -> int | None:
    """How many texts the stream had consumed at the checkpoint :func:`train_dictionaries`
    would resume from (``None`` when the stream did not say)."""
    step = resume_step(save_dir, n_trainers)
    texts = int(read_trainer_state(trainer_dirs(save_dir, n_trainers)[0], step)["texts_read"])
    return None if texts < 0 else texts


def _log(step, tokens_this_run, results, trainers, bar, writers, log_steps, n_tokens,
         wandb) -> None:
    logged = [{**Trainer.summary(r), "skipped_steps": t.n_skipped}
              for r, t in zip(results, trainers)]
    elapsed = bar.format_dict["elapsed"] or float("nan")
    first = logged[0]
    postfix = {} if "loss" not in first else dict(
        loss=f"{first['loss']:.4g}", mse=f"{first['mse']:.4g}", l0=f"{first['l0']:.1f}")
    skipped = sum(t.n_skipped for t in trainers)
    bar.set_postfix(**postfix, tok_s=f"{tokens_this_run / elapsed:.0f}",
                    **({"skipped": skipped} if skipped else {}))
    for i, entry in enumerate(logged):
        if log_steps:
            logger.info("step %d trainer %d: %s", step, i,
                        " ".join(f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                 for k, v in entry.items()))
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
    """An iterator that puts a peeked first batch back, keeping the source's ``config``.
    It has no ``state_dict``: a resumed ``trainSAE`` run positions its stream itself (or use
    :func:`train_dictionaries` with the buffer, which saves and restores its state)."""

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
