"""A whole training run from names: model, submodule, text, architectures and sweeps.

:class:`TrainRun` describes a run in plain values (what ``python -m dictionary_learning
train`` takes, one field per option); :func:`run_training` opens the model and the text,
keeps the first ``eval_texts`` documents aside, trains every dictionary of the sweep from
one activation stream, and evaluates each on the held-out documents::

    model, text -> held-out docs | training docs -> ActivationBuffer -> train_dictionaries
                        │                                                    │
                        └────────────> evaluate (same activations for all) <─┘

The run folder holds ``train_args.json`` (this run's :class:`TrainRun`, which ``resume``
reads back), and per dictionary (``save_dir`` or ``save_dir/trainer_{i}``) ``ae.pt``,
``config.json``, ``metrics.jsonl``, checkpoints, ``eval.json`` and
``feature_frequencies.png``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import NamedTuple

import torch

from .files import check_writable, remove_stale_temps, write_json
from .registry import DICTIONARY_CLASSES

logger = logging.getLogger(__name__)

ARCHITECTURES = {
    "relu": "AutoEncoder",
    "topk": "AutoEncoderTopK",
    "batchtopk": "BatchTopKSAE",
    "jumprelu": "JumpReluAutoEncoder",
    "gated": "GatedAutoEncoder",
    "matryoshka": "MatryoshkaBatchTopKSAE",
    "new": "AutoEncoderNew",
    "stretcher": "MLPStretcher",
}
"""Short ``--arch`` names; registered class names are accepted too."""

_TOPK_FAMILY = {"AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"}


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class TrainRun:
    """One training run. Tuple fields are sweeps: every combination is trained, from one
    activation stream, each saved in ``save_dir/trainer_{i}``."""

    model: str = _opt("EleutherAI/pythia-70m-deduped",
                      "HF hub id or local folder of the language model; 'demo' is the small "
                      "offline model trained here once and cached")
    submodule: str = _opt("1.mlp", "dotted path (gpt_neox.layers.1.mlp) or LAYER.COMPONENT "
                          "with COMPONENT in mlp, attn, resid; or 'embed'")
    io: str = _opt("out", "which activation: out, in, or in_to_out (MLP stretcher)")
    data: str = _opt("monology/pile-uncopyrighted",
                     "HF dataset name (streamed), a local .jsonl/.jsonl.zst/.txt file or "
                     "folder, or 'stdlib' (the standard library's docstrings, offline)")
    text_field: str = _opt("text", "field of a JSON row or dataset column holding the text")
    cache: str | None = _opt(None, "train from this activation cache (written by the cache "
                             "command) instead of running the model on --data; the model, "
                             "text and collection options are the cache's")
    arch: tuple[str, ...] = _opt(("relu",), "architectures: " + ", ".join(ARCHITECTURES)
                                 + " (or class names)")
    dict_size: tuple[int, ...] = _opt((), "dictionary sizes (overrides --expansion)")
    expansion: tuple[int, ...] = _opt((16,), "dictionary size as a multiple of the width")
    lr: tuple[float, ...] = _opt((), "peak Adam learning rates (default: each "
                                 "architecture's own: 1.5e-3 for relu, 2e-3 for topk, "
                                 "batchtopk and matryoshka, 1e-3 for the others)")
    sparsity_penalty: tuple[float, ...] = _opt(
        (), "sparsity coefficients (L1 or entropy for relu/gated/new, L0 deviation for "
        "jumprelu; TopK-family dictionaries have none). Default 1e-3 (jumprelu: 1)",
        flags=("--l1",))
    penalty: str = _opt("l1", "sparsity term of relu dictionaries: l1 or entropy")
    k: tuple[int, ...] = _opt((32,), "active latents per token of TopK-family dictionaries")
    target_l0: tuple[float, ...] = _opt((20.0,), "target L0 of jumprelu dictionaries")
    group_fractions: tuple[float, ...] = _opt(
        (0.125, 0.125, 0.25, 0.5), "matryoshka: nested group sizes as fractions of the size")
    steps: int | None = _opt(None, "training steps (default: from --tokens, else until the "
                             "text runs out)")
    epochs: int = _opt(1, "passes over the training text (or the cache)")
    tokens: int | None = _opt(None, "training activations (steps = tokens / batch size)")
    batch_size: int = _opt(4096, "activations per training batch")
    ctx_len: int = _opt(128, "tokens per context")
    n_ctxs: int = _opt(2000, "contexts held by the activation buffer (from a cache: the "
                       "shuffle window holds n_ctxs x ctx_len rows)")
    refresh_batch_size: int = _opt(32, "texts per forward pass when refilling the buffer")
    pack: bool = _opt(False, "pack documents into full ctx_len windows instead of "
                      "truncating and padding each one")
    warmup_steps: int | None = _opt(None, "learning-rate warm-up steps (default: a tenth of "
                                    "the run, at most 1000)")
    decay_start: int | None = _opt(None, "step from which the learning rate decays to 0 "
                                   "(default: none; relu, topk, batchtopk and matryoshka "
                                   "decay over the run's last fifth; --steps for no decay)")
    sparsity_warmup_steps: int | None = _opt(None, "warm-up steps of the sparsity penalty")
    resample_steps: int | None = _opt(None, "resample dead features every this many steps")
    normalize_activations: bool = _opt(False, "train on activations scaled to norm sqrt(d)")
    save_steps: int | None = _opt(None, "checkpoint every this many steps (needed to resume)")
    save_dir: str = _opt("runs/train", "output folder")
    device: str = _opt("cpu", "device of the model and the dictionaries (cpu, cuda, ...); "
                       "under torchrun, cuda is each process's own GPU")
    device_map: str | None = _opt(None, "spread a model too large for one device over the "
                                  "devices (accelerate: auto, balanced, ...); the "
                                  "dictionaries stay on --device")
    shard_dictionaries: bool = _opt(False, "under torchrun: each process trains its share of "
                                    "the sweep's dictionaries on the gathered batches, instead "
                                    "of every process training all of them data parallel")
    dtype: str = _opt("float32", "dtype of the model and of the stored activations")
    seed: int = _opt(0, "seed of the dictionaries' initialisation and the buffer's shuffling")
    eval_texts: int = _opt(256, "documents kept aside (from the start of the text) for "
                           "evaluation; never trained on")
    eval_loss_texts: int = _opt(64, "of those, how many the loss-recovered metric runs on")
    wandb: str | None = _opt(None, "log to this Weights & Biases project (needs wandb; "
                             "WANDB_MODE=offline works without network)")
    on_nonfinite: str = _opt("skip", "a step whose batch, loss or gradients are not finite is "
                             "never applied: 'skip' it and go on, or 'stop' the run")
    max_skips: int = _opt(10, "stop when one dictionary skips more than this many steps in "
                          "a row")

    def __post_init__(self):
        """Every check that needs no model: a bad value fails here, before anything is
        opened or written."""
        from .sources import check_device, torch_dtype

        for name in ("arch", "k"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty: give at least one value")
        for arch in self.arch:
            dictionary_class(arch)
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give --steps or --tokens, not both")
        _positive(self, "batch_size", "ctx_len", "n_ctxs", "refresh_batch_size", "steps",
                  "tokens", "save_steps", "resample_steps", "max_skips", "epochs")
        for name in ("dict_size", "expansion", "k", "target_l0"):
            _positive(self, name)
        for name, values in (("lr", self.lr), ("sparsity_penalty", self.sparsity_penalty)):
            for v in values:
                if not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
                    raise ValueError(f"--{name.replace('_', '-')} {v} is not a "
                                     f"{'positive' if name == 'lr' else 'non-negative'} "
                                     "finite number: give e.g. 1e-3")
        for name in ("warmup_steps", "decay_start", "sparsity_warmup_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
        if self.tokens is not None and self.tokens < self.batch_size:
            raise ValueError(f"--tokens {self.tokens} is less than one batch "
                             f"(--batch-size {self.batch_size}): give more tokens")
        steps = self.total_steps
        if self.decay_start is not None and steps is not None and self.decay_start > steps:
            raise ValueError(f"--decay-start {self.decay_start} is after the run's "
                             f"{steps} steps: give a smaller value (or {steps} for no "
                             "decay)")
        if self.eval_texts < 1 or not 0 < self.eval_loss_texts <= self.eval_texts:
            raise ValueError("need eval_texts >= 1 and 0 < eval_loss_texts <= eval_texts")
        if abs(sum(self.group_fractions) - 1) > 1e-6 or min(self.group_fractions) <= 0:
            raise ValueError(f"group_fractions must be positive and sum to 1, got "
                             f"{self.group_fractions}")
        if self.penalty not in ("l1", "entropy"):
            raise ValueError(f"--penalty must be l1 or entropy, got {self.penalty!r}")
        if self.io not in ("out", "in", "in_to_out"):
            raise ValueError(f"--io must be out, in or in_to_out, got {self.io!r}")
        if self.on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"--on-nonfinite must be skip or stop, got {self.on_nonfinite!r}")
        for k in self.k:
            for size in self.dict_size:
                _check_k(k, size)
        torch_dtype(self.dtype)
        check_device(self.device)

    @property
    def total_steps(self) -> int | None:
        return self.steps if self.tokens is None else max(1, self.tokens // self.batch_size)

    def replace(self, **changes) -> "TrainRun":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict] = {
    "demo": dict(
        model="demo", data="stdlib", submodule="1.mlp", expansion=(8,),
        sparsity_penalty=(1.0,), steps=500, epochs=4, pack=True, batch_size=1024,
        ctx_len=128, n_ctxs=160, refresh_batch_size=16, warmup_steps=50, resample_steps=200,
        save_steps=200, save_dir="runs/demo", eval_texts=150, eval_loss_texts=150),
    "demo-quick": dict(
        model="demo-quick", data="stdlib", submodule="1.mlp", expansion=(8,),
        sparsity_penalty=(1.0,), steps=300, epochs=2, pack=True, batch_size=1024,
        ctx_len=128, n_ctxs=160, refresh_batch_size=16, warmup_steps=30, resample_steps=100,
        save_dir="runs/demo-quick", eval_texts=150, eval_loss_texts=150),
}
"""Named sets of defaults. ``demo`` needs no network: the small model trained here once
and cached (:mod:`dictionary_learning.demo_lm`) and the standard library's docstrings.
``demo-quick`` is the same on a smaller demo model (its own cache folder), for fewer steps."""

ARGS_NAME = "train_args.json"


def _positive(run: TrainRun, *names: str) -> None:
    for name in names:
        value = getattr(run, name)
        for v in (value if isinstance(value, tuple) else (value,)):
            if v is not None and not v > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v}")


def _check_k(k: int, size: int) -> None:
    """The dictionaries' own rule (``check_k``), said in terms of the flags."""
    from .architectures.topk import check_k

    try:
        check_k(k, size)
    except ValueError:
        raise ValueError(f"--k {k} is outside 1..{size}, the dictionary size: a TopK-family "
                         "dictionary keeps k of its features per token") from None


