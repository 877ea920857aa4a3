"""Training quality on the demo LM: every architecture at several sparsities, one budget.

:func:`run_quality` collects the training activations once (the demo LM, the standard
library's docstrings packed into ``ctx_len`` windows, the first ``eval_texts`` documents
kept aside), trains every dictionary of :data:`SWEEP` on the same batches (one
:func:`~dictionary_learning.training.train_dictionaries` call per architecture, so all
sparsities of an architecture share one pass over the stream), and measures each on the
held-out documents with :func:`~dictionary_learning.assess.score`: FVE, L0, features alive,
loss (CE) recovered and KL score. :func:`write_report` writes the table (JSON) and the
frontier plot (FVE and CE recovered against L0, one line per architecture)::

    demo LM, stdlib -> held-out docs ──────────────> score (same activations for all)
                    └> training rows [N, d] (collected once) -> train_dictionaries per arch

``scripts/quality.py`` is the command line.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path

import torch

from ..files import atomic_write, write_json

logger = logging.getLogger(__name__)

TOPK_FAMILY = ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE")

SWEEP: dict[str, list[dict]] = {
    # One entry per dictionary: TrainerConfig keywords beyond the shared ones.
    "relu": [{"dict_class": "AutoEncoder", "sparsity_penalty": p}
             for p in (0.05, 0.1, 0.3, 0.6, 1.2, 2.4)],
    "topk": [{"dict_class": "AutoEncoderTopK", "dict_kwargs": {"k": k}} for k in (16, 32, 64)],
    "batchtopk": [{"dict_class": "BatchTopKSAE", "dict_kwargs": {"k": k}}
                  for k in (16, 32, 64)],
    "matryoshka": [{"dict_class": "MatryoshkaBatchTopKSAE", "dict_kwargs": {"k": k}}
                   for k in (16, 32, 64)],
    "jumprelu": [{"dict_class": "JumpReluAutoEncoder", "sparsity_penalty": 1.0,
                  "dict_kwargs": {"target_l0": t}} for t in (16.0, 32.0, 64.0)],
    "gated": [{"dict_class": "GatedAutoEncoder", "sparsity_penalty": p}
              for p in (0.5, 1.0, 2.0)],
    "new": [{"dict_class": "AutoEncoderNew", "sparsity_penalty": p} for p in (1.0, 2.0, 4.0)],
}
"""Architectures and the sparsities each is trained at (3 or more per architecture)."""

UPSTREAM = "upstream-relu"
"""The reference line: upstream saprmarks/dictionary_learning's ``StandardTrainer`` (ReLU,
unit-norm decoder, L1) at the penalties of ``SWEEP["relu"]``, on the same rows in the same
order, at its own default learning rate (:data:`UPSTREAM_LR`, no decay) with our warm-up
(upstream's defaults, 1000 lr and 2000 sparsity warm-up steps, do
not fit a 1500-step run: its own schedule check refuses them), scored by the same
evaluator. It needs upstream's package importable as ``upstream_dl`` (both packages are
named ``dictionary_learning``), e.g. from a checkout::

    git -C UPSTREAM archive HEAD dictionary_learning | tar -x -C /tmp/up
    mv /tmp/up/dictionary_learning /tmp/up/upstream_dl
    PYTHONPATH=/tmp/up .venv/bin/python scripts/quality.py --arch relu upstream-relu
