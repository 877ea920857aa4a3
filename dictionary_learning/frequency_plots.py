"""Feature-frequency histograms: one dictionary's (:func:`frequency_histogram_figure`, what
:func:`~dictionary_learning.evaluation.feature_frequency_histogram` saves), or several on one
figure (:func:`frequency_grid`, a panel each).

log10 feature frequency on equal-width log bins; dead features (frequency 0, no logarithm)
are counted in a label at the top left, over how many tokens when that is known, and the
y axis is raised so that no bar reaches the label. Uses matplotlib's Agg canvas directly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .files import atomic_write


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting feature frequencies needs matplotlib: "
                          "pip install matplotlib") from e
    return Figure, FigureCanvasAgg


def _fractions(frequencies, what: str = "frequencies"):
    a = torch.as_tensor(frequencies).detach().double().flatten().cpu().numpy()
    if a.size == 0 or (a < 0).any() or (a > 1).any():
        raise ValueError(f"{what} must be a non-empty array of fractions in [0, 1]")
    return a


def dead_label(n_dead: int, n_features: int, n_tokens: int | None = None) -> str:
    """``"3 of 2,048 features dead (never fired in 8,159 tokens; not shown)"``."""
    over = f" in {n_tokens:,} tokens" if n_tokens is not None else ""
    return f"{n_dead:,} of {n_features:,} features dead (never fired{over}; not shown)"


def keep_clear_of_bars(ax, label, margin: float = 0.04) -> None:
    """Raise the top of ``ax``'s linear y axis until every bar ends below ``label`` (a
    text in axes coordinates) with ``margin`` (a fraction of the axes) to spare."""
    heights = [p.get_height() for p in ax.patches]
    if not heights or max(heights) <= 0:
        return
    fig = ax.figure
    box = label.get_window_extent(renderer=fig.canvas.get_renderer())
    bottom = ax.transAxes.inverted().transform((box.x0, box.y0))[1]  # axes fraction
    room = bottom - margin
    if room <= 0.2:  # a label taller than the axes: leave the axis alone
        return
    ax.set_ylim(0, max(max(heights) / room, ax.get_ylim()[1]))


def frequency_histogram_figure(frequencies, title: str | None = None, bins: int = 50,
                               n_tokens: int | None = None):
    """The histogram of one dictionary's feature frequencies ``[m]`` (fractions of
    ``n_tokens`` tokens, when given) as a matplotlib ``Figure`` on an Agg canvas."""
    import numpy as np

    Figure, FigureCanvasAgg = _matplotlib()
    freqs = _fractions(frequencies)
    alive = freqs[freqs > 0]
    log_f = np.log10(alive)
    lo = min(math.floor(log_f.min()), -1) if alive.size else -1
    edges = np.linspace(lo, 0.0, bins + 1)  # equal in log10: log-spaced in frequency
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(log_f, bins=edges, color="tab:blue")
    ax.set_xlabel("log10(feature frequency)")
    ax.set_ylabel("number of features")
    ax.set_title(title or "Feature frequencies")
    label = ax.text(0.02, 0.97, dead_label(freqs.size - alive.size, freqs.size, n_tokens),
                    transform=ax.transAxes, va="top", fontsize=9)
    fig.tight_layout()
    keep_clear_of_bars(ax, label)
    return fig


def frequency_grid(frequencies: dict[str, torch.Tensor], path, columns: int | None = None,
                   bins: int = 50) -> Path:
    """Save a grid of histograms, one panel per ``{title: frequencies [m]}``, to ``path``
    (PNG, written atomically); panels share the x range so they compare at a glance.
    Returns the path."""
    fig = frequency_grid_figure(frequencies, columns, bins)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def frequency_grid_figure(frequencies: dict[str, torch.Tensor], columns: int | None = None,
                          bins: int = 50):
    """The figure :func:`frequency_grid` saves."""
    import numpy as np

    Figure, FigureCanvasAgg = _matplotlib()
    if not frequencies:
        raise ValueError("no frequencies to plot")
    arrays = {title: _fractions(f, f"{title}: frequencies") for title, f in frequencies.items()}
    alive = [a[a > 0] for a in arrays.values()]
    lo = min([-1] + [math.floor(np.log10(a).min()) for a in alive if a.size])
    edges = np.linspace(lo, 0.0, bins + 1)
    columns = columns or min(4, len(arrays))
    rows = math.ceil(len(arrays) / columns)
    fig = Figure(figsize=(4 * columns, 3 * rows))
    FigureCanvasAgg(fig)
    labels = []
    for i, ((title, a), live) in enumerate(zip(arrays.items(), alive)):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.hist(np.log10(live), bins=edges, color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("log10(feature frequency)", fontsize=8)
        ax.set_ylabel("features", fontsize=8)
        labels.append((ax, ax.text(0.02, 0.97, f"{a.size - live.size} of {a.size} dead",
                                   transform=ax.transAxes, va="top", fontsize=8)))
    fig.tight_layout()
    for ax, label in labels:
        keep_clear_of_bars(ax, label)
    return fig