def dictionary_class(arch: str) -> str:
    """The registered class name of an ``--arch`` name (short or full)."""
    name = ARCHITECTURES.get(arch.lower(), arch)
    trainable = sorted(n for n, c in DICTIONARY_CLASSES.items()
                       if not getattr(c, "inference_only", False))
    if name not in trainable:
        what = "loads files of other tools but cannot be trained" if name in \
            DICTIONARY_CLASSES else "is unknown"
        raise ValueError(f"architecture {arch!r} {what}: use one of "
                         f"{', '.join(ARCHITECTURES)} or a class name ({', '.join(trainable)})")
    return name


def trainer_configs(run: TrainRun, d_in: int, d_out: int):
    """One :class:`~dictionary_learning.training.TrainerConfig` per combination of the
    sweep's values that matter to its architecture (duplicates dropped, order kept)."""
    from .trainer import TrainerConfig

    sizes = run.dict_size or tuple(e * d_in for e in run.expansion)
    configs = []
    for arch, size, lr in itertools.product(run.arch, sizes, run.lr or (None,)):
        cls = dictionary_class(arch)
        for extra, penalty in _variants(run, cls, size):
            config = TrainerConfig(
                activation_dim=d_in, dict_size=size, lr=lr, sparsity_penalty=penalty,
                penalty=run.penalty if cls == "AutoEncoder" else "l1", dict_class=cls,
                output_dim=d_out if cls == "MLPStretcher" else None, dict_kwargs=extra,
                warmup_steps=run.warmup_steps, decay_start=run.decay_start,
                sparsity_warmup_steps=run.sparsity_warmup_steps,
                normalize_activations=run.normalize_activations,
                resample_steps=run.resample_steps, seed=run.seed)
            if config not in configs:
                configs.append(config)
    if d_in != d_out and any(c.dict_class != "MLPStretcher" for c in configs):
        raise ValueError(f"io={run.io} maps width {d_in} to {d_out}: only the stretcher "
                         "architecture (--arch stretcher) can be trained on it")
    return configs


