"""Training dashboards: a PNG of the training curves from ``metrics.jsonl``, and optional
Weights & Biases logging.

The training loop writes one JSON line per logged step to each dictionary's
``metrics.jsonl`` (``step``, ``activations``, every loss term, ``l0``,
``frac_variance_explained``, ``lr``). :func:`plot_training_curves` turns that file into one
PNG with a panel per quantity against step; it tolerates a half-written last line (a run
that crashed or is still writing). :class:`WandbLogger` sends the same numbers to W&B,
online or in wandb's offline mode (``WANDB_MODE=offline``, synced later with
``wandb sync``). Both are independent of the loop: it calls them.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .files import atomic_write

logger = logging.getLogger(__name__)

# Keys of a metrics line that are axes, not plotted quantities.
AXES = ("step", "activations")
# Plotted after the loss terms, in this order.
LAST = ("l0", "frac_variance_explained", "lr")


def read_metrics(metrics_jsonl: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, in order.

    Blank lines are skipped. An unreadable *last* line (cut short by a crash or a write in
    progress) is dropped with a warning; an unreadable earlier line raises ``ValueError``.
    """
    path = Path(metrics_jsonl)
    lines = path.read_text().splitlines()  # FileNotFoundError for a missing file
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if any(rest.strip() for rest in lines[i + 1:]):
                raise ValueError(f"{path}, line {i + 1}, is not a JSON object ({e}); "
                                 "is this a metrics.jsonl written by the training loop?") from e
            logger.warning("%s: ignoring an incomplete last line (%d characters)", path,
                           len(line))
            break
        records.append(record)
    return records


def metric_series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """``{name: (steps, values)}`` for every numeric quantity in ``records``.

    Loss terms come first in the order first seen, then ``l0``,
    ``frac_variance_explained`` and ``lr``. A record without a ``step`` is skipped.
    """
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, (int, float)):
            continue
        for name, value in record.items():
            if name in AXES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault(name, ([], []))
            steps.append(step)
            values.append(float(value))
    order = [k for k in series if k not in LAST] + [k for k in LAST if k in series]
    return {k: series[k] for k in order}


def training_curves_figure(series: dict[str, tuple[list, list]], title: str | None = None):
    """A matplotlib ``Figure`` (Agg canvas, pyplot untouched) with one panel per series.

    A panel whose positive values span more than two decades gets a log y axis. On a
    linear axis (``lr`` excepted), values far outside the range of the run after its first
    fifth (the first steps' FVE of -60, say) are left off the y range, with a note saying
    from which step the curve is in view, so that the trained values can be read.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting training curves needs matplotlib: "
                          "pip install matplotlib") from e

    n = max(1, len(series))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 2.8 * nrows + 0.5))
    FigureCanvasAgg(fig)
    if not series:
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no metrics logged yet", ha="center", va="center")
    for i, (name, (steps, values)) in enumerate(series.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.plot(steps, values, color=f"C{i % 10}", linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        finite = [v for v in values if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
            ax.set_yscale("log")
        elif name != "lr":
            _clip_early_outliers(ax, steps, values)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


SKIP_FRACTION = 0.2
"""Share of the logged points, from the start, that may fall off a clipped panel."""


def trained_range(values: list[float], skip_fraction: float = SKIP_FRACTION
                  ) -> tuple[float, float] | None:
    """y limits that show the values after the first ``skip_fraction`` of them (padded by
    a tenth of their span), or None when the full range is at most twice that span (the
    early values do not crowd the later ones out)."""
    finite = [v for v in values if math.isfinite(v)]
    later = finite[int(len(finite) * skip_fraction):]
    if len(later) < 2:
        return None
    lo, hi = min(later), max(later)
    span = hi - lo or max(abs(hi) * 0.1, 1e-12)
    if max(finite) - min(finite) <= 2 * span:
        return None
    return lo - 0.1 * span, hi + 0.1 * span


def _clip_early_outliers(ax, steps: list, values: list[float]) -> None:
    limits = trained_range(values)
    if limits is None:
        return
    ax.set_ylim(*limits)
    lo, hi = limits
    beyond = [s for s, v in zip(steps, values) if math.isfinite(v) and not lo <= v <= hi]
    ax.text(0.98, 0.04, f"off the axis: {len(beyond)} point(s), the last at step "
            f"{beyond[-1]:g}", transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
            color="0.35")


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path,
                         title: str | None = None) -> Path:
    """Write a PNG of every quantity in ``metrics_jsonl`` against step; return its path.

    Safe to call while training runs (at each checkpoint): the PNG is written to a
    temporary file and renamed into place. An empty log gives a PNG that says so.
    """
    series = metric_series(read_metrics(metrics_jsonl))
    fig = training_curves_figure(series, title)
    out_png = Path(out_png)
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return out_png


class WandbLogger:
    """Logs the training loop's numbers to one Weights & Biases run.

    ``mode``: ``"online"``, ``"offline"`` or ``"disabled"``; ``None`` lets wandb read
    ``WANDB_MODE`` (``WANDB_MODE=offline`` writes the run under ``dir/wandb/`` with no
    network; ``wandb sync`` uploads it later). Metrics of trainer ``i`` are logged as
    ``trainer_{i}/{name}`` so several dictionaries trained together share one run.
    """

    def __init__(self, project: str, run_name: str | None = None, config: dict | None = None,
                 mode: str | None = None, dir: str | Path | None = None):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("logging to Weights & Biases needs wandb: pip install wandb"
                              ) from e
        if mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"mode must be 'online', 'offline', 'disabled' or None, got {mode!r}")
        kwargs = {"project": project, "name": run_name, "config": config or {}}
        if mode is not None:
            kwargs["mode"] = mode
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(dir)
        self._wandb = wandb
        self.run = wandb.init(**kwargs)
        self._finished = False

    def log(self, step: int, metrics: dict, trainer_index: int = 0) -> None:
        """Log ``metrics`` (name -> number) of trainer ``trainer_index`` at ``step``."""
        if self._finished:
            raise RuntimeError("this WandbLogger has finished; make a new one")
        data = {f"trainer_{trainer_index}/{name}": _scalar(value)
                for name, value in metrics.items() if name not in AXES}
        self.run.log(data, step=int(step))

    def log_image(self, name: str, png: str | Path, step: int | None = None) -> None:
        """Attach an image (e.g. the PNG of :func:`plot_training_curves`) to the run."""
        self.run.log({name: self._wandb.Image(str(png))}, step=step)

    def finish(self) -> None:
        """Close the run. Calling it twice is harmless. (wandb's background process may
        finish writing an offline run's ``.wandb`` file a moment after this returns.)"""
        if not self._finished:
            self._finished = True
            self.run.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


def _scalar(value):
    """Plain Python numbers for wandb (0-d tensors and numpy scalars via ``.item()``)."""
    return value.item() if hasattr(value, "item") else value
