"""Feature-frequency histograms of several dictionaries on one figure (a grid of panels).

One panel per dictionary, drawn like :func:`~dictionary_learning.evaluation.
feature_frequency_histogram`: log10 feature frequency on equal-width log bins, dead
features counted in the corner. Uses matplotlib's Agg canvas directly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .files import atomic_write


def frequency_grid(frequencies: dict[str, torch.Tensor], path, columns: int | None = None,
                   bins: int = 50) -> Path:
    """Save a grid of histograms, one panel per ``{title: frequencies [m]}``, to ``path``
    (PNG, written atomically); panels share the x range so they compare at a glance. Returns the path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("frequency_grid needs matplotlib: pip install matplotlib") from e
    import numpy as np

    if not frequencies:
        raise ValueError("no frequencies to plot")
    arrays = {}
    for title, f in frequencies.items():
        a = torch.as_tensor(f).detach().double().flatten().cpu().numpy()
        if a.size == 0 or (a < 0).any() or (a > 1).any():
            raise ValueError(f"{title}: frequencies must be a non-empty array of fractions in "
                             "[0, 1]")
        arrays[title] = a
    alive = [a[a > 0] for a in arrays.values()]
    lo = min([-1] + [math.floor(np.log10(a).min()) for a in alive if a.size])
    edges = np.linspace(lo, 0.0, bins + 1)
    columns = columns or min(4, len(arrays))
    rows = math.ceil(len(arrays) / columns)
    fig = Figure(figsize=(4 * columns, 3 * rows))
    FigureCanvasAgg(fig)
    for i, ((title, a), live) in enumerate(zip(arrays.items(), alive)):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.hist(np.log10(live), bins=edges, color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("log10(feature frequency)", fontsize=8)
        ax.set_ylabel("features", fontsize=8)
        ax.text(0.02, 0.97, f"{a.size - live.size} of {a.size} dead", transform=ax.transAxes,
                va="top", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