def _variants(run: TrainRun, cls: str, size: int):
    """``(dict_kwargs, sparsity_penalty)`` pairs of one architecture and size."""
    if cls in _TOPK_FAMILY:
        # The threshold schedule of the batch-top-k classes follows the run's length
        # (trainer.resolve_schedules).
        for k in run.k:
            _check_k(k, size)
            extra = {"k": k}
            if cls == "MatryoshkaBatchTopKSAE":
                groups = [max(1, round(f * size)) for f in run.group_fractions]
                groups[-1] = size - sum(groups[:-1])
                extra["group_sizes"] = groups
            yield extra, 0.0
    elif cls == "JumpReluAutoEncoder":
        for target, penalty in itertools.product(run.target_l0, run.sparsity_penalty or (1.0,)):
            yield {"target_l0": target}, penalty
    else:
        for penalty in run.sparsity_penalty or (1e-3,):
            yield {}, penalty


def open_model(name: str, device: str = "cpu", dtype: str = "float32", progress: bool = True,
               device_map: str | None = None):
    """The run's nnsight model: ``demo`` (built once, cached), else a hub id or a folder
    (spread over devices by accelerate with ``device_map``)."""
    from . import demo_lm

    if demo_lm.demo_config(name) is not None:
        return demo_lm.demo_language_model(device=device, progress=progress,
                                           config=demo_lm.demo_config(name))
    from .sources import load_model

    return load_model(name, device=device, dtype=None if dtype == "float32" else dtype,
                      device_map=device_map)