"""

UPSTREAM_LR = 1e-3
"""The reference line's peak learning rate: upstream ``StandardTrainer``'s default (it does
not decay by default either). Ours differs:
:data:`~dictionary_learning.architectures.autoencoder.RELU_LR`."""

MATRYOSHKA_FRACTIONS = (0.125, 0.125, 0.25, 0.5)


@dataclass(frozen=True)
class QualitySetup:
    """The budget and the data of a quality run (defaults: issue 19's budget)."""

    steps: int = 1500
    """Training steps of every dictionary."""
    batch_size: int = 1024
    """Activations per step."""
    expansion: int = 16
    """Dictionary size as a multiple of the activation width (256 -> 4096)."""
    submodule: str = "1.mlp"
    """Where the activations come from (layer-1 MLP output)."""
    ctx_len: int = 128
    n_ctxs: int = 1024
    """Contexts in the collection buffer (its shuffle window)."""
    eval_texts: int = 150
    """Documents kept aside for evaluation (the activation metrics run on all of them)."""
    eval_loss_texts: int = 64
    """Of those, how many the loss metrics (CE recovered, KL) run on."""
    alive_rows: int = 2 ** 18
    """The run's last this many training activations, on which features alive are counted
    too (``frac_alive_train``): the held-out documents' 8,160 tokens see a feature that
    fires once in 10,000 tokens less than every other time, so their ``frac_alive`` counts
    rare features as dead. 0: not counted."""
    lr: float | None = None
    """Peak learning rate of every dictionary; ``None``: each class's own (``default_lr``:
    1e-3; ReLU's 1.5e-3, the TopK family's 2e-3)."""
    seed: int = 0
    archs: tuple[str, ...] = tuple(SWEEP)
    """Which entries of :data:`SWEEP` to train."""
    max_per_arch: int | None = None
    """Train only the first this many sparsities of each architecture (tests)."""

    def __post_init__(self):
        if self.alive_rows < 0:
            raise ValueError(f"alive_rows must be 0 or more, got {self.alive_rows}")


def configs_for(arch: str, d: int, setup: QualitySetup) -> list:
    """The :class:`~dictionary_learning.trainer.TrainerConfig` of every dictionary of
    ``arch``. Schedules (warm-up, dead-feature window, threshold estimation) are left to
    the trainer's defaults, which scale with the run."""
    from ..trainer import TrainerConfig

    if arch not in SWEEP:
        raise ValueError(f"unknown architecture {arch!r}: use one of {', '.join(SWEEP)}")
    m = setup.expansion * d
    configs = []
    for entry in SWEEP[arch][: setup.max_per_arch]:
        entry = dict(entry)
        kwargs = dict(entry.pop("dict_kwargs", {}))
        if entry["dict_class"] == "MatryoshkaBatchTopKSAE":
            groups = [max(1, round(f * m)) for f in MATRYOSHKA_FRACTIONS]
            groups[-1] = m - sum(groups[:-1])
            kwargs["group_sizes"] = groups
        configs.append(TrainerConfig(d, m, lr=entry.pop("lr", setup.lr), dict_kwargs=kwargs,
                                     seed=setup.seed, **entry))
    return configs


def open_demo(setup: QualitySetup, progress: bool = False, lm_config=None, cache_dir=None):
    """``(model, submodule path, held-out texts, training text stream)`` of the demo LM
    (``lm_config``: another :class:`~dictionary_learning.demo_lm.DemoLMConfig`, for tests)."""
    from .. import demo_lm
    from ..sources import open_texts
    from ..submodules import submodule_path

    model = demo_lm.demo_language_model(cache_dir=cache_dir, progress=progress,
                                        config=lm_config or demo_lm.DEMO_LM_CONFIG)
    texts = open_texts("stdlib")
    held_out = list(islice(texts, setup.eval_texts))

    def training_texts():  # the training documents, over and over (epochs)
        yield from texts
        while True:
            yield from islice(open_texts("stdlib"), setup.eval_texts, None)

    return model, submodule_path(model, setup.submodule), held_out, training_texts()


@torch.no_grad()
def collect_rows(model, submodule: str, texts, n_rows: int, setup: QualitySetup,
                 progress: bool = False) -> torch.Tensor:
    """``[n_rows, d]`` shuffled activations from an :class:`ActivationBuffer` over
    ``texts`` (packed windows), collected once so every architecture trains on the same
    rows in the same order."""
    from ..buffer import ActivationBuffer

    buffer = ActivationBuffer(texts, model, submodule, n_ctxs=setup.n_ctxs,
                              ctx_len=setup.ctx_len, refresh_batch_size=32,
                              out_batch_size=setup.batch_size, pack=True, progress=progress,
                              seed=setup.seed)
    rows, n = [], 0
    for batch in buffer:
        rows.append(batch)
        n += batch.shape[0]
        if n >= n_rows:
            break
    if n < n_rows:
        raise ValueError(f"the text gave only {n} of {n_rows} activations")
    return torch.cat(rows)[:n_rows]


def _batches(rows: torch.Tensor, batch_size: int):
    return (rows[i:i + batch_size] for i in range(0, rows.shape[0] - batch_size + 1, batch_size))


def train_and_score(rows: torch.Tensor, arch: str, setup: QualitySetup, model,
                    submodule: str, held, progress: bool = False) -> list[dict]:
    """Train ``arch``'s dictionaries on ``rows`` (one stream, ``setup.steps`` steps; for
    :data:`UPSTREAM`, :func:`upstream_dictionaries`) and score each: on ``held`` (the
    held-out documents), and features alive on the last ``setup.alive_rows`` rows trained
    on (``frac_alive_train``)."""
    from ..assess import score
    from ..evaluation import reconstruction_metrics
    from ..trainer import resolve_schedules
    from ..training import train_dictionaries

    start = time.perf_counter()
    if arch == UPSTREAM:
        configs, dictionaries = upstream_dictionaries(rows, setup)
    else:
        configs = configs_for(arch, rows.shape[1], setup)
        dictionaries = train_dictionaries(_batches(rows, setup.batch_size), configs,
                                          steps=setup.steps, progress=progress)
    seconds = time.perf_counter() - start
    results = []
    seen = rows[: setup.steps * setup.batch_size]
    last = seen[max(0, seen.shape[0] - setup.alive_rows):] if setup.alive_rows else None
    for config, dictionary in zip(configs, dictionaries):
        metrics = score(dictionary, model, submodule, "out", setup.ctx_len, held)
        metrics.pop("feature_frequencies")
        if last is not None:
            metrics["frac_alive_train"] = reconstruction_metrics(
                dictionary, last.split(8192))["frac_alive"]
        results.append({"dict_class": config.dict_class,
                        "sparsity_penalty": config.sparsity_penalty,
                        "lr": resolve_schedules(config, setup.steps).lr,
                        "dict_kwargs": {k: v for k, v in config.dict_kwargs.items()
                                        if k != "group_sizes"},
                        "train_seconds": seconds / len(configs), **metrics})
    return results


def upstream_dictionaries(rows: torch.Tensor, setup: QualitySetup) -> tuple[list, list]:
    """Train :data:`UPSTREAM`'s dictionaries on ``rows``; returns their configs (ours, for
    the table) and the trained weights as our ``AutoEncoder`` (same keys, same math)."""
    try:
        from upstream_dl.trainers.standard import StandardTrainer
    except ImportError as e:
        raise ImportError(f"{UPSTREAM} needs upstream dictionary_learning importable as "
                          "upstream_dl (see dictionary_learning.measure.quality.UPSTREAM)") from e
    from ..architectures.autoencoder import AutoEncoder
    from ..trainer import resolve_schedules

    # Upstream's own schedule: its default peak rate, no decay (decay_start = the run's end).
    configs = [resolve_schedules(replace(
        c, lr=setup.lr or UPSTREAM_LR, decay_start=setup.steps), setup.steps)
        for c in configs_for("relu", rows.shape[1], setup)]
    trainers = [StandardTrainer(
        steps=setup.steps, activation_dim=c.activation_dim, dict_size=c.dict_size, layer=0,
        lm_name="demo", lr=c.lr, l1_penalty=c.sparsity_penalty, warmup_steps=c.warmup_steps,
        sparsity_warmup_steps=None, seed=setup.seed, device="cpu", wandb_name=None)
        for c in configs]
    for step, x in enumerate(islice(_batches(rows, setup.batch_size), setup.steps)):
        for trainer in trainers:
            trainer.update(step, x)
    dictionaries = []
    for c, trainer in zip(configs, trainers):
        ae = AutoEncoder(c.activation_dim, c.dict_size)
        ae.load_state_dict(trainer.ae.state_dict())
        dictionaries.append(ae)
    return configs, dictionaries


def run_quality(setup: QualitySetup = QualitySetup(), rows: torch.Tensor | None = None,
                progress: bool = False, lm_config=None, cache_dir=None,
                on_progress=None) -> dict:
    """Train and score every architecture of ``setup``; returns the report (setup, rows of
    the table). ``rows`` may be given (``[>= steps * batch_size, d]``) to skip collection;
    ``lm_config`` and ``cache_dir`` choose another demo LM (tests); ``on_progress(report)``
    is called with the report so far after each architecture."""
    from ..assess import held_out_from
    from ..buffer import ActivationBuffer

    torch.manual_seed(setup.seed)
    model, submodule, held_out, training = open_demo(setup, progress, lm_config, cache_dir)
    n_rows = setup.steps * setup.batch_size
    start = time.perf_counter()
    if rows is None:
        rows = collect_rows(model, submodule, training, n_rows, setup, progress)
    collect_seconds = time.perf_counter() - start
    buffer = ActivationBuffer(held_out, model, submodule, n_ctxs=len(held_out),
                              ctx_len=setup.ctx_len, refresh_batch_size=32,
                              out_batch_size=4096, progress=False, seed=setup.seed)
    held = held_out_from(buffer, list(buffer), held_out[: setup.eval_loss_texts])
    report = {"setup": asdict(setup), "collect_seconds": collect_seconds,
              "n_eval_tokens": sum(b.shape[0] for b in held.batches),
              "n_loss_texts": len(held.loss_texts), "rows": []}
    for arch in setup.archs:
        logger.info("training %s dictionaries", arch)
        for result in train_and_score(rows, arch, setup, model, submodule, held, progress):
            report["rows"].append({"arch": arch, **result})
        if on_progress is not None:
            on_progress(report)
    return report


COLUMNS = (("arch", "arch", "{}"), ("sparsity", "sparsity", "{}"), ("l0", "L0", "{:.1f}"),
           ("frac_variance_explained", "FVE", "{:.4f}"), ("frac_alive", "alive", "{:.3f}"),
           ("frac_alive_train", "alive (train)", "{:.3f}"),
           ("frac_recovered", "CE rec.", "{:.4f}"), ("kl_score", "KL score", "{:.4f}"))


def sparsity_label(row: dict) -> str:
    kwargs = row.get("dict_kwargs", {})
    if "k" in kwargs:
        return f"k={kwargs['k']}"
    if "target_l0" in kwargs:
        return f"target_l0={kwargs['target_l0']:g}"
    return f"l1={row['sparsity_penalty']:g}"


def format_table(report: dict) -> str:
    """The report's rows as a Markdown table."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in report["rows"]:
        cells = []
        for key, _, fmt in COLUMNS:
            value = sparsity_label(row) if key == "sparsity" else row.get(key)
            cells.append("n/a" if value is None or (isinstance(value, float) and
                                                    math.isnan(value)) else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_frontier(report: dict, path: str | Path) -> None:
    """FVE and CE recovered against L0 (log axis), one line per architecture (needs
    matplotlib)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the quality plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = report["setup"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arch in dict.fromkeys(r["arch"] for r in report["rows"]):
        rows = sorted((r for r in report["rows"] if r["arch"] == arch), key=lambda r: r["l0"])
        l0 = [r["l0"] for r in rows]
        for ax, key in zip(axes, ("frac_variance_explained", "frac_recovered")):
            ax.plot(l0, [r.get(key, math.nan) for r in rows], marker="o", label=arch,
                    **({"linestyle": "--", "color": "0.4"} if arch == UPSTREAM else {}))
    for ax, title in zip(axes, ("fraction of variance explained", "CE loss recovered")):
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active features per token)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"demo LM {setup['submodule']}, {setup['steps']} steps x "
                 f"{setup['batch_size']} activations, expansion {setup['expansion']}",
                 fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(report: dict, json_path: str | Path, png_path: str | Path) -> None:
    write_json(Path(json_path), report)
    plot_frontier(report, png_path)