class RunResult(NamedTuple):
    """What a run leaves: the folders written and each dictionary's evaluation."""

    folders: list[Path]
    configs: list
    metrics: list[dict]


def run_training(run: TrainRun, resume: bool = False, progress: bool = True,
                 overwrite: bool = False) -> RunResult:
    """Train and evaluate every dictionary of ``run``; see the module docstring.

    Every check runs before the first write: a run that fails them leaves ``save_dir`` as
    it was. A new run refuses a ``save_dir`` that holds a run, unless ``overwrite``
    (which then removes that run's files first); ``resume`` continues it exactly, from
    its latest complete checkpoint."""
    from .buffer import ActivationBuffer
    from .sources import open_texts, torch_dtype
    from .submodules import resolve_submodule, submodule_path
    from .training import train_dictionaries

    save_dir = Path(run.save_dir)
    check_writable(save_dir)
    if resume:
        n_saved = _saved_config_count(save_dir, run)
    else:
        n_saved = None
        held = existing_run_files(save_dir)
        if held and not overwrite:
            raise ValueError(f"{save_dir} already holds a run ({', '.join(held[:3])}"
                             f"{', ...' if len(held) > 3 else ''}): continue it with --resume, "
                             "replace it with --overwrite, or choose another --save-dir")
    manifest = None
    if run.cache is not None:
        from .cache.run import fit_run_to_cache

        run, manifest = fit_run_to_cache(run)
    from .distributed import barrier, init_from_environment, rank_and_world, rank_device

    init_from_environment(run.device)
    rank, world = rank_and_world()
    if run.batch_size % world:
        raise ValueError(f"--batch-size {run.batch_size} does not split over {world} "
                         f"processes: give a multiple of {world}")
    device = rank_device(run.device)
    per_rank = run.batch_size // world  # the global batch is every rank's together
    progress = progress and rank == 0
    model = open_model(run.model, device, run.dtype, progress=progress,
                       device_map=run.device_map)
    torch.manual_seed(run.seed)  # after the model: building the demo LM draws numbers too
    texts = open_texts(run.data, text_field=run.text_field)
    held_out = list(islice(texts, run.eval_texts))
    if manifest is not None:
        from .cache import CachedActivations
        from .cache.run import cache_submodule

        submodule = cache_submodule(run, manifest, model)
        buffer = CachedActivations(run.cache, per_rank, submodule=submodule,
                                   window=run.n_ctxs * run.ctx_len, epochs=run.epochs,
                                   seed=run.seed, rank=rank, world_size=world)
    else:
        texts = _training_texts(texts, run, len(held_out))
        submodule = submodule_path(model, run.submodule)
        resolve_submodule(model, submodule)  # an unknown name fails here, with nearest names
        # On resume the buffer restores its saved state and skips the texts it had read.
        # Under torchrun each process reads every world-th document.
        buffer = ActivationBuffer(islice(_epochs(texts, run), rank, None, world), model,
                                  submodule, io=run.io, n_ctxs=run.n_ctxs, ctx_len=run.ctx_len,
                                  refresh_batch_size=run.refresh_batch_size,
                                  out_batch_size=per_rank, dtype=torch_dtype(run.dtype),
                                  pack=run.pack, progress=progress, seed=run.seed)
    widths = buffer.d_submodule
    d_in, d_out = widths if isinstance(widths, tuple) else (widths, widths)
    configs = trainer_configs(run, d_in, d_out)
    if n_saved is not None and n_saved != len(configs):
        raise ValueError(f"{save_dir} holds {n_saved} dictionaries but these arguments "
                         f"make {len(configs)}: resume with the arguments of that run")
    if resume:  # a damaged or refused trainer state fails now, before anything is written
        from .saving import read_trainer_state
        from .training import trainer_dirs, resume_step

        step = resume_step(save_dir, len(configs), stream_state=True, world=world)
        for folder in trainer_dirs(save_dir, len(configs)):
            read_trainer_state(folder, step)
    # Every check has passed (on every process): from here on rank 0 writes the folder.
    barrier()
    if rank == 0:
        if overwrite and not resume:
            remove_run(save_dir)
        remove_stale_temps(save_dir, recursive=True)
        write_json(save_dir / ARGS_NAME, dataclasses.asdict(run))
    logger.info("training %d dictionar%s on %s of %s", len(configs),
                "y" if len(configs) == 1 else "ies", submodule, run.model)
    dictionaries = train_dictionaries(buffer, configs, steps=run.total_steps, save_dir=save_dir,
                                      save_steps=run.save_steps, device=device,
                                      progress=progress, resume=resume,
                                      wandb_project=run.wandb, on_nonfinite=run.on_nonfinite,
                                      max_skips=run.max_skips,
                                      shard_dictionaries=run.shard_dictionaries)
    folders = ([save_dir] if len(configs) == 1
               else [save_dir / f"trainer_{i}" for i in range(len(configs))])
    barrier()  # every process's dictionaries are written
    if rank != 0:  # rank 0 evaluates
        return RunResult([], configs, [])
    if any(d is None for d in dictionaries):  # trained by other processes
        from .loading import load_dictionary

        dictionaries = [d if d is not None else load_dictionary(f, device=device)[0]
                        for d, f in zip(dictionaries, folders)]
    from .held_out import evaluate_held_out

    metrics = evaluate_held_out(dictionaries, folders, held_out, model, submodule, run,
                                progress=progress)
    return RunResult(folders, configs, metrics)


# What the train command writes into a run folder (and a sweep's trainer_* folders).
RUN_FILES = (ARGS_NAME, "ae.pt", "config.json", "metrics.jsonl", "eval.json",
             "feature_frequencies.png", "training_curves.png")


def existing_run_files(save_dir: Path) -> list[str]:
    """The files and folders of a train run in ``save_dir`` (empty when there is none)."""
    if not save_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if (save_dir / name).exists()]
    found += [p.name + "/" for p in sorted(save_dir.glob("trainer_*")) if p.is_dir()]
    if (save_dir / "checkpoints").is_dir():
        found.append("checkpoints/")
    return found


def remove_run(save_dir: Path) -> None:
    """Remove what a train run wrote into ``save_dir`` (and nothing else), for --overwrite."""
    import shutil

    for folder in [save_dir, *(p for p in save_dir.glob("trainer_*") if p.is_dir())]:
        for name in RUN_FILES:
            (folder / name).unlink(missing_ok=True)
        if (folder / "checkpoints").is_dir():
            shutil.rmtree(folder / "checkpoints")
        if folder != save_dir and not any(folder.iterdir()):
            folder.rmdir()


def _training_texts(rest: Iterator[str], run: TrainRun, n_held_out: int) -> Iterator[str]:
    """``rest`` (the texts after the held-out ones), refused when there is none: a data
    source with no more documents than ``--eval-texts`` leaves nothing to train on."""
    try:
        first = next(rest)
    except StopIteration:
        raise ValueError(
            f"--data {run.data} has only {n_held_out} document(s), and --eval-texts "
            f"{run.eval_texts} keeps them all aside for evaluation, leaving none to train on: "
            f"give a smaller --eval-texts (e.g. {max(1, n_held_out // 5)}) or more text"
        ) from None
    return chain([first], rest)


def _epochs(first_pass, run: TrainRun):
    """The training documents ``run.epochs`` times over: ``first_pass`` (already past the
    held-out documents), then the source reopened, skipping the held-out ones each time."""
    from .sources import open_texts

    yield from first_pass
    for _ in range(run.epochs - 1):
        yield from islice(open_texts(run.data, text_field=run.text_field), run.eval_texts, None)


def _saved_config_count(save_dir: Path, run: TrainRun) -> int:
    if (save_dir / "trainer_0").is_dir():
        return sum(1 for p in save_dir.glob("trainer_*") if p.is_dir())
    if (save_dir / "checkpoints").is_dir():
        return 1
    why = (f"it was stopped before its first checkpoint (--save-steps {run.save_steps})"
           if run.save_steps else "it was started without --save-steps, so it wrote none")
    raise ValueError(f"nothing to resume in {save_dir}: no checkpoint there ({why}); start "
                     "it again with --overwrite")


def read_run_args(save_dir: str | Path) -> dict:
    """The saved arguments of the run in ``save_dir`` (for resuming)."""
    path = Path(save_dir) / ARGS_NAME
    if not path.is_file():
        where = (f"{save_dir} does not exist" if not Path(save_dir).exists() else
                 f"no train run was started in {save_dir} (it has no {ARGS_NAME})")
        raise FileNotFoundError(f"nothing to resume: {where}; start the run without --resume")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}): the run cannot be resumed; start it "
                         "again with --overwrite") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is damaged (a JSON {type(saved).__name__}, not an object): "
                         "the run cannot be resumed; start it again with --overwrite")
    fields = {f.name: f for f in dataclasses.fields(TrainRun)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        logger.warning("%s: ignoring unknown keys %s", path, unknown)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
